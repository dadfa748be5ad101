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

* ``hard_sign`` is the float's sign bit: +1 for x >= +0, -1 for x <= -0, so every weight
  fits in one bit (``torch.sign`` would give 0) and packing reads the bit directly.
* ``t == 0`` is the exact identity (value and gradient), avoiding 0/0; ``t == inf`` is the
  hard sign with zero gradient through the sign (BaI uses that; its gradient reaches St
  through Sa and the column scale).
* ``sa_grad`` (default off in QAT): Sa is treated as a per-step constant, as an analytic
  scale would be; on, the gradient also flows through the mean (BaI turns it on, since
  the loss as a function of St includes Sa's dependence on St).
* ``ste=True`` is the straight-through baseline: hard sign forward, identity backward.

Progressive *form* (``binary_weight(..., form=)``, default the paper's; the cause and the
measurements are in ``benchmarks/progressive_path.py``):

* ``"paper"``: F(W~/Sa, t). W~/Sa is heavy-tailed in pretrained LLMs (|x| up to ~57) and F
  saturates at 1/tanh(t) ~ 1/t, so the first chunk (t = 0.32) already clips the outliers that
  carry the model's massive activation, and the loss at init leaves the FP value at once.
* ``"max"``: the tanh normalised by the row's largest weight, with the row's L2-optimal scale
  (Sa is that scale for the sign)::

      h = tanh(t W~ / M),  M = max_j |W~_ij|,   W_eff = Sl * c * h * St,  c = <W~, h> / <h, h>

  (per row; tanh(t) cancels in c h). |W~/M| <= 1, so early chunks keep the outliers: as t -> 0,
  c h -> W~ exactly (scale included); at t = inf h = sign(W~) and c = mean|W~| = Sa, the paper's
  hard sign (t = 0 and t = inf take the paper's code path, so export, packing and kernels see
  no change). It is F at the per-row sharpness t Sa / M, rescaled. c and M are per-step
  constants like Sa (``sa_grad`` differentiates them too); the backward is the exact derivative
  of this forward. Not defined with ``sa_fixed`` (its t = inf limit is not that mode's Sl sign).
  Neither form is monotone in t at init (see the benchmark).

Ternary weights follow BitNet b1.58 (seeds 000 and 002): gamma = mean|W| (AbsMean) or
median|W| (AbsMedian), per tensor as in the papers or per output row (an option), codes
RoundClip(W / gamma, -1, 1), straight-through on the shadow weights. Choices written here:

* the progressive ternary step is ``F3(x, t) = g(x, t) / g(1, t)`` with
  ``g(x, t) = tanh(t (x + 1/2)) + tanh(t (x - 1/2))``: two tanh steps at the rounding
  thresholds +-1/2, normalised like BinaryLLM's F so that F3(+-1, t) = +-1 for every t. It is
  the identity as t -> 0 and RoundClip(x, -1, 1) as t -> inf (at an exact tie x = +-1/2 the
  finite-t values tend to +-1/2; t = inf itself uses ``torch.round``, which gives 0);
* gamma is a per-step constant (no gradient through the mean or median), as Sa is;
* ``ternary_weight(..., form=)``: ``"paper"`` (default) is F3; ``"max"`` runs F3 at the
  per-row sharpness t gamma / max_j |W_ij| (a per-step constant like gamma), which keeps the
  outliers early as the binary "max" does; the thresholds +-gamma/2, the identity at t -> 0 and
  RoundClip at t = inf are unchanged;
* 8-bit activations are absmax per token, as transformers' BitNet ``BitLinear`` does:
  s = 127 / max|x|, x_q = RoundClip(x s, -128, 127) / s, straight-through backward.
"""

from __future__ import annotations

import math

import torch

_TINY_T = 1e-12
PROGRESSIVE_FORMS = ("paper", "max")  # binary_weight(form=) and ternary_weight(form=)


def _check_form(form: str) -> None:
    if form not in PROGRESSIVE_FORMS:
        raise ValueError(f"unknown progressive form {form!r} (known: {', '.join(PROGRESSIVE_FORMS)})")


def hard_sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where the float's sign bit is clear (x >= +0), -1 where it is set (x <= -0).

    The sign bit is what a 1-bit code stores, so packing needs no comparison and
    ``sign(0) = +1`` keeps every weight representable (``torch.sign`` would give 0).
    """
    return torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), x)


def analytic_scale(w: torch.Tensor) -> torch.Tensor:
    """Sa: per-output-row mean |w|, shape (out, 1). Clamped so an all-zero row stays finite."""
    return (torch.linalg.vector_norm(w, 1, dim=1, keepdim=True) / w.shape[1]).clamp_min(1e-12)


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


def row_max(w: torch.Tensor) -> torch.Tensor:
    """M: per-output-row max |w|, shape (out, 1); clamped like Sa so an all-zero row stays finite."""
    return w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)


def _max_form_scale(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """c = <w, h> / <h, h> per row: the L2-optimal scale of h for w (0 for an all-zero row)."""
    hh = (h * h).sum(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
    return (w * h).sum(dim=1, keepdim=True) / hh


def _max_form_reference(latent, sl, st, t: float, const_scales: bool) -> torch.Tensor:
    """Plain-autograd composition of the "max" form (finite t); c and M detached if const_scales."""
    f = _compute_dtype(latent)
    w = latent.to(f)
    m = row_max(w)
    h = torch.tanh(w * (t / (m.detach() if const_scales else m)))
    c = _max_form_scale(w, h)
    if const_scales:
        c = c.detach()
    return (sl.to(f).view(-1, 1) * c * h * st.to(f).view(1, -1)).to(latent.dtype)


class _BinaryWeight(torch.autograd.Function):
    """Fused W_eff = scale * F(W~/Sa, t) * St with the exact backward.

    Saves only its inputs (parameters that are alive anyway) and recomputes the rest in
    backward. The weight-sized work is memory-bound, so it is written as few in-place passes
    over the weight as the math allows (this is the QAT overhead over full precision).
    """

    @staticmethod
    def forward(ctx, latent, sl, st, t: float, ste: bool, sa_grad: bool, sa_fixed):
        f = _compute_dtype(latent)
        w = latent.to(f)
        sa = analytic_scale(w) if sa_fixed is None else sa_fixed.to(f)
        row = sl.to(f).view(-1, 1) * (sa if sa_fixed is None else 1.0)
        stf = st.to(f).view(1, -1)
        if ste or math.isinf(t):
            out = row * stf
            torch.copysign(out, w, out=out)  # row * hard_sign(w) * st in one pass
        elif t <= _TINY_T:
            out = w / sa * (row * stf)
        else:
            out = w * (t / sa)
            out.tanh_()
            out.mul_(row / math.tanh(t)).mul_(stf)
        ctx.save_for_backward(latent, sl, st, sa_fixed)
        ctx.t, ctx.ste, ctx.sa_grad = t, ste, sa_grad
        return out.to(latent.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        latent, sl, st, sa_fixed = ctx.saved_tensors
        t, ste = ctx.t, ctx.ste
        f = _compute_dtype(latent)
        w = latent.to(f)
        g = grad_out.to(f)
        n = w.shape[1]
        sa = analytic_scale(w) if sa_fixed is None else sa_fixed.to(f)
        slf, stf = sl.to(f).view(-1, 1), st.to(f).view(1, -1)
        outer = sa if sa_fixed is None else torch.ones_like(sa)
        hard = ste or math.isinf(t)
        # q = F(u, t) (or sign) and dq = F'(u, t) with u = w / Sa; tanh(t u) is shared by both.
        if hard:
            q = hard_sign(w)
        elif t <= _TINY_T:
            q = w / sa
        else:
            th = w * (t / sa)
            th.tanh_()
            q = th / math.tanh(t)
        need_w, need_sl, need_st = ctx.needs_input_grad[:3]
        grad_latent = grad_sl = grad_st = None
        gq = g * q if (need_sl or need_st or (need_w and ctx.sa_grad and sa_fixed is None)) else None
        if need_w:
            if ste or t <= _TINY_T:
                dq = g * (slf * stf)  # F' = 1
            elif math.isinf(t):
                dq = torch.zeros_like(w)
            else:
                dq = th.mul_(th).neg_().add_(1.0).mul_(t / math.tanh(t))  # F'(u) = t (1 - tanh^2) / tanh t
                dq.mul_(g).mul_(slf * stf)
            # dq now holds dL/dq * F'(u) * Sl * St; d(Sa F(w/Sa))/dw = F'(u) (Sa cancels)
            if sa_fixed is not None:
                dq.div_(sa)
            elif ctx.sa_grad:
                # Sa = mean|w| adds sign(w_ik)/n * sum_j g_ij Sl_i St_j (F(u_ij) - u_ij F'(u_ij))
                fu = (gq * stf).sum(dim=1, keepdim=True) * slf
                if ste or t <= _TINY_T:
                    ufu = (g * (w / sa) * stf).sum(dim=1, keepdim=True) * slf
                elif math.isinf(t):
                    ufu = 0.0
                else:
                    ufu = (dq * w).sum(dim=1, keepdim=True) / sa
                dq.add_(torch.sign(w) * ((fu - ufu) / n))
            grad_latent = dq.to(latent.dtype)
        if need_sl:
            grad_sl = (gq @ st.to(f)).mul_(outer.view(-1)).to(sl.dtype)
        if need_st:
            grad_st = ((slf * outer).view(1, -1) @ gq).view(-1).to(st.dtype)
        return grad_latent, grad_sl, grad_st, None, None, None, None


class _BinaryWeightMax(torch.autograd.Function):
    """Fused W_eff = Sl * c * tanh(t W~/M) * St (form "max", 0 < t < inf) with the exact backward;
    with ``sa_grad`` the backward differentiates ``_max_form_reference`` instead."""

    @staticmethod
    def forward(ctx, latent, sl, st, t: float, sa_grad: bool):
        f = _compute_dtype(latent)
        w = latent.to(f)
        h = (w * (t / row_max(w))).tanh_()
        c = _max_form_scale(w, h)
        out = h.mul_(sl.to(f).view(-1, 1) * c).mul_(st.to(f).view(1, -1))
        ctx.save_for_backward(latent, sl, st)
        ctx.t, ctx.sa_grad = t, sa_grad
        return out.to(latent.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (latent, sl, st), t, needs = ctx.saved_tensors, ctx.t, ctx.needs_input_grad[:3]
        if ctx.sa_grad:
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(n) for x, n in zip((latent, sl, st), needs)]
                out = _max_form_reference(*leaves, t, const_scales=False)
                wanted = [x for x, n in zip(leaves, needs) if n]
                got = iter(torch.autograd.grad(out, wanted, grad_out))
            return (*(next(got) if n else None for n in needs), None, None)
        f = _compute_dtype(latent)
        w, g, m = latent.to(f), grad_out.to(f), row_max(latent.to(f))
        h = (w * (t / m)).tanh_()
        c = _max_form_scale(w, h)
        slf, stf = sl.to(f).view(-1, 1), st.to(f).view(1, -1)
        grad_latent = grad_sl = grad_st = None
        gh = g * h if (needs[1] or needs[2]) else None
        if needs[1]:
            grad_sl = (gh @ st.to(f)).mul_(c.view(-1)).to(sl.dtype)
        if needs[2]:
            grad_st = ((slf * c).view(1, -1) @ gh).view(-1).to(st.dtype)
        if needs[0]:
            # d(c h)/dw = c (1 - h^2) t / M with c, M constant
            dq = h.mul_(h).neg_().add_(1.0).mul_(g).mul_((slf * c) * (t / m)).mul_(stf)
            grad_latent = dq.to(latent.dtype)
        return grad_latent, grad_sl, grad_st, None, None


def binary_weight(
    latent: torch.Tensor,
    sl: torch.Tensor,
    st: torch.Tensor,
    t: float,
    *,
    ste: bool = False,
    sa_grad: bool = False,
    sa_fixed: torch.Tensor | None = None,
    form: str = "paper",
) -> torch.Tensor:
    """The effective (dequantized) weight of a binary layer; differentiable.

    ``sa_fixed`` replaces the analytic Sa for the "learnable" (Sl-only) scaling mode: the
    latent is normalised by that frozen tensor and the output scale is Sl alone.
    ``form`` is the progressive form for 0 < t < inf: ``"paper"`` (BinaryLLM's F(W~/Sa, t),
    the default) or ``"max"`` (tanh(t W~/max|W~|) with its L2-optimal row scale, see the module
    docstring). Both are the identity at t = 0 and the same hard sign at t = inf; ``ste``
    ignores the form (hard sign forward).
    """
    _check_form(form)
    t = float(t)
    if form == "max":
        if sa_fixed is not None:
            raise ValueError("progressive form 'max' is not defined with sa_fixed (Sl-only scaling); use 'paper'")
        if not ste and _TINY_T < t < math.inf:
            return _BinaryWeightMax.apply(latent, sl, st, t, sa_grad)
    return _BinaryWeight.apply(latent, sl, st, t, ste, sa_grad, sa_fixed)


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


def dequantize(codes: torch.Tensor, scale: torch.Tensor, st: torch.Tensor | None = None) -> torch.Tensor:
    """W = scale_i * code_ij * St_j: the reference every packed layer and kernel is checked against.

    ``codes`` holds {-1, +1} (binary) or {-1, 0, +1} (ternary) in any dtype; the product is
    formed in the same order as ``binary_weight``'s hard-sign forward, so a binary layer's
    export gives back its converted weight bit for bit.
    """
    f = _compute_dtype(scale)
    row = scale.to(f).view(-1, 1)
    w = row * (st.to(f).view(1, -1) if st is not None else torch.ones((), dtype=f, device=row.device))
    return w * codes.to(f)


def ternary_scale(w: torch.Tensor, method: str = "absmean", per_row: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """BitNet b1.58's gamma: mean|W| (AbsMean) or median|W| (AbsMedian), per tensor as in the
    papers or per output row; eps keeps an all-zero tensor from dividing by zero."""
    a = w.abs()
    if method == "absmean":
        g = a.mean(dim=1, keepdim=True) if per_row else a.mean()
    elif method == "absmedian":
        g = a.median(dim=1, keepdim=True).values if per_row else a.flatten().median()
    else:
        raise ValueError(f"unknown ternary scale {method!r} (absmean | absmedian)")
    return g.clamp_min(eps)


def ternary_codes(weight: torch.Tensor, method: str = "absmean", per_row: bool = False):
    """(codes in {-1,0,1}, scale): RoundClip(W / gamma, -1, 1) with gamma from ``ternary_scale``."""
    w = weight.to(_compute_dtype(weight))
    gamma = ternary_scale(w, method, per_row)
    return (w / gamma).round().clamp_(-1, 1), gamma


def naive_ternary(weight: torch.Tensor, method: str = "absmean", per_row: bool = False) -> torch.Tensor:
    """Round-to-nearest ternary baseline (BitNet b1.58 quantizer applied once, no training)."""
    codes, gamma = ternary_codes(weight, method, per_row)
    return (codes * gamma).to(weight.dtype)


def progressive_ternary(x: torch.Tensor, t: float) -> torch.Tensor:
    """F3(x, t): identity as t -> 0, RoundClip(x, -1, 1) at t = inf (see the module docstring)."""
    if t <= _TINY_T:
        return x
    if math.isinf(t):
        return x.round().clamp(-1, 1)
    g1 = math.tanh(1.5 * t) + math.tanh(0.5 * t)
    return (torch.tanh(t * (x + 0.5)) + torch.tanh(t * (x - 0.5))) / g1


def ternary_weight(latent: torch.Tensor, method: str = "absmean", per_row: bool = False, t: float = math.inf,
                   ste: bool = True, form: str = "paper") -> torch.Tensor:
    """The effective ternary weight gamma * Q(W / gamma); differentiable w.r.t. the shadow weight.

    ``t = inf``: RoundClip, with the straight-through estimator (identity backward) when
    ``ste``; finite ``t``: the progressive step F3 with its exact derivative (autograd).
    ``form``: ``"paper"`` (default) runs F3 at sharpness t; ``"max"`` at t * gamma / max_j|W_ij|
    per row (see the module docstring); both are the identity at t = 0 and RoundClip at t = inf.
    """
    _check_form(form)
    w = latent.to(_compute_dtype(latent))
    gamma = ternary_scale(w.detach(), method, per_row)
    if math.isinf(t):
        q = (w.detach() / gamma).round().clamp(-1, 1) * gamma
        out = q + (w - w.detach()) if ste else q  # value exactly q, gradient the identity
    elif form == "max" and t > _TINY_T:
        tr, u = t * gamma / row_max(w.detach()), w / gamma  # F3(u, tr) with a sharpness per row
        out = (torch.tanh(tr * (u + 0.5)) + torch.tanh(tr * (u - 0.5))) / (torch.tanh(1.5 * tr) + torch.tanh(0.5 * tr))
        out = out * gamma
    else:
        out = progressive_ternary(w / gamma, t) * gamma
    return out.to(latent.dtype)


def quantize_activations_int8(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BitLinear's 8-bit per-token absmax fake quantization, straight-through backward."""
    scale = 127.0 / x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    q = (x.detach() * scale).round().clamp(-128, 127) / scale
    return q + (x - x.detach())


def lambda_mix(weight: torch.Tensor, quantized: torch.Tensor, lam: float) -> torch.Tensor:
    """Continual-switch phase-in: w + lambda (q(w) - w), the difference detached (seed 000)."""
    return weight + lam * (quantized - weight).detach()

