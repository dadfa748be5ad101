"""GGUF's Q1_0 type for the installed ``gguf`` package: used by the GGUF writer and by the model
loader (``models.load_model`` reads binarize's Q1_0 files through transformers' GGUF reader, which
dequantizes with ``gguf``). Kept apart from the writer so that loading never imports it.
"""

from __future__ import annotations

import numpy as np


def _gguf():
    import gguf

    return gguf


def register_q1_0() -> None:
    """Give the installed ``gguf`` a Q1_0 block quantizer if it lacks one (0.19 has only the type).

    Same rule as llama.cpp's ``quantize_row_q1_0_ref``: d = mean |x| over the block of 128, bit j of
    byte j // 8 set where x >= 0; dequantized, a set bit is +d and a clear one -d.
    """
    gguf = _gguf()
    qtype = getattr(gguf.GGMLQuantizationType, "Q1_0", None)
    if qtype is None or qtype in gguf.quants._type_traits:
        return
    base = getattr(gguf.quants, "__Quant")

    class Q1_0(base, qtype=qtype):
        @classmethod
        def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
            d = np.abs(blocks).mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float16)
            bits = (blocks >= 0).astype(np.uint8).reshape(blocks.shape[0], -1, 8)
            qs = np.sum(bits << np.arange(8, dtype=np.uint8), axis=-1, dtype=np.uint8)
            return np.concatenate([d.view(np.uint8), qs], axis=-1)

        @classmethod
        def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
            d, qs = np.hsplit(blocks, [2])
            d = d.copy().view(np.float16).astype(np.float32)
            bits = (qs[..., None] >> np.arange(8, dtype=np.uint8)) & 1
            return d * (bits.reshape(blocks.shape[0], -1).astype(np.float32) * 2 - 1)
