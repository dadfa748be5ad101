"""All quantizer math, in one place.

Training (QuantLinear), export and the kernels' reference call these functions, so a
change to the math is a change here only.

Binary weights follow BinaryLLM (arXiv 2508.06974):

    W_eff = Sl * Sa * F(W~ / Sa, t) * St        (per output row i, per input column j)

* ``W~`` latent weight (= W / St after binary-aware initialization),
* ``Sa = mean_j |W~_ij|`` the analytic scale, recomputed from the current latent weight
  on every call (it is the L2-optimal scale of ``sign(W~)``),
* ``Sl`` learnable per-row scale (starts at 1), ``St`` per-input-channel scale from BaI,
* ``F(x, t) = tanh(t x) / tanh(t)``: identity as t -> 0, sign as t -> inf, used in the
  forward *and* (through its exact derivative) in the backward pass.

Choices the paper leaves open (each a recipe option):

* ``hard_sign(0) = +1`` so every weight fits in one bit (``torch.sign`` would give 0).
* ``t == 0`` is the exact identity (value and gradient), avoiding 0/0; ``t == inf`` is the
  hard sign with zero gradient through the sign (BaI uses that; its gradient reaches St
  through Sa and the column scale).
* ``sa_grad`` (default off in QAT): Sa is treated as a per-step constant, as an analytic
  scale would be; on, the gradient also flows through the mean (BaI turns it on, since
  the loss as a function of St includes Sa's dependence on St).
* ``ste=True`` is the straight-through baseline: hard sign forward, identity backward.
"""

from __future__ import annotations

import math

import torch

_TINY_T = 1e-12


def hard_sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1, so it is exactly representable in one bit."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def analytic_scale(w: torch.Tensor) -> torch.Tensor:
    """Sa: per-output-row mean |w|, shape (out, 1). Clamped so an all-zero row stays finite."""
    return w.abs().mean(dim=1, keepdim=True).clamp_min(1e-12)


def progressive(x: torch.Tensor, t: float) -> torch.Tensor:
    """F(x, t) = tanh(t x) / tanh(t); t <= tiny is the identity, t = inf the hard sign."""
    if t <= _TINY_T:
        return x
    if math.isinf(t):
        return hard_sign(x)
    return torch.tanh(t * x) / math.tanh(t)


def progressive_grad(x: torch.Tensor, t: float) -> torch.Tensor:
    """dF/dx = t (1 - tanh^2(t x)) / tanh(t); 1 at t -> 0, 0 at t = inf."""
    if t <= _TINY_T:
        return torch.ones_like(x)
    if math.isinf(t):
        return torch.zeros_like(x)
    th = torch.tanh(t * x)
    return (1.0 - th * th) * (t / math.tanh(t))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 at least (bf16/fp16 latents are upcast), fp64 kept for gradient checks."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _BinaryWeight(torch.autograd.Function):
    """Fused W_eff = scale * F(W~/Sa, t) * St with the exact backward.

    Saves only its inputs (parameters that are alive anyway) and recomputes the rest in
    backward, so QAT costs one weight-sized tensor per layer over full-precision training.
    """

    @staticmethod
    def forward(ctx, latent, sl, st, t: float, ste: bool, sa_grad: bool, sa_fixed):
        f = _compute_dtype(latent)
        w = latent.to(f)
        sa = analytic_scale(w) if sa_fixed is None else sa_fixed.to(f)
        u = w / sa
        q = hard_sign(u) if ste else progressive(u, t)
        row = sl.to(f).view(-1, 1) * (sa if sa_fixed is None else 1.0)
        ctx.save_for_backward(latent, sl, st, sa_fixed)
        ctx.t, ctx.ste, ctx.sa_grad = t, ste, sa_grad
        return (row * q * st.to(f).view(1, -1)).to(latent.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        latent, sl, st, sa_fixed = ctx.saved_tensors
        t, ste = ctx.t, ctx.ste
        f = _compute_dtype(latent)
        w = latent.to(f)
        g = grad_out.to(f)
        sa = analytic_scale(w) if sa_fixed is None else sa_fixed.to(f)
        u = w / sa
        q = hard_sign(u) if ste else progressive(u, t)
        dq = torch.ones_like(u) if ste else progressive_grad(u, t)
        slf, stf = sl.to(f).view(-1, 1), st.to(f).view(1, -1)
        grad_latent = grad_sl = grad_st = None
        outer = sa if sa_fixed is None else 1.0
        if ctx.needs_input_grad[0]:
            gs = g * slf * stf  # dL/d(outer * q)
            if sa_fixed is None:
                grad_latent = gs * dq  # Sa cancels: d(Sa*F(w/Sa))/dw = F'(u)
                if ctx.sa_grad:
                    # Sa = mean|w|: d/dw_ik adds sign(w_ik)/n * sum_j gs_ij (F(u_ij) - u_ij F'(u_ij))
                    inner = (gs * (q - u * dq)).sum(dim=1, keepdim=True)
                    grad_latent = grad_latent + torch.sign(w) * inner / w.shape[1]
            else:
                grad_latent = gs * dq / sa
            grad_latent = grad_latent.to(latent.dtype)
        if ctx.needs_input_grad[1]:
            grad_sl = (g * q * stf).sum(dim=1).mul(outer.view(-1) if sa_fixed is None else 1.0)
            grad_sl = grad_sl.to(sl.dtype)
        if ctx.needs_input_grad[2]:
            grad_st = (g * slf * outer * q).sum(dim=0).to(st.dtype)
        return grad_latent, grad_sl, grad_st, None, None, None, None


def binary_weight(
    latent: torch.Tensor,
    sl: torch.Tensor,
    st: torch.Tensor,
    t: float,
    *,
    ste: bool = False,
    sa_grad: bool = False,
    sa_fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The effective (dequantized) weight of a binary layer; differentiable.

    ``sa_fixed`` replaces the analytic Sa for the "learnable" (Sl-only) scaling mode: the
    latent is normalised by that frozen tensor and the output scale is Sl alone.
    """
    return _BinaryWeight.apply(latent, sl, st, float(t), ste, sa_grad, sa_fixed)


def binary_codes(latent: torch.Tensor, sl: torch.Tensor, sa_fixed: torch.Tensor | None = None):
    """Export view of a binary layer: (signs in {-1,+1}, merged per-row scale Sl*Sa).

    ``binary_weight(latent, sl, st, inf) == scale * signs * St`` exactly.
    """
    w = latent.to(_compute_dtype(latent))
    signs = hard_sign(w)
    sa = analytic_scale(w) if sa_fixed is None else torch.ones_like(sa_fixed, dtype=w.dtype)
    return signs, (sl.to(w.dtype).view(-1, 1) * sa).view(-1)


def naive_sign(weight: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest binarization baseline: mean|W| per row times sign(W)."""
    w = weight.to(_compute_dtype(weight))
    return (analytic_scale(w) * hard_sign(w)).to(weight.dtype)
