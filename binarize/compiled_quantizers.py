"""The per-step weight quantizer fused by ``torch.compile`` (recipe key ``compile_quantizer``).

Every QAT step recomputes each QuantLinear's effective weight from its latent weight: Sa =
mean|W~| per row, F(W~/Sa, t), the row and column scales, and in backward the exact derivative.
Eager, that is a string of small elementwise kernels per layer (~210 layers in SmolLM2-135M); on a
GPU the step is then launch-bound (issue 21: QAT step 2.18x the full-precision step on an H100).
Here the same math is written as plain autograd ops and handed to ``torch.compile``: inductor fuses
the elementwise chain around Sa's row reduction in the forward and in the backward that AOTAutograd
derives (Triton kernels on a GPU, C++ loops on a CPU). Measured on 2 CPU cores, the SmolLM2-135M
QAT step goes from 1.225x to 0.995x of the full-precision step
(``benchmarks/results/convert_throughput_cpu.md``); GPU figures: ``benchmarks/gpu_session.sh``.

* Values and gradients equal ``quantizers.binary_weight`` / ``quantizers.ternary_weight``
  (``tests/test_compiled_quantizers.py``, within float32 rounding), so training, export and
  the kernels' reference keep one definition of the math: this module restates its paper form
  with the same helpers (``analytic_scale``, ``hard_sign``, ``ternary_scale``), for the compiler.
* t enters as a 0-d tensor, so the 20 chunks of a schedule do not recompile; the branch (identity,
  progressive, hard, straight-through) and the scaling mode are Python flags, one graph each.
  Shapes are dynamic (``dynamic=True``): one graph serves every layer shape.
* Only the paper form (``progressive_form: paper``) is compiled; the recipe refuses
  ``compile_quantizer`` with ``progressive_form: max``.
"""

from __future__ import annotations

import functools
import math

import torch

from .quantizers import _TINY_T, _compute_dtype, analytic_scale, hard_sign, ternary_scale


def binary_weight_composed(latent: torch.Tensor, sl: torch.Tensor, st: torch.Tensor, t: torch.Tensor,
                           mode: str, sa_grad: bool, sa_fixed: torch.Tensor | None) -> torch.Tensor:
    """BinaryLLM's W_eff = Sl * Sa * F(W~/Sa, t) * St as plain autograd ops (arXiv 2508.06974).

    latent (out, in), sl (out,), st (in,), t a 0-d tensor (used by ``mode == "progressive"``),
    sa_fixed (out, 1) or None (Sl-only scaling: W_eff = Sl * F(W~/sa_fixed, t) * St). ``mode``:
    ``identity`` (t = 0), ``progressive`` (0 < t < inf), ``hard`` (t = inf, no gradient through
    the sign), ``ste`` (hard sign forward, identity backward in u = W~/Sa). Sa is a per-step
    constant unless ``sa_grad``. Returns (out, in) in latent's dtype."""
    f = _compute_dtype(latent)
    w = latent.to(f)
    if sa_fixed is None:
        sa = analytic_scale(w)
        sa = sa if sa_grad else sa.detach()
        row = sl.to(f).view(-1, 1) * sa
    else:
        sa = sa_fixed.to(f)
        row = sl.to(f).view(-1, 1)
    u = w / sa
    if mode == "identity":
        q = u
    elif mode == "progressive":
        tf = t.to(f)
        q = torch.tanh(tf * u) / torch.tanh(tf)
    elif mode == "hard":
        q = hard_sign(w).detach()
    else:  # ste
        q = u + (hard_sign(u) - u).detach()
    return (row * q * st.to(f).view(1, -1)).to(latent.dtype)


def ternary_weight_composed(latent: torch.Tensor, sl: torch.Tensor, st: torch.Tensor, t: torch.Tensor, mode: str,
                            method: str, per_row: bool) -> torch.Tensor:
    """Sl * gamma * Q(W~/gamma, t) * St (BitNet b1.58, arXiv 2402.17764; F3 of ``quantizers``):
    ``progressive`` runs F3(u, t) = g(u, t) / g(1, t), g(u, t) = tanh(t (u + 1/2)) + tanh(t (u - 1/2));
    ``identity`` is u; ``ste`` / ``hard`` are RoundClip(u, -1, 1) with the straight-through
    backward (the ternary layer's hard quantizer always passes the gradient). gamma is constant."""
    f = _compute_dtype(latent)
    w = latent.to(f)
    gamma = ternary_scale(w.detach(), method, per_row)
    u = w / gamma
    if mode == "identity":
        q = u
    elif mode == "progressive":
        tf = t.to(f)
        q = (torch.tanh(tf * (u + 0.5)) + torch.tanh(tf * (u - 0.5))) / (torch.tanh(1.5 * tf) + torch.tanh(0.5 * tf))
    else:
        q = u + (u.detach().round().clamp(-1, 1) - u).detach()
    return (sl.to(f).view(-1, 1) * (q * gamma) * st.to(f).view(1, -1)).to(latent.dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _mode(t: float, ste: bool) -> str:
    if ste:
        return "ste"
    if math.isinf(t):
        return "hard"
    return "identity" if t <= _TINY_T else "progressive"


def compiled_binary_weight(latent, sl, st, t: float, *, ste: bool = False, sa_grad: bool = False,
                           sa_fixed: torch.Tensor | None = None) -> torch.Tensor:
    """``quantizers.binary_weight`` (paper form) through ``torch.compile``; same arguments."""
    tt = torch.tensor(0.0 if math.isinf(t) else float(t), device=latent.device)
    return _compiled(binary_weight_composed)(latent, sl, st, tt, _mode(t, ste), sa_grad, sa_fixed)


def compiled_ternary_weight(latent, sl, st, t: float, *, ste: bool, method: str, per_row: bool) -> torch.Tensor:
    """Sl * ``quantizers.ternary_weight`` (paper form) * St through ``torch.compile``."""
    tt = torch.tensor(0.0 if math.isinf(t) else float(t), device=latent.device)
    mode = "ste" if (ste or math.isinf(t)) else _mode(t, False)
    return _compiled(ternary_weight_composed)(latent, sl, st, tt, mode, method, per_row)
