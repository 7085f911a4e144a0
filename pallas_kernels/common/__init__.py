"""What the kernels of every backend share: the async softmax's arithmetic (async_softmax),
how work is cut into blocks (tiling) and what a GEMV / flat GEMM takes (gemm). No backend
folder imports another; each imports this one."""
