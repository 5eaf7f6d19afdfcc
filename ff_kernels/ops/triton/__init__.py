"""Triton kernels by family (forward GEMM, per-row loss, gradient and update GEMM) and their op registration."""
