"""Batch-1 product through activation lookup tables: one table read per 4 bits of weight.

The FMA kernels (``triton_packed._gemv_kernel``) spend at least three instructions per weight at
batch 1 (bit extract, sign build, FFMA; 4.5-7.4 per weight with addresses at sm_90,
``benchmarks/results/kernel_sass_sm90.md``), and a decode step is issue-bound there, not
bandwidth-bound. Here the activations are turned, once per call, into a table of every signed sum
a 4-bit group of codes can select (T-MAC, arXiv 2407.00088; the lookup-table GEMV that BitBLAS and
LUT-GEMM build on), and the product walks the weight words reading one table entry per 4-bit
nibble: shift, mask, address, load, add for 4 binary (or 2 ternary) weights.

Layout (the kernel layout of ``triton_packed``: int32 words [KW, N], bit group j of word w is
column j * KW + w). Nibble g of a word holds bit groups j = g * P .. g * P + P - 1 (P = 4 / BITS:
4 binary codes, 2 ternary codes), so its table row (w, g) has 16 entries

    T[w, g, p] = sum_i code_i(p) * St[k_i] * x[k_i],   k_i = (g * P + i) * KW + w,

code_i(p) being the code whose bits are field i of p (binary: set = -1, else +1; ternary: field
- 1; the unused field 3 gives +2 and is never stored). Shapes: T (KW, 8, 16) fp32, K * 4 (binary)
or K * 8 (ternary) entries, 64 / 128 KiB at K = 4096, built by ``_table_kernel`` and read through
L1/L2. Zero padding of the last word meets x = 0, as in the FMA kernels.

Sums are formed in fp32 in a different order from the FMA kernels' (4 products per table entry,
then the entries), so results agree with them to fp32 rounding, not bit for bit. Split-K works as
in ``triton_packed`` (``choose_split_k``; partial products summed in split order, deterministic).
Which of the two batch-1 kernels is faster is for a GPU to say (``benchmarks/kernel_bench.py``
times both); ``prepared_matmul(..., lut=True)`` selects this one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_packed import _INTERPRET, _split_range, _store, check_call, kernel_bits, outputs

NIBBLES = 8  # 4-bit nibbles per int32 word
ENTRIES = 16  # table entries per nibble
_NIBBLES = tl.constexpr(NIBBLES)  # the same, as the kernels read them
_ENTRIES = tl.constexpr(ENTRIES)


def _table_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_W": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_W": b}, num_warps=w) for b, w in ((32, 4), (64, 4), (128, 8))]


def _lut_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_KW": 4}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w)
            for bn, bkw, w in ((32, 16, 4), (64, 8, 4), (64, 16, 4), (128, 8, 4), (128, 16, 8), (256, 4, 8))]


@triton.autotune(configs=_table_configs(), key=["K", "BITS"])
@triton.jit
def _table_kernel(x_ptr, st_ptr, t_ptr, K, KW, BITS: tl.constexpr, HAS_ST: tl.constexpr, BLOCK_W: tl.constexpr):
    """T[w, g, p] for BLOCK_W words (one activation row, (K,) in x's dtype)."""
    P: tl.constexpr = 4 // BITS
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_g = tl.arange(0, _NIBBLES)
    offs_p = tl.arange(0, _ENTRIES)
    t = tl.zeros((BLOCK_W, _NIBBLES, _ENTRIES), dtype=tl.float32)
    for i in tl.static_range(P):
        offs_k = (offs_g[None, :] * P + i) * KW + offs_w[:, None]  # [BLOCK_W, 8]
        kmask = (offs_w[:, None] < KW) & (offs_k < K)
        x = tl.load(x_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        if HAS_ST:
            x *= tl.load(st_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        field = (offs_p >> (i * BITS)) & ((1 << BITS) - 1)
        if BITS == 1:
            code = 1.0 - 2.0 * field.to(tl.float32)  # set bit = -1
        else:
            code = field.to(tl.float32) - 1.0  # stored code + 1
        t += x[:, :, None] * code[None, None, :]
    offs = (offs_w[:, None, None] * _NIBBLES + offs_g[None, :, None]) * _ENTRIES + offs_p[None, None, :]
    tl.store(t_ptr + offs, t, mask=offs_w[:, None, None] < KW)


@triton.autotune(configs=_lut_configs(), key=["N", "KW", "SPLIT_K"])
@triton.jit
def _lut_gemv_kernel(t_ptr, w_ptr, scale_ptr, y_ptr, ws_ptr, ws_stride, N, KW, SPLIT_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """y[n] = scale[n] * sum over words and nibbles of T[w, g, nibble(w, n, g)]."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    w_lo, w_hi = _split_range(KW, SPLIT_K, BLOCK_KW)
    acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        wmask = offs_w[:, None] < KW
        word = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=wmask & nmask[None, :], other=0)
        row = t_ptr + offs_w[:, None] * (_NIBBLES * _ENTRIES)
        for g in tl.static_range(_NIBBLES):
            acc += tl.load(row + (g * _ENTRIES + ((word >> (4 * g)) & 15)), mask=wmask, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    _store(y_ptr, ws_ptr, ws_stride, offs_n, nmask, tl.sum(acc, axis=0) * scale, SPLIT_K)


def activation_table(x: torch.Tensor, st: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """T (KW, 8, 16) fp32 for one activation row x (K,) (any float dtype) and St (K,) or None."""
    K = x.shape[-1]
    bits = kernel_bits(fmt)
    kw = -(-K // (32 // bits))
    table = torch.empty((kw, NIBBLES, ENTRIES), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(kw, meta["BLOCK_W"]),)  # noqa: E731
    _table_kernel[grid](x, st if st is not None else x, table, K, kw, BITS=bits, HAS_ST=st is not None)
    return table


def lut_gemv(x: torch.Tensor, kw: torch.Tensor, scale: torch.Tensor, st: torch.Tensor | None, fmt: str,
             out_features: int, split_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T for one activation row through the activation table.

    x: (K,) or (1, K) fp32/fp16/bf16; kw: int32 [KW, N] (``triton_packed.prepare``); scale: (N,)
    fp32; st: (K,) or None. Returns x's shape with K replaced by N, in x's dtype. ValueError for more
    than one row, a weight of the wrong shape or dtype, or split_k < 1."""
    K, N = x.shape[-1], out_features
    if x.numel() != K:
        raise ValueError(f"the table kernel takes one activation row, got {tuple(x.shape)}")
    n_words, split = check_call(x, kw, fmt, N, 1, split_k)
    table = activation_table(x.reshape(K).contiguous(), st, fmt)
    y, y_arg, ws = outputs(x, split, 1, N)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), 1, split)  # noqa: E731
    _lut_gemv_kernel[grid](table, kw, scale, y_arg, ws, N, N, n_words, SPLIT_K=split)
    if split > 1:
        y = ws.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], N)
