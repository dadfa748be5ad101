"""Triton kernel: y = scale * (codes @ (St * x)) straight from packed bytes.

One kernel for the three packed layouts (``FMT``: 0 binary, 1 ternary2, 2 ternary-b3). Each
program owns a BLOCK_M x BLOCK_N tile of y; it walks K, decodes a BLOCK_N x BLOCK_K tile of
codes from the bytes in registers (never materialising the weight in memory), multiplies the
activations by St on load, and accumulates with ``tl.dot`` in fp32. The per-row scale is applied
once at the end. Codes are exact in fp16/bf16, so the dot runs in the activations' dtype
(tensor cores); fp32 activations use IEEE fp32 (no TF32), which is what the CPU interpreter
tests compare against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packing import check_format, packed_shape

_FMT = {"binary": 0, "ternary2": 1, "ternary-b3": 2}


@triton.jit
def _decode(w_ptr, offs_n, offs_k, N, K, R, stride_wn, FMT: tl.constexpr):
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if FMT == 0:  # binary: 8 codes per byte along K, set bit = -1
        byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] // 8, mask=mask, other=0).to(tl.int32)
        bit = (byte >> (offs_k[None, :] % 8)) & 1
        return 1.0 - 2.0 * bit.to(tl.float32)
    elif FMT == 1:  # ternary2: transformers BitNet layout, 4 rows per byte along N
        byte = tl.load(w_ptr + (offs_n[:, None] % R) * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        code = (byte >> (2 * (offs_n[:, None] // R))) & 3
        return code.to(tl.float32) - 1.0
    else:  # ternary-b3: 5 base-3 digits per byte along K
        byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] // 5, mask=mask, other=0).to(tl.int32)
        r = offs_k[None, :] % 5
        div = tl.where(r == 0, 1, tl.where(r == 1, 3, tl.where(r == 2, 9, tl.where(r == 3, 27, 81))))
        code = (byte // div) % 3
        return tl.where(mask, code.to(tl.float32) - 1.0, 0.0)


@triton.jit
def _packed_matmul_kernel(x_ptr, w_ptr, scale_ptr, st_ptr, y_ptr, M, N, K, R,
                          stride_xm, stride_xk, stride_wn, stride_ym, stride_yn,
                          FMT: tl.constexpr, HAS_ST: tl.constexpr, DOT_FP32: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
        if HAS_ST:
            st = tl.load(st_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * st[None, :]).to(x.dtype)
        w = _decode(w_ptr, offs_n, offs_k, N, K, R, stride_wn, FMT)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w).to(x.dtype))
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _blocks(m: int) -> tuple[int, int, int]:
    """Small M (decode) wants wide N tiles; prefill shapes square-ish tiles."""
    if m <= 16:
        return 16, 64, 128
    if m <= 64:
        return 64, 64, 64
    return 128, 64, 64


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, st: torch.Tensor | None,
                  fmt: str, out_features: int) -> torch.Tensor:
    check_format(fmt)
    K = x.shape[-1]
    if tuple(qweight.shape) != packed_shape(fmt, out_features, K):
        raise ValueError(f"packed weight {tuple(qweight.shape)} does not fit {out_features}x{K} {fmt}")
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], out_features
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bm, bn, bk = _blocks(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _packed_matmul_kernel[grid](
        x2, qweight, scale, st if st is not None else scale, y, M, N, K, qweight.shape[0],
        x2.stride(0), x2.stride(1), qweight.stride(0), y.stride(0), y.stride(1),
        FMT=_FMT[fmt], HAS_ST=st is not None, DOT_FP32=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return y.reshape(*x.shape[:-1], N)
