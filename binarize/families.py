"""Per-family structure that folding St needs: which norm feeds which linear, and where o_proj's and
down_proj's St can go.

St (BinaryLLM's per-input-channel scale, found by BaI) multiplies a converted linear's input
columns. It can leave the linear only into something linear in front of it:

* a norm whose output only these linears read (q/k/v after ``input_layernorm``): the norm's
  multiplier takes St, once all readers share one St (recipe ``share_st``);
* the value rows feeding o_proj (attention mixes value vectors linearly, so scaling a value row,
  its bias included, scales that column of the attention output), once o_proj's St is one value per
  KV-head column repeated over its query heads;
* the up rows feeding down_proj in a gated MLP (act(gate) * up is linear in up). A plain GELU MLP
  (GPT-NeoX) has no such place: down's St stays explicit there, and GGUF (which has no per-input
  scale) refuses a run whose down St is not 1. MoE experts (``binarize.experts``) keep every
  expert's St explicit: the norm in front of them also feeds the full-precision router.

Names are relative to a decoder block. ``norm_offset`` is the constant a norm adds to its weight:
Gemma's RMSNorm multiplies by (1 + w), so folding St gives w' = (1 + w) * St - 1. A LayerNorm with
a bias (GPT-NeoX) scales its bias too. Fused projections (Phi-3 ``qkv_proj`` / ``gate_up_proj``,
GPT-NeoX ``query_key_value``) fold into a row range of the fused linear (``*_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BinarizeError

Rows = Callable[[object], torch.Tensor | None]  # config -> row indices (None: every row)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _all_rows(cfg) -> None:
    return None


def _phi3_v_rows(cfg) -> torch.Tensor:  # qkv_proj rows: [q (heads), k (kv), v (kv)] x head_dim
    heads, kv, hd = cfg.num_attention_heads, kv_heads(cfg), head_dim(cfg)
    return torch.arange((heads + kv) * hd, (heads + 2 * kv) * hd)


def _phi3_up_rows(cfg) -> torch.Tensor:  # gate_up_proj rows: [gate; up] (Phi3MLP chunks the output in two)
    return torch.arange(cfg.intermediate_size, 2 * cfg.intermediate_size)


def _neox_v_rows(cfg) -> torch.Tensor:  # query_key_value rows: per head [q, k, v] x head_dim
    heads, hd = cfg.num_attention_heads, head_dim(cfg)
    return (torch.arange(heads).view(-1, 1) * 3 * hd + 2 * hd + torch.arange(hd)).reshape(-1)


@dataclass(frozen=True)
class Family:
    """Where St folds in one family's decoder block (names relative to the block)."""

    norm_groups: tuple[tuple[str, tuple[str, ...]], ...]
    o_proj: str
    v_linear: str
    v_rows: Rows
    down_proj: str | None  # None: no single down projection (MoE experts, binarize.experts)
    up_linear: str | None  # None: down's St cannot fold (GELU MLP; MoE)
    up_rows: Rows = _all_rows
    norm_offset: float = 0.0


_LLAMA = Family(norm_groups=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
                o_proj="self_attn.o_proj", v_linear="self_attn.v_proj", v_rows=_all_rows,
                down_proj="mlp.down_proj", up_linear="mlp.up_proj")
_GEMMA = Family(**{**_LLAMA.__dict__, "norm_offset": 1.0})
_GEMMA2 = Family(**{**_GEMMA.__dict__, "norm_groups": (_LLAMA.norm_groups[0],
                                                       ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")))})
# MoE (Mixtral, Qwen2-MoE, Qwen3-MoE): the norm in front of the experts also feeds the FP router, so
# only the attention's St is shared and folded; each expert linear keeps its own explicit St.
_MOE = Family(norm_groups=_LLAMA.norm_groups[:1], o_proj=_LLAMA.o_proj, v_linear=_LLAMA.v_linear, v_rows=_all_rows,
              down_proj=None, up_linear=None)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma": _GEMMA, "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "phi3": Family(norm_groups=(("input_layernorm", ("self_attn.qkv_proj",)),
                                ("post_attention_layernorm", ("mlp.gate_up_proj",))),
                   o_proj="self_attn.o_proj", v_linear="self_attn.qkv_proj", v_rows=_phi3_v_rows,
                   down_proj="mlp.down_proj", up_linear="mlp.gate_up_proj", up_rows=_phi3_up_rows),
    "gpt_neox": Family(norm_groups=(("input_layernorm", ("attention.query_key_value",)),
                                    ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
                       o_proj="attention.dense", v_linear="attention.query_key_value", v_rows=_neox_v_rows,
                       down_proj="mlp.dense_4h_to_h", up_linear=None),
    "mixtral": _MOE, "qwen2_moe": _MOE, "qwen3_moe": _MOE,
}


def family_of(config) -> Family:
    """The fold structure of ``config.model_type``; raises BinarizeError for a family not described."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise BinarizeError(f"no St-folding description for architecture {model_type!r} "
                            f"(described: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


@torch.no_grad()
def fold_into_norm_(norm: torch.nn.Module, st: torch.Tensor, offset: float) -> None:
    """norm's output times St, in place: multiplier (offset + w) -> (offset + w) * St; a bias too."""
    if torch.all(st == 1):
        return
    w = norm.weight
    w.copy_(((offset + w.float()) * st - offset).to(w.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.mul_(st.to(bias.dtype))


def kv_tie(config) -> tuple[int, int]:
    """(query heads per KV head, head_dim): o_proj's St is one value per KV-head column."""
    return config.num_attention_heads // kv_heads(config), head_dim(config)
