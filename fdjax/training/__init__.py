"""Training with optax (train), its byte-level data (data) and the CoPE paper's synthetic
tasks (tasks)."""
