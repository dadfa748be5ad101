"""Weight fake-quantizers: one object per method, chosen once per layer and held by QuantLinear.

As torchao's ``FakeQuantizedLinear`` holds its weight fake-quantizer, a ``QuantLinear`` holds one
``WeightQuantizer`` and never branches on the method itself. A quantizer maps the layer's latent
weight and scales to (a) the differentiable effective weight used in training and (b) the export
view (integer codes plus one merged scale per output row). The math itself lives in
``quantizers.py``; this module only selects and wires it.

Adding a method: write its math in ``quantizers.py``, a ``WeightQuantizer`` subclass here, and
one entry in ``WEIGHT_QUANTIZERS`` (the key is the recipe's ``method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .compiled_quantizers import compiled_binary_weight, compiled_ternary_weight
from .errors import BinarizeError
from .quantizers import binary_codes, binary_weight, ternary_codes, ternary_weight


@dataclass(frozen=True)
class LayerSpec:
    """What each swapped layer computes (the recipe's per-layer part)."""

    method: str = "binary"  # binary | ternary
    ste: bool = False  # hard quantizer with a straight-through backward from step 0
    sa_grad: bool = False
    st_min: float = 1e-2
    ternary_scale: str = "absmean"  # absmean | absmedian
    per_row: bool = False  # ternary gamma per output row instead of per tensor
    act_bits: int = 0  # 0: full-precision activations; 8: BitLinear per-token absmax int8
    form: str = "paper"  # progressive form for 0 < t < inf (quantizers.PROGRESSIVE_FORMS)
    compiled: bool = False  # the paper form through torch.compile (compiled_quantizers.py)

    @classmethod
    def from_recipe(cls, r) -> LayerSpec:
        return cls(method=r.method, ste=r.quantizer == "ste", sa_grad=r.sa_grad, st_min=r.st_min,
                   ternary_scale=r.ternary_scale, per_row=r.per_row, act_bits=r.act_bits, form=r.progressive_form,
                   compiled=r.compile_quantizer)


class WeightQuantizer:
    """Base: ``weight(...)`` is the fake-quantized weight, ``codes(...)`` its export view.

    Shapes: ``latent`` (out, in) latent weight W~; ``sl`` (out,) learnable row scale;
    ``st`` (in,) per-input-channel scale (already clamped and expanded); ``sa_fixed`` (out, 1)
    frozen analytic scale for Sl-only scaling, else None. ``ste``: hard quantizer with a
    straight-through backward; ``sa_grad``: let the gradient flow through the analytic scale. Both
    are the layer's current flags (a test or a schedule may change them on a live layer).
    """

    method = ""

    def __init__(self, spec: LayerSpec):
        self.spec = spec

    def weight(self, latent: torch.Tensor, sl: torch.Tensor, st: torch.Tensor, t: float, *, ste: bool = False,
               sa_grad: bool = False, sa_fixed: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def codes(self, latent: torch.Tensor, sl: torch.Tensor,
              sa_fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (out, in) in {-1, 0, +1}, merged per-row scale (out,)): the hard-quantizer weight
        is exactly ``dequantize(codes, scale, st)``."""
        raise NotImplementedError


class BinaryWeightQuantizer(WeightQuantizer):
    """BinaryLLM (arXiv 2508.06974): W_eff = Sl * Sa * F(W~/Sa, t) * St, Sa = per-row mean|W~|.

    The layer asks for ``sa_grad`` before BaI has folded St into the latent, so the gradient
    reaches St through Sa too (there the loss as a function of St includes Sa's dependence on it).
    """

    method = "binary"

    def weight(self, latent, sl, st, t, *, ste=False, sa_grad=False, sa_fixed=None):
        if self.spec.compiled and self.spec.form == "paper":
            return compiled_binary_weight(latent, sl, st, t, ste=ste and not math.isinf(t), sa_grad=sa_grad,
                                          sa_fixed=sa_fixed)
        return binary_weight(latent, sl, st, t, ste=ste and not math.isinf(t), sa_grad=sa_grad, sa_fixed=sa_fixed,
                             form=self.spec.form)

    def codes(self, latent, sl, sa_fixed=None):
        return binary_codes(latent, sl, sa_fixed)


class TernaryWeightQuantizer(WeightQuantizer):
    """BitNet b1.58 (arXiv 2402.17764; AbsMedian: arXiv 2407.09527): W_eff = Sl * gamma *
    Q(W~/gamma, t) * St with gamma = mean or median |W~| (per tensor or per row) and Q the
    progressive F3 or, at t = inf, RoundClip with a straight-through backward."""

    method = "ternary"

    def weight(self, latent, sl, st, t, *, ste=False, sa_grad=False, sa_fixed=None):
        if self.spec.compiled and self.spec.form == "paper":
            return compiled_ternary_weight(latent, sl, st, t, ste=ste, method=self.spec.ternary_scale,
                                           per_row=self.spec.per_row)
        w = ternary_weight(latent, self.spec.ternary_scale, self.spec.per_row, t, ste=ste or math.isinf(t),
                           form=self.spec.form)
        return (sl.view(-1, 1) * w * st).to(latent.dtype)

    def codes(self, latent, sl, sa_fixed=None):
        codes, gamma = ternary_codes(latent, self.spec.ternary_scale, self.spec.per_row)
        scale = sl.to(gamma.dtype).view(-1, 1) * gamma
        return codes, scale.expand(latent.shape[0], 1).reshape(-1)


WEIGHT_QUANTIZERS: dict[str, type[WeightQuantizer]] = {
    BinaryWeightQuantizer.method: BinaryWeightQuantizer,
    TernaryWeightQuantizer.method: TernaryWeightQuantizer,
}


def weight_quantizer(spec: LayerSpec) -> WeightQuantizer:
    """The quantizer object for ``spec.method``; an unknown method is a BinarizeError."""
    try:
        return WEIGHT_QUANTIZERS[spec.method](spec)
    except KeyError:
        raise BinarizeError(f"unknown method {spec.method!r} (known: {', '.join(WEIGHT_QUANTIZERS)})") from None
