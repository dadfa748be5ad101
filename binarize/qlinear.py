"""QuantLinear and the torchao-style module swap: ``quantize_(model, recipe)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .models import target_linears
from .quantizers import analytic_scale, binary_weight


class QuantLinear(nn.Module):
    """A binary linear layer: y = (Sl * Sa * F(W~/Sa, t) * St) x.

    Before BaI finishes, ``weight`` holds the original W and the latent is W / St (so St
    is searched with W frozen); ``fold_st()`` then stores W~ = W / St as the weight that
    QAT trains. St is applied on the weight's input columns rather than on x, which is the
    same product but saves an activation copy per layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 ste: bool = False, sa_grad: bool = False, st_min: float = 1e-2):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.st = nn.Parameter(torch.ones(in_features), requires_grad=False)
        self.sl = nn.Parameter(torch.ones(out_features))
        self.register_buffer("sa_fixed", None)  # set for the "learnable" (Sl-only) scaling
        self.ste, self.sa_grad, self.st_min = ste, sa_grad, st_min
        self.t = math.inf  # hard sign unless a schedule says otherwise
        self.folded = True

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, **kw)
        q.weight = nn.Parameter(lin.weight.detach().float().clone())
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().float().clone())
        q.folded = False
        return q

    def scale_in(self) -> torch.Tensor:
        return self.st.clamp_min(self.st_min)

    def latent(self) -> torch.Tensor:
        return self.weight if self.folded else self.weight / self.scale_in()

    def effective_weight(self) -> torch.Tensor:
        return binary_weight(
            self.latent(), self.sl, self.scale_in(), self.t,
            ste=self.ste and not math.isinf(self.t),
            sa_grad=self.sa_grad or not self.folded,
            sa_fixed=self.sa_fixed,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            st = self.scale_in().half().float()
            self.weight.copy_(self.weight / st)
            self.st.copy_(st)
            self.folded = True

    @torch.no_grad()
    def use_learnable_scale(self) -> None:
        """Sl-only scaling: freeze Sa at its current value and let Sl (= Sa) learn from there."""
        self.sa_fixed = analytic_scale(self.weight.float()).detach()
        self.sl.copy_(self.sa_fixed.view(-1))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, t={self.t:.3g}, ste={self.ste}"


def quantize_(model: nn.Module, *, ste: bool = False, sa_grad: bool = False, st_min: float = 1e-2) -> list[str]:
    """Swap every linear in the decoder blocks for a QuantLinear, in place; returns their names."""
    names = []
    for name, lin in target_linears(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_linear(lin, ste=ste, sa_grad=sa_grad, st_min=st_min))
        names.append(name)
    return names


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_t(model: nn.Module, t: float) -> None:
    for m in quant_layers(model).values():
        m.t = t


@torch.no_grad()
def unswap_(model: nn.Module) -> None:
    """Replace each QuantLinear by a plain nn.Linear holding its hard-sign effective weight."""
    for name, q in quant_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        q.t = math.inf
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        lin.weight.copy_(q.effective_weight())
        if q.bias is not None:
            lin.bias.copy_(q.bias)
        setattr(model.get_submodule(parent_name), child, lin)
