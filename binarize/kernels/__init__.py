"""Matmul kernels on packed weights. Triton on CUDA (and under TRITON_INTERPRET=1 on CPU)."""

from .reference import packed_matmul_reference

__all__ = ["packed_matmul", "packed_matmul_reference", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def packed_matmul(x, qweight, scale, st, fmt, out_features):
    """y = x @ W^T with W = scale * codes * St read from the packed bytes (Triton)."""
    from .triton_packed import packed_matmul as run

    return run(x, qweight, scale, st, fmt, out_features)
