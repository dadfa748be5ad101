"""Matmul kernels on packed weights. Triton on CUDA (and under TRITON_INTERPRET=1 on CPU)."""

from .reference import packed_matmul_reference

__all__ = ["packed_matmul", "packed_matmul_reference", "prepare", "prepared_matmul", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def packed_matmul(x, qweight, scale, st, fmt, out_features, split_k=None):
    """y = x @ W^T with W = scale * codes * St read from the packed bytes (Triton)."""
    from .triton_packed import packed_matmul as run

    return run(x, qweight, scale, st, fmt, out_features, split_k)


def prepare(qweight, fmt, out_features, in_features):
    """The packed weight re-packed once into the kernels' int32 layout (same bits per weight)."""
    from .triton_packed import prepare as run

    return run(qweight, fmt, out_features, in_features)


def prepared_matmul(x, kw, scale, st, fmt, out_features, split_k=None, lut=False):
    """packed_matmul on a weight already passed through ``prepare`` (``split_k``: see
    ``triton_packed.prepared_matmul``; None chooses by shape and SM count). ``lut``: one activation
    row goes through the activation-table kernel (``lut_gemv``) instead of the FMA one; more rows
    always take the FMA kernels."""
    if lut and x.numel() == x.shape[-1]:
        from .lut_gemv import lut_gemv as run
    else:
        from .triton_packed import prepared_matmul as run

    return run(x, kw, scale, st, fmt, out_features, split_k)
