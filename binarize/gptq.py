"""Hessian-aware quantization of one linear layer under binarize's scale structure.

The effective weight of a converted layer is ``W_eff[i, j] = a_i * C[i, j] * s_j``: codes C in
{-1, +1} (binary) or {-1, 0, +1} (ternary), one scale a per output row (the merged Sl * Sa or
Sl * gamma) and one per input column s (St). Given the layer's full-precision weight W (out, in)
and the Hessian H = E[x x^T] (in, in) of its inputs on calibration text, this module chooses C, a
and s to make the layer-output error ``tr((W - W_eff) H (W - W_eff)^T)`` small:

* **error feedback** (GPTQ, arXiv 2210.17323, Algorithm 1; OBS): columns are quantized in order
  and each column's rounding error, divided by the diagonal of the Cholesky factor of H^-1, is
  spread onto the columns not yet quantized (lazy batches of ``block`` columns);
* **scale refinement** (ARB-LLM's alternation, arXiv 2410.03129, in the Hessian metric): with the
  codes fixed, the row scales a are the per-row least-squares fit ``a_i = <c_i, w_i>_H / <c_i, c_i>_H``
  and the column scales s solve ``(H o G^T G) s = diag(G^T W H)`` with G = diag(a) C (exact minimiser
  of the quadratic in s); then the codes are chosen again under the new scales. The round with the
  lowest output error is kept (round 0 is the plain rounding's own refit, so the result is never
  worse than it in this metric);
* **column scale start** (``column_init="svid"``, OneBit's SVID, arXiv 2402.11295): s starts as the
  leading right singular vector of |W| (a rank-1 fit of the magnitudes), else as the given St.

Inputs with a column that never fires (H_jj = 0) get H_jj = 1 and W[:, j] = 0, as GPTQ does.
Everything here is float32 on W's device; no gradient. The codes come from the one rounding of
each method in ``quantizers.py`` (``hard_sign``; RoundClip), so the conversion's quantizer and
this search agree on what a code is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BinarizeError
from .quantizers import hard_sign


@dataclass(frozen=True)
class HessianQuantConfig:
    """Options of ``quantize_layer`` (recipe keys ``hessian_*``)."""

    method: str = "binary"  # binary | ternary
    feedback: bool = True  # GPTQ error feedback onto the columns not yet quantized
    refine: int = 2  # rounds of scale refit + re-quantization after the first
    column_scale: bool = True  # fit the per-column scale s (St); off: s stays as given
    column_init: str = "given"  # given | svid
    damp: float = 0.01  # H + damp * mean(diag H) * I
    block: int = 128  # GPTQ's lazy-batch width


@dataclass
class LayerQuant:
    """Result for one layer: codes (out, in), row scale a (out,), column scale s (in,), the latent
    W / s with the error feedback applied (its rounding gives ``codes`` exactly), and the output
    error ``tr(E H E^T) / tr(W H W^T)`` of plain rounding (mean|.| scales) and of the result."""

    codes: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    latent: torch.Tensor
    error_plain: float
    error: float
    rounds: int


def round_codes(w: torch.Tensor, method: str) -> torch.Tensor:
    """Codes of ``w`` already divided by its row scale: sign (binary) or RoundClip (ternary)."""
    return hard_sign(w) if method == "binary" else w.round().clamp(-1, 1)


def initial_row_scale(w: torch.Tensor, method: str) -> torch.Tensor:
    """Per-row mean|w| (Sa for the sign, AbsMean gamma for ternary), (out,)."""
    return w.abs().mean(dim=1).clamp_min(1e-8)


def damped_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, as GPTQ uses it; a matrix that is
    still not positive definite is a BinarizeError (raise the damping)."""
    n = h.shape[0]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(n, device=h.device, dtype=h.dtype)
    try:
        lower = torch.linalg.cholesky(h)
        inv = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inv, upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError
        raise BinarizeError(f"the damped Hessian (damp {damp:g}) is not positive definite: raise hessian_damp") from None


def output_error(w: torch.Tensor, w_eff: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_eff) H (W - W_eff)^T) / tr(W H W^T): the relative layer-output error."""
    e = w - w_eff
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def gptq_codes(w: torch.Tensor, a: torch.Tensor, u: torch.Tensor, method: str, block: int = 128):
    """GPTQ's column loop: (codes, latent) for W (out, in) with row scale a (out,) and ``u`` the
    upper Cholesky factor of H^-1. ``latent`` holds each column as it was when quantized (error
    feedback applied), so ``round_codes(latent / a) == codes``."""
    w = w.clone()
    n = w.shape[1]
    codes = torch.zeros_like(w)
    latent = torch.zeros_like(w)
    a = a.view(-1, 1)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            c = round_codes(col / a, method)
            codes[:, i1 + i : i1 + i + 1] = c
            latent[:, i1 + i : i1 + i + 1] = col
            err = (col - c * a) / u1[i, i]
            w1[:, i:] -= err @ u1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, latent


def fit_row_scale(w: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row least squares in the H metric: a_i = <c_i, w_i>_H / <c_i, c_i>_H, (out,); a row whose
    fit is not positive keeps mean|w_i| over its nonzero codes."""
    ch = c @ h
    a = (ch * w).sum(1) / (ch * c).sum(1).clamp_min(1e-30)
    fallback = (w.abs() * c.abs()).sum(1) / c.abs().sum(1).clamp_min(1)
    return torch.where(a > 0, a, fallback).clamp_min(1e-8)


def fit_col_scale(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, s_min: float = 1e-2) -> torch.Tensor:
    """Column scales s (in,) minimising tr((W - G diag(s)) H (...)^T): (H o G^T G) s = diag(G^T W H),
    solved with a small ridge, clamped to [s_min, inf) and normalised to mean 1."""
    a = h * (g.T @ g)
    b = ((w @ h) * g).sum(0)
    ridge = 1e-6 * torch.diagonal(a).mean().clamp_min(1e-30)
    s = torch.linalg.solve(a + ridge * torch.eye(a.shape[0], device=a.device, dtype=a.dtype), b)
    s = s.clamp_min(s_min)
    return s / s.mean()


def svid_col_scale(w: torch.Tensor, s_min: float = 1e-2) -> torch.Tensor:
    """OneBit's SVID column factor: the leading right singular vector of |W|, positive, mean 1."""
    _, _, v = torch.linalg.svd(w.abs(), full_matrices=False)
    s = v[0].abs().clamp_min(1e-12)
    return (s / s.mean()).clamp_min(s_min)


@torch.no_grad()
def quantize_layer(w: torch.Tensor, h: torch.Tensor, s0: torch.Tensor, cfg: HessianQuantConfig,
                   s_min: float = 1e-2) -> LayerQuant:
    """Choose codes, row and column scales for W (out, in) under the input Hessian H (in, in),
    starting from column scale s0 (in,); see the module docstring. Non-finite W or H is a
    BinarizeError (the caller adds the layer's name)."""
    if cfg.method not in ("binary", "ternary"):
        raise BinarizeError(f"unknown method {cfg.method!r} for the Hessian-aware initialisation")
    w, h = w.float(), h.float()
    if not (torch.isfinite(w).all() and torch.isfinite(h).all()):
        raise BinarizeError("non-finite values in the weight or its input Hessian")
    dead = torch.diagonal(h) == 0
    if dead.any():
        h = h.clone()
        h[dead, dead] = 1.0
        w = w.clone()
        w[:, dead] = 0.0
    s = s0.float().clone()
    if cfg.column_scale and cfg.column_init == "svid":
        s = svid_col_scale(w, s_min)
    a = initial_row_scale(w / s, cfg.method)
    plain_codes = round_codes(w / s / a.view(-1, 1), cfg.method)
    error_plain = output_error(w, a.view(-1, 1) * plain_codes * s, h)
    best = None
    for r in range(cfg.refine + 1):
        wp, hp = w / s, h * s.view(-1, 1) * s.view(1, -1)  # the problem in the latent (W / s) domain
        if cfg.feedback:
            codes, latent = gptq_codes(wp, a, damped_inverse_factor(hp, cfg.damp), cfg.method, cfg.block)
        else:
            codes, latent = round_codes(wp / a.view(-1, 1), cfg.method), wp
        a = fit_row_scale(wp, codes, hp)
        err = output_error(w, a.view(-1, 1) * codes * s, h)
        if best is None or err < best.error:
            best = LayerQuant(codes, a.clone(), s.clone(), latent, error_plain, err, r)
        if cfg.column_scale and r < cfg.refine:
            s = fit_col_scale(w, a.view(-1, 1) * codes, h, s_min)
            a = fit_row_scale(w / s, codes, h * s.view(-1, 1) * s.view(1, -1))
    return best


@dataclass
class SalientResidual:
    """A second binary bit-plane on the ``cols`` (k,) most salient input columns of a layer: the
    effective weight becomes ``W_eff + scale[:, None] * codes`` on those columns (codes (out, k) in
    {-1, +1}, scale (out,)); ``error`` is the relative layer-output error after it. Costs k / in bits
    per weight plus one 16-bit scale per row (``extra_bits``)."""

    cols: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    error: float
    extra_bits: float


@torch.no_grad()
def salient_residual(w: torch.Tensor, w_eff: torch.Tensor, h: torch.Tensor, frac: float) -> SalientResidual:
    """BiLLM's residual binarization of salient columns (arXiv 2402.04291, section 3.2), applied to
    what the layer's quantization left over, R = W - W_eff (out, in), in the H metric:

    * the salient columns are the ``ceil(frac * in)`` whose own best correction removes the most
      output error, ``sum_i (R H)_ij^2 / H_jj`` (OBS's saliency of a single column; BiLLM ranks the
      weights themselves by ``w^2 / [H^-1]_jj^2``, here the ranking follows the error that is left);
    * on those columns S the best real-valued correction is ``D = (R H)[:, S] H_SS^-1`` (least squares
      with the other columns fixed); its signs are the codes, and each row's scale is the least-squares
      fit of ``scale * codes`` to R in the H metric, clamped at 0 (a row the plane cannot help keeps
      no plane), so the error never rises above ``tr(R H R^T)``.

    W, W_eff (out, in), H (in, in); float32, no gradient. ``frac`` outside (0, 1] or non-finite
    inputs: BinarizeError."""
    if not 0 < frac <= 1:
        raise BinarizeError(f"the salient column fraction must be in (0, 1], got {frac}")
    w, w_eff, h = w.float(), w_eff.float(), h.float()
    if not (torch.isfinite(w).all() and torch.isfinite(w_eff).all() and torch.isfinite(h).all()):
        raise BinarizeError("non-finite values in the weight, its quantized weight or its input Hessian")
    in_f = w.shape[1]
    k = max(1, math.ceil(frac * in_f))
    r = w - w_eff
    rh = r @ h
    score = rh.pow(2).sum(0) / torch.diagonal(h).clamp_min(1e-30)
    cols = torch.topk(score, k).indices.sort().values
    h_ss = h[cols][:, cols]
    ridge = 1e-6 * torch.diagonal(h_ss).mean().clamp_min(1e-30) * torch.eye(k, dtype=h.dtype, device=h.device)
    d = torch.linalg.solve(h_ss + ridge, rh[:, cols].T).T
    c = torch.zeros_like(r)
    c[:, cols] = hard_sign(d)
    ch = c @ h
    scale = ((ch * r).sum(1) / (ch * c).sum(1).clamp_min(1e-30)).clamp_min(0.0)
    err = output_error(w, w_eff + scale.view(-1, 1) * c, h)
    return SalientResidual(cols, c[:, cols], scale, err, k / in_f + 16.0 / in_f)
