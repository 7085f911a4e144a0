"""The ops layer, between the kernels (pallas_kernels/) and the models (models/): the public
ops and where each runs (dispatch), the rules and tuned tables that pick a kernel
(selection, tables/), the plain-XLA reference of every op (reference), input checks, the
quantized weight pytree (quant) and the paged KV cache pytree (kv_cache)."""
