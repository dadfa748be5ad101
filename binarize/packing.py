"""Bit packing of quantized weight codes: pure functions, exact round trips.

Formats (codes are per weight, scales are stored beside them as float tensors):

* ``binary``: codes in {-1, +1}, 8 per byte along the input dimension. Bit k of byte j in
  row i is column 8j + k; a set bit means -1 (the float sign bit, see ``hard_sign``).
* ``ternary2``: codes in {-1, 0, +1} stored as code + 1 in 2 bits, 4 per byte, in the
  layout of transformers' BitNet ``pack_weights``: packed along out_features in blocks, byte
  row r holds rows r, r + R, r + 2R, r + 3R (R = ceil(out / 4)) at bits 0, 2, 4, 6.
* ``ternary-b3``: codes in {-1, 0, +1} as base-3 digits, 5 per byte (3^5 = 243 <= 256) along
  the input dimension: byte j of row i = sum_k (code[i, 5j + k] + 1) * 3^k. 1.6 bits.

Dimensions that do not fill the last byte are padded (binary: +1, ternary-b3: 0, ternary2:
zero bits, as transformers does); ``unpack`` cuts the padding off again.
"""

from __future__ import annotations

import math

import torch

from .errors import BinarizeError

FORMATS = ("binary", "ternary2", "ternary-b3")
CODES_PER_BYTE = {"binary": 8, "ternary2": 4, "ternary-b3": 5}
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


def packed_shape(fmt: str, out_features: int, in_features: int) -> tuple[int, int]:
    check_format(fmt)
    if fmt == "ternary2":
        return (math.ceil(out_features / 4), in_features)
    return (out_features, math.ceil(in_features / CODES_PER_BYTE[fmt]))


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise BinarizeError(f"unknown packed format {fmt!r} (known: {', '.join(FORMATS)})")


def _pad_cols(x: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    pad = -x.shape[1] % multiple
    return torch.nn.functional.pad(x, (0, pad), value=value) if pad else x


def pack(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """(out, in) codes -> uint8 tensor of ``packed_shape``. Codes outside the format are an error."""
    check_format(fmt)
    c = codes.to(torch.int8) if codes.is_floating_point() else codes.to(torch.int8)
    if codes.is_floating_point() and not torch.equal(c.to(codes.dtype), codes):
        raise BinarizeError("codes must be whole numbers")
    allowed = (-1, 1) if fmt == "binary" else (-1, 0, 1)
    if not torch.isin(c, torch.tensor(allowed, dtype=torch.int8, device=c.device)).all():
        raise BinarizeError(f"{fmt} codes must be in {allowed}")
    if fmt == "binary":
        bits = _pad_cols((c < 0).to(torch.uint8), 8, 0)
        bits = bits.view(bits.shape[0], -1, 8)
        shifts = torch.arange(8, dtype=torch.uint8, device=c.device)
        return (bits << shifts).sum(dim=2, dtype=torch.uint8)
    if fmt == "ternary-b3":
        trits = _pad_cols((c + 1).to(torch.uint8), 5, 1).view(c.shape[0], -1, 5)
        return (trits * _POW3.to(c.device)).sum(dim=2, dtype=torch.uint8)
    out = c.shape[0]
    rows = math.ceil(out / 4)
    v = torch.nn.functional.pad((c + 1).to(torch.uint8), (0, 0, 0, 4 * rows - out), value=0)  # as transformers pads
    packed = torch.zeros(rows, c.shape[1], dtype=torch.uint8, device=c.device)
    for i in range(4):
        packed |= v[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def unpack(packed: torch.Tensor, fmt: str, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack``: int8 codes of shape (out_features, in_features)."""
    check_format(fmt)
    if tuple(packed.shape) != packed_shape(fmt, out_features, in_features) or packed.dtype != torch.uint8:
        raise BinarizeError(f"packed {fmt} tensor has shape {tuple(packed.shape)} / {packed.dtype}, expected "
                            f"{packed_shape(fmt, out_features, in_features)} / torch.uint8")
    if fmt == "binary":
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = (packed.unsqueeze(-1) >> shifts) & 1
        return (1 - 2 * bits.to(torch.int8)).view(out_features, -1)[:, :in_features]
    if fmt == "ternary-b3":
        p = packed.unsqueeze(-1)
        trits = (p // _POW3.to(packed.device)) % 3
        if (packed > 242).any():
            raise BinarizeError("ternary-b3 byte above 242: not a base-3 packed tensor")
        return (trits.to(torch.int8) - 1).view(out_features, -1)[:, :in_features]
    rows = packed.shape[0]
    parts = [((packed >> (2 * i)) & 3) for i in range(4)]
    codes = torch.cat(parts, dim=0)[:out_features].to(torch.int8) - 1
    if (codes > 1).any():
        raise BinarizeError("ternary2 code 3 found: not a 2-bit ternary tensor")
    return codes


def bits_per_weight(fmt: str) -> float:
    return {"binary": 1.0, "ternary2": 2.0, "ternary-b3": 8 / 5}[fmt]
