"""Process-level XLA settings, applied before JAX starts its GPU backend."""
from __future__ import annotations

import os

# jax issue 27988: XLA leaves Pallas' Triton custom calls out of command buffers (CUDA
# graphs) by default, so a decode step of many small kernels pays a launch for each.
COMMAND_BUFFER_FLAG = "--legacy_command_buffer_custom_call_targets=__gpu$xla.gpu.triton"


def enable_command_buffers() -> None:
  """Adds the flag that puts Pallas calls into XLA command buffers. Must run before the first
  computation (XLA reads XLA_FLAGS once). XLA aborts on a flag it does not know, so this is
  opt-in (`--command-buffers`) until it is verified on the JAX version in use."""
  flags = os.environ.get("XLA_FLAGS", "")
  if COMMAND_BUFFER_FLAG not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + COMMAND_BUFFER_FLAG).strip()
