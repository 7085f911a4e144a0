"""Measuring and fitting to the hardware: how device work is timed (timing), compiling for a
described GPU or TPU with none present (aot), the GEMV / flat GEMM crossover tables (tune)
and the async softmax's phi per layer (calibrate)."""
