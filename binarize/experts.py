"""Mixture-of-experts weights as linears, so every expert converts like any other linear.

transformers 5 keeps a MoE block's experts as two stacked 3-D parameters (``MixtralExperts``,
``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ...)::

    gate_up_proj  (experts, 2 * intermediate, hidden)   rows [gate; up] of each expert
    down_proj     (experts, hidden, intermediate)

``unstack_experts_`` replaces such a module by ``LinearExperts``, which holds the same numbers as
one ``nn.Linear`` per expert and projection (``gate_up_proj.<e>``: hidden -> 2 * intermediate,
``down_proj.<e>``: intermediate -> hidden) and runs transformers' eager expert loop on them. Each
expert linear then becomes a QuantLinear (latent W~, Sa / Sl per output row of that expert, St
per input column of that expert), is packed as its own layer and loads back the same way.

Kept in full precision (a choice: they are a tiny share of the weights, and a quantized router
would send tokens to other experts than the ones trained on them): the router (``gate``: a 2-D
parameter of a ``TopKRouter`` module in transformers 5, an ``nn.Linear`` named ``gate`` or
``router`` in older layouts) and Qwen-MoE's ``shared_expert_gate`` (one sigmoid gate per token).
The shared expert of Qwen-MoE is a plain MLP and converts as one.

Choices written here:

* St is not shared or folded for experts: the norm in front of the experts also feeds the
  router, so St stays an explicit per-input-column scale of each expert linear (the packed
  format stores it); GGUF export of MoE families is refused by name.
* Only the layout transformers calls concatenated, untransposed, gated and bias-free (the
  default of ``use_experts_implementation``) is unstacked; any other (GPT-OSS's interleaved
  biased experts, DBRX) keeps its 3-D tensors and ``target_linears`` refuses it with one line.
"""

from __future__ import annotations

import torch
from torch import nn

MOE_REFUSAL = ("transformers' BitNet format reads {model_type}'s experts as stacked tensors and cannot hold one "
               "packed linear per expert; use --export binary / ternary")
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})  # linears that route: kept in full precision


def _unstackable(mod: nn.Module) -> bool:
    gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3 and hasattr(mod, "act_fn")
            and gate_up.shape[0] == down.shape[0] and gate_up.shape[2] == down.shape[1]
            and gate_up.shape[1] == 2 * down.shape[2]
            and getattr(mod, "is_concatenated", True) and not getattr(mod, "is_transposed", False)
            and getattr(mod, "has_gate", True) and not getattr(mod, "has_bias", False)
            and not getattr(mod, "has_post_expert_norm", False))


class LinearExperts(nn.Module):
    """One ``nn.Linear`` per expert and projection, numerically transformers' eager expert loop.

    ``forward(hidden_states (tokens, hidden), top_k_index (tokens, k) int64,
    top_k_weights (tokens, k))`` -> (tokens, hidden): each token's output is the sum over its k
    experts of weight * down(act(gate) * up), with ``gate, up = gate_up(x).chunk(2)``.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts = num_experts
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_up_proj = nn.ModuleList(nn.Linear(hidden, 2 * intermediate, **kw) for _ in range(num_experts))
        self.down_proj = nn.ModuleList(nn.Linear(intermediate, hidden, **kw) for _ in range(num_experts))
        self.act_fn = act_fn

    @classmethod
    @torch.no_grad()
    def from_stacked(cls, mod: nn.Module) -> LinearExperts:
        experts, two_i, hidden = mod.gate_up_proj.shape
        new = cls(experts, hidden, two_i // 2, mod.act_fn, device=mod.gate_up_proj.device,
                  dtype=mod.gate_up_proj.dtype)
        if mod.gate_up_proj.device.type != "meta":
            for e in range(experts):
                new.gate_up_proj[e].weight.copy_(mod.gate_up_proj[e])
                new.down_proj[e].weight.copy_(mod.down_proj[e])
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < self.num_experts)]).tolist()
        for e in hit:
            token_idx, k_pos = torch.where(top_k_index == e)
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unstack_experts_(model: nn.Module) -> int:
    """Replace every stacked experts module of the known layout by ``LinearExperts``, in place
    (weights copied; a meta-device model stays on meta). Returns how many were replaced; idempotent."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if not isinstance(mod, LinearExperts) and _unstackable(mod)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LinearExperts.from_stacked(mod))
    return len(targets)


def has_moe_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds experts, stacked (as loaded) or unstacked."""
    return any(isinstance(m, LinearExperts) or _unstackable(m) for m in model.modules())
