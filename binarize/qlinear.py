"""QuantLinear, the torchao-style module swap ``quantize_(model, LayerSpec)``, and ``prepare``.

``prepare(model, recipe)`` is the one recipe-to-model setup: conversion calls it on the
full-precision model before BaI, and loading a run calls it on an empty model before reading the
weights (torchao's QAT prepare/convert symmetry); ``finish_init`` then puts the layers in their
trained state (St folded into the latent, Sl-only scaling when the recipe asks for it).

A QuantLinear holds its weight fake-quantizer (``fake_quant.WeightQuantizer``), chosen once from
the method; a new quantizer goes into ``quantizers.py`` (math) and ``fake_quant.py`` (selection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .families import family_of, kv_tie
from .fake_quant import LayerSpec, weight_quantizer
from .models import convertible_linears, decoder_layers
from .quantizers import analytic_scale, lambda_mix, quantize_activations_int8


class QuantLinear(nn.Module):
    """A quantized linear layer: y = (Sl * S * Q(W~/S, t) * St) x.

    Binary (BinaryLLM): S = Sa = mean|W~| per row and Q = F(., t). Ternary (BitNet b1.58):
    S = gamma (AbsMean or AbsMedian, per tensor or per row) and Q = F3(., t) or RoundClip.
    Before BaI finishes, ``weight`` holds the original W and the latent is W / St (so St
    is searched with W frozen); ``fold_st()`` then stores W~ = W / St as the weight that
    QAT trains. St is applied on the weight's input columns rather than on x, which is the
    same product but saves an activation copy per layer.

    ``lam`` is the continual switch's quantization strength (seed 000): 0 runs the
    full-precision weight W~ * St, 1 the quantized one, in between w + lam (q(w) - w) with the
    difference detached. With 8-bit activations the same lam phases activation quantization in.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, spec: LayerSpec = LayerSpec()):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.st = nn.Parameter(torch.ones(in_features), requires_grad=False)
        self.sl = nn.Parameter(torch.ones(out_features))
        self.register_buffer("sa_fixed", None)  # set for the "learnable" (Sl-only) scaling
        self.spec = spec
        self.weight_quantizer = weight_quantizer(spec)
        self.ste, self.sa_grad, self.st_min = spec.ste, spec.sa_grad, spec.st_min
        self.t = math.inf  # hard quantizer unless a schedule says otherwise
        self.lam = 1.0
        self.folded = True
        self.st_groups: tuple[int, int] | None = None  # (heads per KV head, head_dim): St tied per KV group

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, **kw)
        q.weight = nn.Parameter(lin.weight.detach().float().clone())
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().float().clone())
        q.folded = False
        return q

    def scale_in(self) -> torch.Tensor:
        """St over the input columns (expanded from one value per KV-head column when tied)."""
        st = self.st.clamp_min(self.st_min)
        if self.st_groups is None:
            return st
        groups, head_dim = self.st_groups
        return st.view(-1, 1, head_dim).expand(-1, groups, head_dim).reshape(-1)

    def latent(self) -> torch.Tensor:
        return self.weight if self.folded else self.weight / self.scale_in()

    def full_precision_weight(self) -> torch.Tensor:
        return self.latent() * self.scale_in() if self.folded else self.weight

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer.weight(self.latent(), self.sl, self.scale_in(), self.t, ste=self.ste,
                                            sa_grad=self.sa_grad or not self.folded, sa_fixed=self.sa_fixed)

    def effective_weight(self) -> torch.Tensor:
        if self.lam <= 0:
            return self.full_precision_weight()
        if self.lam >= 1:
            return self.quantized_weight()
        return lambda_mix(self.full_precision_weight(), self.quantized_weight(), self.lam)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Export view at the hard quantizer: (codes, merged per-row scale); the effective
        weight is exactly ``dequantize(codes, scale, St)``."""
        return self.weight_quantizer.codes(self.latent().detach(), self.sl.detach(), self.sa_fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.act_bits == 8 and self.lam > 0:
            xq = quantize_activations_int8(x)
            x = xq if self.lam >= 1 else lambda_mix(x, xq, self.lam)
        w = self.effective_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def fold_st(self) -> None:
        """End of BaI: the latent becomes W / St and St is frozen (recipe: train_st).

        St is rounded to the nearest fp16 first, so the packed export can store it in 16 bits
        and still give back this layer's weights exactly (the rounding is ~5e-4 relative and
        is absorbed by the latent, which is divided by the rounded value).
        """
        if not self.folded:
            self.round_st_()  # idempotent: shared St rounds once
            self.weight.copy_(self.weight / self.scale_in())
            self.folded = True

    @torch.no_grad()
    def round_st_(self) -> None:
        """St clamped to st_min and rounded to the nearest fp16, the value the packed export stores."""
        self.st.copy_(self.st.clamp_min(self.st_min).half().float())

    @torch.no_grad()
    def use_learnable_scale(self) -> None:
        """Sl-only scaling: freeze Sa at its current value and let Sl (= Sa) learn from there."""
        self.sa_fixed = analytic_scale(self.weight.float()).detach()
        self.sl.copy_(self.sa_fixed.view(-1))

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, {self.spec.method}, t={self.t:.3g}, ste={self.ste}, "
                f"lam={self.lam:.3g}, act_bits={self.spec.act_bits}")


def quantize_(model: nn.Module, spec: LayerSpec = LayerSpec()) -> list[str]:
    """Swap every linear in the decoder blocks for a QuantLinear, in place; returns their names."""
    names = []
    for name, lin in convertible_linears(model).items():  # MoE experts unstacked first (binarize.experts)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_linear(lin, spec=spec))
        names.append(name)
    return names


def share_st_(model: nn.Module) -> None:
    """Tie St so that export can fold it away (recipe ``share_st``): the linears that read one norm
    share one St (q/k/v -> input_layernorm, gate/up -> the MLP's norm; a fused qkv / gate_up is one
    linear already), and o_proj's St is one value per column of a KV head, repeated over the query
    heads of that group (folds into the value rows). down_proj keeps its own (folds into the up rows
    where the MLP is gated). Where each family's St goes: ``binarize.families``. Call before BaI,
    while every St is 1."""
    family = family_of(model.config)
    groups, head_dim = kv_tie(model.config)
    for block in decoder_layers(model):
        for _, names in family.norm_groups:
            readers = [block.get_submodule(n) for n in names]
            for q in readers[1:]:
                q.st = readers[0].st
        o = block.get_submodule(family.o_proj)
        o.st = nn.Parameter(torch.ones(o.in_features // groups, device=o.weight.device), requires_grad=False)
        o.st_groups = (groups, head_dim)


def prepare(model: nn.Module, recipe) -> list[str]:
    """The recipe's quantized layers in ``model``, in place: every decoder-block linear becomes a
    QuantLinear (``quantize_``) and St is tied when the recipe says ``share_st``. Used by
    conversion (before BaI) and by loading a run (before reading its weights); returns the names."""
    names = quantize_(model, LayerSpec.from_recipe(recipe))
    if recipe.share_st:
        share_st_(model)
    return names


def finish_init(model: nn.Module, recipe, *, from_file: bool = False) -> None:
    """After BaI (or in its place): every layer holds its latent W~ = W / St (``fold_st``; a no-op
    where BaI already folded) or, ``from_file``, is marked folded because its trained weights are
    about to be read from a run or checkpoint. Then Sl-only scaling (``scaling: learnable``)
    freezes Sa. Nothing here draws random numbers."""
    for q in quant_layers(model).values():
        if from_file:
            q.folded = True
        else:
            q.fold_st()
    if recipe.scaling == "learnable":
        for q in quant_layers(model).values():
            q.use_learnable_scale()


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_t(model: nn.Module, t: float, lam: float = 1.0) -> None:
    """The progressive sharpness t and the continual switch's strength lam, for every layer."""
    for m in quant_layers(model).values():
        m.t, m.lam = t, lam


@torch.no_grad()
def unswap_(model: nn.Module) -> None:
    """Replace each QuantLinear by a plain nn.Linear holding its hard-quantizer effective weight
    (weights only: 8-bit activations are not kept by a plain nn.Linear)."""
    for name, q in quant_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        q.t, q.lam = math.inf, 1.0
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        lin.weight.copy_(q.effective_weight())
        if q.bias is not None:
            lin.bias.copy_(q.bias)
        setattr(model.get_submodule(parent_name), child, lin)
