"""What the engine reads and writes: checkpoints (Hugging Face and fdjax), tokenizers, chat
templates, the sampling a checkpoint's generation_config.json recommends, the device mesh a
model is loaded onto, and `loading`, the one model loader the command line, the server and
the benchmarks use."""
