import math

import pytest
import torch

from binarize.quantizers import (analytic_scale, binary_codes, binary_weight, hard_sign, naive_sign, progressive,
                                 progressive_grad)


def test_hard_sign_is_the_sign_bit():
    x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert hard_sign(x).tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]  # never 0, unlike torch.sign
    assert torch.equal(hard_sign(x) < 0, torch.signbit(x))


def test_progressive_limits():
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(progressive(x, 0.0), x)  # t = 0 is exactly the identity
    small = progressive(x, 1e-6)
    assert torch.allclose(small, x, rtol=1e-9, atol=1e-9)  # and continuous there
    # F(x, t) = x (1 + t^2 (1 - x^2) / 3 + O(t^4)): a relative deviation of ~t^2 x^2 / 3
    assert torch.allclose(progressive(x, 1e-3), x, rtol=1e-6 * float(x.abs().max()) ** 2, atol=0)
    big = progressive(x, 1e4)
    far = x.abs() > 1e-2  # t x > 100: tanh rounds to exactly 1 in float64
    assert torch.equal(big[far], hard_sign(x)[far])
    assert torch.equal(progressive(x, math.inf), hard_sign(x))
    # F(1, t) = 1 for every t (the normalisation by tanh(t))
    for t in (0.1, 1.0, 5.0, 80.0):
        assert progressive(torch.tensor([1.0, -1.0], dtype=torch.float64), t).tolist() == pytest.approx([1, -1])


@pytest.mark.parametrize("t", [1e-4, 0.3, 2.0, 20.0])
def test_progressive_grad_is_exact_derivative(t):
    x = (torch.randn(200, dtype=torch.float64) * 2).requires_grad_(True)
    (torch.tanh(t * x) / math.tanh(t)).sum().backward()
    assert torch.allclose(progressive_grad(x.detach(), t), x.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(progressive_grad(x.detach(), 0.0), torch.ones_like(x))


def _inputs(out=5, inp=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, dtype=torch.float64, generator=g).requires_grad_(True)
    sl = (torch.rand(out, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    st = (torch.rand(inp, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    return w, sl, st


@pytest.mark.parametrize("t", [0.0, 0.5, 3.0, 25.0])
def test_binary_weight_gradcheck(t):
    """With the gradient through Sa, the fused backward is the true derivative (finite differences)."""
    w, sl, st = _inputs()
    fn = lambda w, sl, st: binary_weight(w, sl, st, t, sa_grad=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w, sl, st), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.5, 3.0, 25.0])
def test_binary_weight_gradcheck_constant_sa(t):
    """Without it, Sa is a per-step constant: finite differences with Sa held fixed agree."""
    w, sl, st = _inputs()
    sa = analytic_scale(w.detach())
    fn = lambda w, sl, st: binary_weight(w, sl, st, t, sa_grad=False)  # noqa: E731
    const = lambda w, sl, st: sl[:, None] * sa * (torch.tanh(t * w / sa) / math.tanh(t) if t else w / sa) * st  # noqa: E731
    gy = torch.randn(w.shape, dtype=torch.float64)
    a = torch.autograd.grad((fn(w, sl, st) * gy).sum(), (w, sl, st))
    b = torch.autograd.grad((const(w, sl, st) * gy).sum(), (w, sl, st))
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


def test_binary_weight_matches_plain_autograd_composition():
    w, sl, st = _inputs()
    t = 1.7
    ref = lambda w, sl, st: sl[:, None] * analytic_scale(w) * torch.tanh(t * w / analytic_scale(w)) / math.tanh(t) * st  # noqa: E731
    gy = torch.randn(w.shape, dtype=torch.float64)
    a = torch.autograd.grad((binary_weight(w, sl, st, t, sa_grad=True) * gy).sum(), (w, sl, st))
    b = torch.autograd.grad((ref(w, sl, st) * gy).sum(), (w, sl, st))
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


def test_t_zero_reproduces_the_original_layer():
    w, sl, st = _inputs()
    with torch.no_grad():
        eff = binary_weight(w, torch.ones_like(sl), st, 0.0)
    assert torch.allclose(eff, w * st, rtol=1e-12)


def test_ste_is_sign_forward_identity_backward():
    w, sl, st = _inputs()
    out = binary_weight(w, sl, st, 0.0, ste=True)
    expected = sl[:, None] * analytic_scale(w) * hard_sign(w) * st
    assert torch.allclose(out, expected)
    gy = torch.randn(w.shape, dtype=torch.float64)
    (gw,) = torch.autograd.grad((out * gy).sum(), (w,))
    assert torch.allclose(gw, gy * sl[:, None] * st)  # d sign/du := 1, Sa cancels


def test_hard_weight_equals_export_codes():
    w, sl, st = _inputs()
    with torch.no_grad():
        eff = binary_weight(w, sl, st, math.inf)
        signs, scale = binary_codes(w, sl)
    assert set(signs.unique().tolist()) <= {-1.0, 1.0}
    assert torch.allclose(eff, scale[:, None] * signs * st, rtol=1e-12)
    # naive sign = same quantizer with Sl = St = 1
    assert torch.allclose(naive_sign(w.detach()), binary_weight(w.detach(), torch.ones(5, dtype=w.dtype),
                                                                torch.ones(7, dtype=w.dtype), math.inf))


def test_sa_is_recomputed_from_current_latent():
    from binarize.qlinear import QuantLinear

    lin = torch.nn.Linear(16, 4, bias=False)
    q = QuantLinear.from_linear(lin)
    q.fold_st()
    w0 = q.effective_weight().detach().clone()
    with torch.no_grad():
        q.weight.mul_(3.0)  # same signs, 3x the magnitudes: Sa must follow
    w1 = q.effective_weight().detach()
    assert torch.allclose(w1, 3.0 * w0, rtol=1e-6)
    expected_rows = q.weight.abs().mean(1)
    assert torch.allclose(w1.abs().mean(1), expected_rows, rtol=1e-6)


def test_hard_sign_gradient_reaches_st_through_sa():
    """BaI's case (t = inf): finite differences see Sa and St move, not the signs."""
    w, sl, st = _inputs()
    fn = lambda w, sl, st: binary_weight(w, sl, st, math.inf, sa_grad=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w, sl, st), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 2.0, math.inf])
def test_ste_matches_detach_trick(t):
    w, sl, st = _inputs()
    sa = lambda w: analytic_scale(w)  # noqa: E731
    ref = lambda w, sl, st: sl[:, None] * sa(w) * (w / sa(w) + (hard_sign(w) - w / sa(w)).detach()) * st  # noqa: E731
    gy = torch.randn(w.shape, dtype=torch.float64)
    for sa_grad in (False, True):
        a = torch.autograd.grad((binary_weight(w, sl, st, t, ste=True, sa_grad=sa_grad) * gy).sum(), (w, sl, st))
        if sa_grad:
            b = torch.autograd.grad((ref(w, sl, st) * gy).sum(), (w, sl, st))
        else:
            s0 = sa(w).detach()
            b = torch.autograd.grad((sl[:, None] * s0 * (w / s0 + (hard_sign(w) - w / s0).detach()) * st * gy).sum(),
                                    (w, sl, st))
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.7, 9.0])
def test_fixed_sa_learnable_scale_gradcheck(t):
    w, sl, st = _inputs()
    sa_fixed = analytic_scale(w.detach()) * 1.3
    fn = lambda w, sl, st: binary_weight(w, sl, st, t, sa_fixed=sa_fixed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w, sl, st), eps=1e-6, atol=1e-6)
    ref = sl[:, None] * (torch.tanh(t * w / sa_fixed) / math.tanh(t) if t else w / sa_fixed) * st
    assert torch.allclose(fn(w, sl, st), ref, rtol=1e-12)


# ----------------------------------------------------------------------------- ternary (BitNet b1.58)

def test_progressive_ternary_limits():
    from binarize.quantizers import progressive_ternary

    x = torch.linspace(-2, 2, 4001, dtype=torch.float64)
    assert torch.allclose(progressive_ternary(x, 1e-4), x, rtol=1e-6, atol=1e-7)  # t -> 0: identity
    away = (x.abs() - 0.5).abs() > 0.05  # away from the rounding ties
    rc = x.round().clamp(-1, 1)
    assert torch.allclose(progressive_ternary(x, 400.0)[away], rc[away], atol=1e-12)  # t large: RoundClip
    assert torch.equal(progressive_ternary(x, math.inf), rc)
    for t in (0.3, 2.0, 9.0):  # normalised like F: +-1 stay +-1
        ends = progressive_ternary(torch.tensor([-1.0, 1.0], dtype=torch.float64), t)
        assert torch.allclose(ends, torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda v: progressive_ternary(v, 3.0),
                                    (torch.randn(20, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("method", ["absmean", "absmedian"])
@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_weight_values_and_ste(method, per_row):
    from binarize.quantizers import ternary_scale, ternary_weight

    w = torch.randn(16, 64, requires_grad=True)
    q = ternary_weight(w, method, per_row)
    gamma = ternary_scale(w.detach(), method, per_row)
    want_gamma = (w.detach().abs().median(dim=1, keepdim=True).values if per_row else w.detach().abs().median()) \
        if method == "absmedian" else (w.detach().abs().mean(dim=1, keepdim=True) if per_row else w.detach().abs().mean())
    assert torch.allclose(gamma, want_gamma)
    codes = q.detach() / gamma
    assert torch.equal(codes, (w.detach() / gamma).round().clamp(-1, 1))
    assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0}
    c = torch.randn_like(w)
    (q * c).sum().backward()
    assert torch.equal(w.grad, c)  # straight-through: identity backward on the shadow weight


def test_absmedian_zeroes_fewer_weights_than_absmean_on_heavy_tails():
    """A heavy-tailed tensor: mean|W| > median|W|, so AbsMean rounds more weights to 0."""
    from binarize.quantizers import ternary_codes

    w = torch.distributions.StudentT(2.0).sample((64, 256))
    zeros = {m: float((ternary_codes(w, m)[0] == 0).float().mean()) for m in ("absmean", "absmedian")}
    assert zeros["absmedian"] < zeros["absmean"]


def test_int8_activation_quantization():
    from binarize.quantizers import quantize_activations_int8

    x = torch.randn(4, 7, 96) * torch.rand(4, 7, 1) * 10
    x.requires_grad_(True)
    q = quantize_activations_int8(x)
    step = x.detach().abs().amax(-1, keepdim=True) / 127
    assert ((q.detach() - x.detach()).abs() <= step / 2 + 1e-6).all()
    levels = (q.detach() / step).round()
    assert torch.allclose(q.detach() / step, levels, atol=1e-4) and levels.abs().max() <= 127
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_lambda_mix_phases_quantization_in():
    from binarize.quantizers import lambda_mix, ternary_weight

    w = torch.randn(8, 32, requires_grad=True)
    qw = ternary_weight(w.detach())
    assert torch.equal(lambda_mix(w, qw, 0.0), w) and torch.allclose(lambda_mix(w, qw, 1.0), qw)
    mid = lambda_mix(w, qw, 0.25)
    assert torch.allclose(mid, w + 0.25 * (qw - w))
    mid.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


# ----------------------------------------------------------------------------- progressive form "max"

def _max_form(w, sl, st, t, const_scales=True):
    """Independent reference: Sl * c * tanh(t W/M) * St, c = <W, h>/<h, h>, M = max|W| per row."""
    m = w.abs().amax(1, keepdim=True)
    h = torch.tanh(t * w / (m.detach() if const_scales else m))
    c = (w * h).sum(1, keepdim=True) / (h * h).sum(1, keepdim=True)
    return sl[:, None] * (c.detach() if const_scales else c) * h * st


def test_max_form_ends_and_outliers():
    w, sl, st = _inputs(5, 64)
    with torch.no_grad():
        w[1, 3] = 40 * w[1].abs().mean()  # an outlier row, as in pretrained LLMs
        # t = 0 and t = inf take the paper's code path: identical results
        for t in (0.0, math.inf):
            assert torch.equal(binary_weight(w, sl, st, t, form="max"), binary_weight(w, sl, st, t))
        assert torch.allclose(binary_weight(w, sl, st, 1e-6, form="max"), sl[:, None] * w * st, rtol=1e-9, atol=0)
        hard = binary_weight(w, sl, st, math.inf)
        assert torch.allclose(binary_weight(w, sl, st, 1e8, form="max"), hard, rtol=1e-9, atol=0)  # tanh(t w/M) = 1
        assert torch.allclose(hard, sl[:, None] * analytic_scale(w) * hard_sign(w) * st, rtol=1e-12)
        for t in (0.32, 2.0, 30.0):
            assert torch.allclose(binary_weight(w, sl, st, t, form="max"), _max_form(w, sl, st, t), rtol=1e-12)
        # first chunk: the paper's F clips the outlier to ~Sa/tanh(t); "max" keeps it within a few %
        fp = sl[1] * w[1, 3] * st[3]
        assert binary_weight(w, sl, st, 0.32)[1, 3] < 0.2 * fp
        assert abs(binary_weight(w, sl, st, 0.32, form="max")[1, 3] / fp - 1) < 0.05


@pytest.mark.parametrize("t", [1e-3, 0.5, 3.0, 25.0])
@pytest.mark.parametrize("sa_grad", [False, True])
def test_max_form_gradient_is_autograd_of_the_forward(t, sa_grad):
    w, sl, st = _inputs(seed=1)
    fn = lambda w, sl, st: binary_weight(w, sl, st, t, form="max", sa_grad=sa_grad)  # noqa: E731
    ref = lambda w, sl, st: _max_form(w, sl, st, t, const_scales=not sa_grad)  # noqa: E731
    gy = torch.randn(w.shape, dtype=torch.float64)
    a = torch.autograd.grad((fn(w, sl, st) * gy).sum(), (w, sl, st))
    b = torch.autograd.grad((ref(w, sl, st) * gy).sum(), (w, sl, st))
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    if sa_grad:  # with c and M differentiated too it is the true derivative
        assert torch.autograd.gradcheck(fn, (w, sl, st), eps=1e-6, atol=1e-6)
    # only the latent needing a gradient (Sl, St frozen, as in QAT's St) gives the same values
    (gw,) = torch.autograd.grad((fn(w, sl.detach(), st.detach()) * gy).sum(), (w,))
    assert torch.allclose(gw, a[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_form_dtypes(dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 24, generator=g).to(dtype).requires_grad_(True)
    sl = torch.ones(6, dtype=dtype, requires_grad=True)
    st = (torch.rand(24, generator=g) + 0.5).to(dtype)
    out = binary_weight(w, sl, st, 2.0, form="max")
    assert out.dtype == dtype
    (out.float() * torch.randn(6, 24, generator=g)).sum().backward()
    assert w.grad.dtype == dtype and sl.grad.dtype == dtype
    ref = _max_form(w.detach().double(), sl.detach().double(), st.double(), 2.0)  # computed in fp32 at least
    assert torch.allclose(out.detach().double(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_form_errors():
    w, sl, st = _inputs()
    with pytest.raises(ValueError, match="unknown progressive form"):
        binary_weight(w, sl, st, 1.0, form="nope")
    with pytest.raises(ValueError, match="sa_fixed"):
        binary_weight(w, sl, st, 1.0, form="max", sa_fixed=analytic_scale(w.detach()))
    from binarize.quantizers import ternary_weight

    with pytest.raises(ValueError, match="unknown progressive form"):
        ternary_weight(w, t=1.0, form="nope")


@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_max_form(per_row):
    from binarize.quantizers import progressive_ternary, ternary_scale, ternary_weight

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 40, dtype=torch.float64, generator=g)
    w[2, 5] = 30 * w.abs().mean()  # outlier
    gamma = ternary_scale(w, "absmean", per_row)
    fn = lambda v, t: ternary_weight(v, "absmean", per_row, t, ste=False, form="max")  # noqa: E731
    # ends: identity as t -> 0, RoundClip at t = inf (identical to the paper form there)
    assert torch.allclose(fn(w, 1e-6), w, rtol=1e-9, atol=1e-12)
    assert torch.equal(fn(w, math.inf), ternary_weight(w, "absmean", per_row, math.inf, ste=False))
    rc = (w / gamma).round().clamp(-1, 1) * gamma
    away = ((w / gamma).abs() - 0.5).abs() > 0.05
    assert torch.allclose(fn(w, 1e5)[away], rc[away], atol=1e-9)
    # in between: F3 at the per-row sharpness t gamma / max|W_i|
    t = 2.0
    tr = t * gamma / w.abs().amax(1, keepdim=True)
    gi = gamma.expand(6, 1)
    want = torch.cat([progressive_ternary(w[i:i + 1] / gi[i], float(tr[i])) * gi[i] for i in range(6)])
    assert torch.allclose(fn(w, t), want, rtol=1e-12, atol=1e-15)
    # the first chunk keeps the outlier (the paper's F3 clips it to ~gamma/t)
    assert abs(fn(w, 0.32)[2, 5] / w[2, 5] - 1) < 0.05
    assert ternary_weight(w, "absmean", per_row, 0.32, ste=False)[2, 5] < 0.3 * w[2, 5]
    # consistent: the gradient is autograd's derivative of this forward (gamma and M constant)
    v = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: progressive_ternary(v / gamma, 1.0) * gamma, (v,))
    gy = torch.randn(w.shape, dtype=torch.float64, generator=g)
    (gv,) = torch.autograd.grad((fn(v, t) * gy).sum(), (v,))
    u = v.detach() / gamma
    d = lambda z: 1 - torch.tanh(z) ** 2  # noqa: E731
    g1 = torch.tanh(1.5 * tr) + torch.tanh(0.5 * tr)
    assert torch.allclose(gv, gy * tr * (d(tr * (u + 0.5)) + d(tr * (u - 0.5))) / g1, rtol=1e-10, atol=1e-12)
    assert fn(w.float(), t).dtype == torch.float32 and fn(w.bfloat16(), t).dtype == torch.bfloat16
