"""Triton kernels: y = scale * (codes @ (St * x)) from bit-packed weights.

**Kernel layout.** The on-disk formats pack codes along K (binary, ternary-b3) or along N
(ternary2, transformers' BitNet layout); decoding those in a kernel needs one load per weight
element, which measured 5-20x slower than bf16 on an H100. So on the GPU each layer's codes are
re-packed once, at its first forward, into int32 words [KW, N] (KW = ceil(K / CPW)): bit group
j of word (w, n) holds the code of row n, column j * KW + w, ``BITS`` bits each (binary: 1 bit,
set = -1, CPW = 32; ternary: 2 bits, code + 1, CPW = 16). N is the contiguous dimension (loads
of a [BLOCK_KW, BLOCK_N] word tile are coalesced), every word is loaded once and its CPW codes
are expanded in registers, and for a fixed j the columns of a word tile are contiguous, so the
matching activations load contiguously too. Memory: binary and ternary2 stay at 1 / 2 bits
per weight; ternary-b3 (1.6 bits on disk) takes 2 bits on the GPU.

* ``_gemv_kernel`` (one activation row, the decode case): a [BLOCK_KW, BLOCK_N] fp32
  accumulator of code * x, summed once at the end, one bit group at a time (``_gemv_rows``), or
  every bit group of a word tile at once into a [BLOCK_KW, CPW, BLOCK_N] accumulator
  (``_gemv_tile3``, autotune key ``TILE3``: fewer instructions per weight, more registers); no
  tensor cores. A third batch-1 form reads activation lookup tables instead (``lut_gemv.py``).
* ``_dot_kernel`` (M >= 2): BLOCK_M x BLOCK_N tiles, the decoded codes in the activations' dtype
  (codes are exact in fp16/bf16; tensor cores), fp32 accumulation, either one ``tl.dot`` of depth
  BLOCK_KW per bit group (``_dot_groups``) or, autotune key ``WHOLE_WORD``, the word tile decoded
  once into [BLOCK_KW * CPW, BLOCK_N] and one dot of that depth (``_dot_whole_word``: at sm_90
  7-9x fewer loop instructions per iteration but 1.1-1.9x more per decoded weight, as the flattened
  tile goes through shared memory; ``benchmarks/results/kernel_sass_sm90.md``);
  fp32 activations use IEEE fp32 (no TF32), which the CPU-interpreter tests compare against.
* Split-K (both kernels, ``SPLIT_K``, program axis 2): when the output tiles alone leave SMs
  idle (batch 1 and 8 on 2048-8192 wide layers: 32-128 tiles on 132 SMs), each tile's K range
  is cut into equal runs of whole BLOCK_KW tiles, one program each, whose fp32 partial products
  go to a workspace [SPLIT_K, M, N] summed afterwards in split order (deterministic, unlike
  atomic adds); ``choose_split_k`` picks the count from the shape and the SM count, ``split_k=``
  overrides it.

Codes are decoded from bits into fp32 by integer ops (``_codes``), never by int->float converts.
St multiplies the activations on load, the per-row scale is applied once at the end. On CUDA
both kernels are autotuned over a few tile shapes keyed on the problem shape; under
``TRITON_INTERPRET=1`` a single small configuration runs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..packing import check_format, packed_shape, unpack

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_bits(fmt: str) -> int:
    check_format(fmt)
    return 1 if fmt == "binary" else 2


def kernel_layout(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """(N, K) codes -> int32 words [KW, N], KW = ceil(K / CPW); bit group j of word w is column
    j * KW + w (see the module docstring)."""
    bits = kernel_bits(fmt)
    cpw = 32 // bits
    n, k = codes.shape
    kw = -(-k // cpw)
    v = (codes < 0).to(torch.int64) if bits == 1 else (codes.to(torch.int64) + 1)
    v = torch.nn.functional.pad(v, (0, cpw * kw - k)).view(n, cpw, kw)  # padded columns meet x = 0
    shifts = (torch.arange(cpw, device=codes.device, dtype=torch.int64) * bits).view(1, cpw, 1)
    words = (v << shifts).sum(dim=1).t()
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32).contiguous()


def prepare(qweight: torch.Tensor, fmt: str, out_features: int, in_features: int) -> torch.Tensor:
    """Packed on-disk tensor -> kernel layout, on qweight's device (done once per layer)."""
    return kernel_layout(unpack(qweight, fmt, out_features, in_features), fmt)


def _gemv_configs() -> list[triton.Config]:
    """Per-bit-group loop (TILE3 False) and whole-word tiles (TILE3 True, fewer instructions per
    weight, more registers): the autotuner times both on the device and keeps the faster per shape."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_KW": 4, "TILE3": False}, num_warps=4)]
    rows = [(16, 32, 4), (16, 64, 4), (32, 16, 4), (32, 32, 4), (64, 16, 4), (64, 32, 8), (8, 64, 2), (128, 8, 4)]
    tiles = [(64, 8, 8), (32, 4, 2), (64, 4, 4), (16, 8, 4), (32, 8, 4)]
    return ([triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw, "TILE3": False}, num_warps=w) for bn, bkw, w in rows]
            + [triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw, "TILE3": True}, num_warps=w) for bn, bkw, w in tiles])


def _dot_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KW": 16, "WHOLE_WORD": False}, num_warps=4)]
    groups = [(16, 32, 16, 4, 3), (16, 64, 16, 4, 3), (16, 64, 32, 4, 3), (32, 64, 16, 4, 3), (64, 64, 16, 4, 3),
              (64, 128, 16, 4, 3), (128, 128, 16, 8, 3), (16, 128, 16, 4, 3)]
    words = [(16, 64, 2, 4, 3), (16, 128, 2, 4, 3), (64, 128, 2, 8, 3), (128, 128, 2, 8, 3)]
    return ([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "WHOLE_WORD": False}, num_warps=w,
                           num_stages=s) for bm, bn, bkw, w, s in groups]
            + [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "WHOLE_WORD": True}, num_warps=w,
                             num_stages=s) for bm, bn, bkw, w, s in words])


def _prune_for_split(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Every configuration at SPLIT_K = 1; with K split, those whose word tile leaves every split at
    least one tile (BLOCK_KW * SPLIT_K <= KW), at most two of each form (TILE3 / WHOLE_WORD or not)
    so that each split count compiles a few configurations, not all. Never empty."""
    split = kwargs.get("SPLIT_K", 1)
    if split == 1:
        return configs
    fits = [c for c in configs if c.kwargs["BLOCK_KW"] * split <= named_args["KW"]]
    fits = fits or [min(configs, key=lambda c: c.kwargs["BLOCK_KW"])]
    kept, per_form = [], {}
    for c in fits:
        form = bool(c.kwargs.get("TILE3") or c.kwargs.get("WHOLE_WORD"))
        if per_form.get(form, 0) < 2:
            per_form[form] = per_form.get(form, 0) + 1
            kept.append(c)
    return kept


@triton.jit
def _codes(word, J: tl.constexpr, BITS: tl.constexpr):
    """fp32 codes (exactly -1, 0, +1) of bit group J of every word, built from bits instead of
    an int->float convert per weight: 15-20 % fewer loop instructions for binary, 0-4 % for
    ternary (``benchmarks/results/kernel_sass_sm90.md``; the kernels are issue-bound at batch 1)."""
    if BITS == 1:  # set bit = -1: the bit becomes the sign of 1.0
        return (((word << (31 - J)) & -2147483648) | 0x3F800000).to(tl.float32, bitcast=True)
    # code + 1 in {0, 1, 2} goes to the top of 1.0's mantissa (bits 21-22): f = 1, 1.25, 1.5
    f = ((((word >> (J * BITS)) << 21) & 0x00600000) | 0x3F800000).to(tl.float32, bitcast=True)
    return f * 4.0 - 5.0


@triton.jit
def _gemv_rows(x_ptr, w_ptr, st_ptr, offs_n, nmask, m, N, K, KW, w_lo, w_hi, stride_xm, BITS: tl.constexpr,
               HAS_ST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """sum_k code * x over words [w_lo, w_hi) for BLOCK_N rows: a [BLOCK_KW, BLOCK_N] accumulator,
    one bit group at a time."""
    CPW: tl.constexpr = 32 // BITS
    acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        word = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w[:, None] < KW) & nmask[None, :],
                       other=0)
        for j in tl.static_range(CPW):  # each word loaded once, its codes expanded in registers
            offs_k = j * KW + offs_w
            kmask = (offs_w < KW) & (offs_k < K)
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=kmask, other=0.0).to(tl.float32)
            if HAS_ST:
                x *= tl.load(st_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
            acc += _codes(word, j, BITS) * x[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def _gemv_tile3(x_ptr, w_ptr, st_ptr, offs_n, nmask, m, N, K, KW, w_lo, w_hi, stride_xm, BITS: tl.constexpr,
                HAS_ST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """The same sum with every bit group of a word tile at once: the activations as one
    [BLOCK_KW, CPW] load and a [BLOCK_KW, CPW, BLOCK_N] accumulator. Binary: 4.5-5.2 loop
    instructions per weight at sm_90 against 6.0-7.4 for ``_gemv_rows`` (fewer address and mask
    computations), at 96-158 registers (the per-bit-group configurations: 40-168;
    ``benchmarks/results/kernel_sass_sm90.md``)."""
    CPW: tl.constexpr = 32 // BITS
    offs_j = tl.arange(0, CPW)
    acc = tl.zeros((BLOCK_KW, CPW, BLOCK_N), dtype=tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        word = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w[:, None] < KW) & nmask[None, :],
                       other=0)
        offs_k = offs_j[None, :] * KW + offs_w[:, None]
        kmask = (offs_w[:, None] < KW) & (offs_k < K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=kmask, other=0.0).to(tl.float32)
        if HAS_ST:
            x *= tl.load(st_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        acc += _codes(word[:, None, :], offs_j[None, :, None], BITS) * x[:, :, None]
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def _split_range(KW, SPLIT_K: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Words [w_lo, w_hi) of this program's K split (program axis 2): equal runs, each a whole
    number of BLOCK_KW tiles, so no tile reaches into the next split."""
    per = tl.cdiv(tl.cdiv(KW, SPLIT_K), BLOCK_KW) * BLOCK_KW
    w_lo = tl.program_id(2) * per
    return w_lo, tl.minimum(w_lo + per, KW)


@triton.jit
def _store(y_ptr, ws_ptr, ws_stride, offs, mask, y, SPLIT_K: tl.constexpr):
    """One split: the result in the output dtype; several: this split's fp32 partial product in its
    own slice of the workspace [SPLIT_K, M, N] (summed afterwards in a fixed order, so the result
    does not depend on which program finishes first)."""
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + tl.program_id(2) * ws_stride + offs, y, mask=mask)


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "BITS", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune_for_split})
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, st_ptr, y_ptr, ws_ptr, ws_stride, N, K, KW, stride_xm, stride_ym,
                 BITS: tl.constexpr, HAS_ST: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_KW: tl.constexpr, TILE3: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    w_lo, w_hi = _split_range(KW, SPLIT_K, BLOCK_KW)
    if TILE3:
        y = _gemv_tile3(x_ptr, w_ptr, st_ptr, offs_n, nmask, m, N, K, KW, w_lo, w_hi, stride_xm, BITS, HAS_ST,
                        BLOCK_N, BLOCK_KW)
    else:
        y = _gemv_rows(x_ptr, w_ptr, st_ptr, offs_n, nmask, m, N, K, KW, w_lo, w_hi, stride_xm, BITS, HAS_ST,
                       BLOCK_N, BLOCK_KW)
    scale = tl.load(scale_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    _store(y_ptr, ws_ptr, ws_stride, m * stride_ym + offs_n, nmask, y * scale, SPLIT_K)


@triton.jit
def _dot_groups(acc, x_ptr, word, offs_m, mmask, offs_w, st_ptr, K, KW, stride_xm, BITS: tl.constexpr,
                HAS_ST: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += x @ codes for one word tile, one [BLOCK_M, BLOCK_KW] x [BLOCK_KW, BLOCK_N] dot per bit group."""
    CPW: tl.constexpr = 32 // BITS
    for j in tl.static_range(CPW):
        offs_k = j * KW + offs_w
        kmask = (offs_w < KW) & (offs_k < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        if HAS_ST:
            st = tl.load(st_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * st[None, :]).to(x.dtype)
        w = _codes(word, j, BITS)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    return acc


@triton.jit
def _dot_whole_word(acc, x_ptr, word, offs_m, mmask, offs_w, st_ptr, K, KW, stride_xm, BITS: tl.constexpr,
                    HAS_ST: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_KW: tl.constexpr):
    """acc += x @ codes for one word tile in a single dot of depth BLOCK_KW * CPW: the whole tile
    is decoded once into [BLOCK_KW, CPW, BLOCK_N] and flattened to [BLOCK_KW * CPW, BLOCK_N]
    (row w * CPW + j is column j * KW + w), the activations gathered in the same order."""
    CPW: tl.constexpr = 32 // BITS
    offs_j = tl.arange(0, CPW)
    offs_k = offs_j[None, :] * KW + offs_w[:, None]  # [BLOCK_KW, CPW]
    kmask = (offs_w[:, None] < KW) & (offs_k < K)
    x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + offs_k[None, :, :],
                mask=mmask[:, None, None] & kmask[None, :, :], other=0.0)
    if HAS_ST:
        st = tl.load(st_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * st[None, :, :]).to(x.dtype)
    x = tl.reshape(x, (BLOCK_M, BLOCK_KW * CPW))
    w = tl.reshape(_codes(word[:, None, :], offs_j[None, :, None], BITS), (BLOCK_KW * CPW, BLOCK_N))
    if DOT_FP32:
        acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    else:
        acc += tl.dot(x, w.to(x.dtype))
    return acc


@triton.autotune(configs=_dot_configs(), key=["M_BUCKET", "N", "K", "BITS", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune_for_split})
@triton.jit
def _dot_kernel(x_ptr, w_ptr, scale_ptr, st_ptr, y_ptr, ws_ptr, ws_stride, M, N, K, KW, M_BUCKET, stride_xm, stride_ym,
                BITS: tl.constexpr, HAS_ST: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, WHOLE_WORD: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_lo, w_hi = _split_range(KW, SPLIT_K, BLOCK_KW)
    for w0 in range(w_lo, w_hi, BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        word = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :],
                       mask=(offs_w[:, None] < KW) & (offs_n[None, :] < N), other=0)
        if WHOLE_WORD:
            acc = _dot_whole_word(acc, x_ptr, word, offs_m, mmask, offs_w, st_ptr, K, KW, stride_xm, BITS, HAS_ST,
                                  DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_KW)
        else:
            acc = _dot_groups(acc, x_ptr, word, offs_m, mmask, offs_w, st_ptr, K, KW, stride_xm, BITS, HAS_ST,
                              DOT_FP32)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    _store(y_ptr, ws_ptr, ws_stride, offs_m[:, None] * stride_ym + offs_n[None, :],
           mmask[:, None] & (offs_n[None, :] < N), acc * scale[None, :], SPLIT_K)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _stand_in(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for the pointer a split count does not write (made once, not per call)."""
    return torch.empty(1, dtype=dtype, device=device)


def choose_split_k(m: int, n: int, n_words: int, device: torch.device) -> int:
    """K splits for an (m x K) @ (K x n) product: 1 unless the output tiles alone would leave the
    GPU's SMs idle. Counting nominal 16 x 64 output tiles (m = 1: 64 rows), the largest power of
    two up to 16 that keeps the programs within two per SM and every split at 32 words or more
    (1,024 binary / 512 ternary columns). 2048x8192 at batch 1 on an H100 (132 SMs): 32 tiles ->
    8 splits; 4096x4096 at batch 1 or 8: 64 tiles -> 4; batch 64: 256 tiles -> 1. Always 1 off
    CUDA (the interpreter tests pass ``split_k`` explicitly)."""
    if device.type != "cuda":
        return 1
    tiles = -(-n // 64) * (1 if m == 1 else -(-m // 16))
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while split < 16 and tiles * split * 2 <= target and n_words // (split * 2) >= 32:
        split *= 2
    return split


def check_call(x: torch.Tensor, kw: torch.Tensor, fmt: str, out_features: int, m: int,
               split_k: int | None) -> tuple[int, int]:
    """(words per column KW, K splits) of a product of m rows of x (..., K) with the kernel-layout
    weight kw; ValueError for a weight of the wrong shape or dtype, or split_k < 1."""
    K = x.shape[-1]
    n_words = -(-K // (32 // kernel_bits(fmt)))
    if tuple(kw.shape) != (n_words, out_features) or kw.dtype != torch.int32:
        raise ValueError(f"kernel-layout weight {tuple(kw.shape)} does not fit {out_features}x{K} {fmt}")
    split = choose_split_k(m, out_features, n_words, x.device) if split_k is None else int(split_k)
    if split < 1:
        raise ValueError(f"split_k must be at least 1, got {split_k}")
    return n_words, split


def outputs(x: torch.Tensor, split: int, m: int, n: int):
    """(y (m, n) in x's dtype or None, the output pointer argument, the fp32 workspace argument):
    one split writes y; several write their slices of a workspace (split, m, n). The pointer a split
    count does not write gets a one-element stand-in, never an alias of the other: torch.compile may
    copy each written argument separately and write the copies back."""
    if split == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        return y, y, _stand_in(x.device, torch.float32)
    return None, _stand_in(x.device, x.dtype), torch.empty((split, m, n), dtype=torch.float32, device=x.device)


def prepared_matmul(x: torch.Tensor, kw: torch.Tensor, scale: torch.Tensor, st: torch.Tensor | None, fmt: str,
                    out_features: int, split_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T for a weight already in kernel layout (``prepare``).

    x: (..., K) fp32/fp16/bf16; kw: int32 [KW, N]; scale: (N,) fp32; st: (K,) or None; returns
    (..., N) in x's dtype. ``split_k``: programs per output tile along K (None: ``choose_split_k``);
    with more than one, each writes its fp32 partial product to a workspace (split_k, M, N) that is
    summed in split order and cast (deterministic: the same bits on every call, which a greedy
    decode checked token for token against ``generate()`` needs). ValueError for a weight of the
    wrong shape or dtype, or split_k < 1."""
    K = x.shape[-1]
    bits = kernel_bits(fmt)
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], out_features
    n_words, split = check_call(x, kw, fmt, out_features, M, split_k)
    y, y_arg, ws = outputs(x, split, M, N)
    st_arg = st if st is not None else scale
    if M == 1:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M, split)  # noqa: E731
        _gemv_kernel[grid](x2, kw, scale, st_arg, y_arg, ws, M * N, N, K, n_words, x2.stride(0), N,
                           BITS=bits, HAS_ST=st is not None, SPLIT_K=split)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
        _dot_kernel[grid](x2, kw, scale, st_arg, y_arg, ws, M * N, M, N, K, n_words, triton.next_power_of_2(M),
                          x2.stride(0), N, BITS=bits, HAS_ST=st is not None, DOT_FP32=x.dtype == torch.float32,
                          SPLIT_K=split)
    if split > 1:
        y = ws.sum(0).to(x.dtype)  # partial products in split order
    return y.reshape(*x.shape[:-1], N)


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, st: torch.Tensor | None,
                  fmt: str, out_features: int, split_k: int | None = None) -> torch.Tensor:
    """One-off product from the on-disk packing (re-packs every call; layers cache ``prepare``)."""
    K = x.shape[-1]
    if tuple(qweight.shape) != packed_shape(fmt, out_features, K):
        raise ValueError(f"packed weight {tuple(qweight.shape)} does not fit {out_features}x{K} {fmt}")
    return prepared_matmul(x, prepare(qweight, fmt, out_features, K), scale, st, fmt, out_features, split_k)
