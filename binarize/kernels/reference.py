"""The kernels' reference: unpack, dequantize with the quantizer module's function, matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import unpack
from ..quantizers import dequantize


def packed_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, st: torch.Tensor | None,
                            fmt: str, out_features: int) -> torch.Tensor:
    w = dequantize(unpack(qweight, fmt, out_features, x.shape[-1]), scale, st)
    return F.linear(x.float(), w).to(x.dtype)
