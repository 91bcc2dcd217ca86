"""The machine under MLX: which BLAS it calls, the CPU JIT's compiler flags, fused CPU kernels, and ``doctor``."""
