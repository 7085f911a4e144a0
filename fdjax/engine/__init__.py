"""Running a model: `generate` (decode_loop), sampling, the host-side KV page pool (paging)
and the continuous-batching engine the server drives (core)."""
