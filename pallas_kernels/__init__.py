"""The Pallas kernels, one folder per backend (triton/, tpu/), with what they share in
common/. No model code: the ops layer (fdjax.ops.dispatch) calls them."""
