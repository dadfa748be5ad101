"""compile_quantizer (compiled_quantizers.py): the composed form equals quantizers.py, value and gradient,
and torch.compile of it gives the same numbers on CPU."""

import math

import pytest
import torch

from binarize.compiled_quantizers import (binary_weight_composed, compiled_binary_weight, compiled_ternary_weight,
                                          ternary_weight_composed)
from binarize.errors import BinarizeError
from binarize.quantizers import binary_weight, ternary_weight
from binarize.recipe import load_recipe


def _leaves(dtype, seed=0, n=12, k=20):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g, dtype=dtype) * 0.05)
    w[0, 3] = 0.9  # an outlier, as pretrained rows have
    sl = 1 + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    st = 0.5 + torch.rand(k, generator=g, dtype=dtype)
    grad = torch.randn(n, k, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (w, sl, st)], grad


def _value_and_grads(fn, leaves, grad):
    out = fn(*leaves)
    gs = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]


CASES = [(0.0, False), (0.72, False), (20.0, False), (math.inf, False), (0.72, True)]


@pytest.mark.parametrize("t,ste", CASES)
@pytest.mark.parametrize("sa", ["constant", "sa_grad", "fixed"])
def test_composed_binary_form_equals_the_fused_quantizer(t, ste, sa):
    leaves, grad = _leaves(torch.float64)
    fixed = leaves[0].detach().abs().mean(dim=1, keepdim=True) * 1.3 if sa == "fixed" else None
    mode = "ste" if ste else ("hard" if math.isinf(t) else "identity" if t == 0 else "progressive")
    tt = torch.tensor(0.0 if math.isinf(t) else t, dtype=torch.float64)
    want = _value_and_grads(lambda w, sl, st: binary_weight(w, sl, st, t, ste=ste, sa_grad=sa == "sa_grad",
                                                           sa_fixed=fixed), leaves, grad)
    got = _value_and_grads(lambda w, sl, st: binary_weight_composed(w, sl, st, tt, mode, sa == "sa_grad", fixed),
                           leaves, grad)
    for a, b in zip([want[0], *want[1]], [got[0], *got[1]]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    if not math.isinf(t) or sa == "sa_grad" or ste:  # the hard sign alone passes nothing to W~
        assert want[1][0].abs().sum() > 0


@pytest.mark.parametrize("t", [0.0, 0.72, 6.0, math.inf])
@pytest.mark.parametrize("per_row", [False, True])
def test_composed_ternary_form_equals_the_quantizer(t, per_row):
    leaves, grad = _leaves(torch.float64, seed=1)
    mode = "ste" if math.isinf(t) else ("identity" if t == 0 else "progressive")
    tt = torch.tensor(0.0 if math.isinf(t) else t, dtype=torch.float64)

    def eager(w, sl, st):
        return sl.view(-1, 1) * ternary_weight(w, "absmean", per_row, t, ste=True) * st

    want = _value_and_grads(eager, leaves, grad)
    got = _value_and_grads(lambda w, sl, st: ternary_weight_composed(w, sl, st, tt, mode, "absmean", per_row),
                           leaves, grad)
    for a, b in zip([want[0], *want[1]], [got[0], *got[1]]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_torch_compile_of_the_quantizer_gives_the_same_values_and_gradients():
    leaves, grad = _leaves(torch.float32, seed=2)
    other, _ = _leaves(torch.float32, seed=3, n=8, k=36)  # another layer shape: the same dynamic graph
    for t, ste, shapes in [(0.72, False, 2), (3.5, False, 1), (math.inf, False, 1), (0.0, True, 1)]:
        for ls, g in ((leaves, grad), (other, torch.ones(8, 36)))[:shapes]:  # one graph, two layer shapes
            want = _value_and_grads(lambda w, sl, st: binary_weight(w, sl, st, t, ste=ste), ls, g)
            got = _value_and_grads(lambda w, sl, st: compiled_binary_weight(w, sl, st, t, ste=ste), ls, g)
            for a, b in zip([want[0], *want[1]], [got[0], *got[1]]):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (t, ste)
    want = _value_and_grads(lambda w, sl, st: sl.view(-1, 1) * ternary_weight(w, "absmean", True, 0.72, ste=True)
                            * st, leaves, grad)
    got = _value_and_grads(lambda w, sl, st: compiled_ternary_weight(w, sl, st, 0.72, ste=False, method="absmean",
                                                                     per_row=True), leaves, grad)
    for a, b in zip([want[0], *want[1]], [got[0], *got[1]]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compile_quantizer_is_a_recipe_key_and_refuses_the_max_form():
    assert load_recipe("binaryllm", {"compile_quantizer": True}).compile_quantizer
    with pytest.raises(BinarizeError, match="compile_quantizer compiles the paper form only"):
        load_recipe("binaryllm", {"compile_quantizer": True, "progressive_form": "max"})


def test_a_model_trains_the_same_with_the_compiled_quantizer(method="binary"):  # ternary: function level above
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from binarize.qlinear import LayerSpec, quant_layers, quantize_, set_t

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 64, (2, 16))
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        quantize_(model, LayerSpec(method=method, compiled=compiled))
        for q in quant_layers(model).values():
            q.fold_st()
        set_t(model, 1.83)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5) and g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n
