"""The llama.cpp architectures the GGUF writer maps, one entry per transformers ``model_type``.

Each entry says what llama.cpp's own converter (``convert_hf_to_gguf.py``) does for that family,
so that upstream llama.cpp runs the file as the original:

* ``llama`` / ``mistral`` -> llama: q/k rows permuted into llama.cpp's interleaved rotary pairs;
  Mistral's sliding window is not a llama key (llama.cpp attends to the whole context: the same
  logits within the first ``sliding_window`` tokens; the report says so).
* ``qwen2`` -> qwen2 (q/k/v biases in F32), ``qwen3`` -> qwen3 (per-head q/k norms): NeoX rotary
  halves, no permutation.
* ``gemma`` -> gemma: RMSNorm multiplies by (1 + w), which the GGUF stores whole (llama.cpp adds
  nothing); embeddings are scaled by sqrt(hidden) in llama.cpp as in transformers; tied head only.
* ``phi3`` -> phi3: fused ``qkv_proj`` / ``gate_up_proj`` as ``attn_qkv`` / ``ffn_up``; partial
  rotary as the rope dimension count; LongRoPE (``rope_factors_*``) is refused.
* ``gpt_neox`` -> gptneox: ``query_key_value``'s per-head [q, k, v] rows regrouped into [q; k; v]
  (weights and biases), LayerNorm with bias, parallel residual flag, partial rotary.

* ``gemma2`` -> gemma2 and ``gemma3_text`` -> gemma3: (1 + w) norms as for Gemma, the extra
  post-attention / pre- and post-feed-forward norms under llama.cpp's names, the sliding window
  and, per layer, which layers slide (the ``sliding_window_pattern`` array written from
  ``config.layer_types``, so no default pattern is assumed), Gemma 2's attention and final logit
  soft-capping, Gemma 3's per-head q/k norms and its sliding layers' rotary base
  (``rope.freq_base_swa``). llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads)
  at the 27B layer counts) rather than reading ``query_pre_attn_scalar``: a config whose scalar
  differs is refused, as are Gemma 3 attention soft-capping (llama.cpp's gemma3 has none) and
  rope scaling on its sliding layers. Gemma 2 has a tied head only.

Mixture-of-experts models are not mapped: refused with a line naming the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BinarizeError
from ..families import head_dim, kv_heads


def rope_params(config, layer_type: str = "full_attention") -> dict:
    """The rotary parameters (theta, type, scaling) of ``layer_type``'s layers; a config that keeps one
    set per layer type (Gemma 3: ``{"full_attention": ..., "sliding_attention": ...}``) gives that set."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rotary_dim(config) -> int:
    return int(head_dim(config) * rope_params(config).get("partial_rotary_factor", 1.0))


def _neox_qkv_rows(config) -> torch.Tensor:
    """Row order taking GPT-NeoX's per-head [q, k, v] blocks to llama.cpp's [q; k; v]."""
    heads, hd = config.num_attention_heads, head_dim(config)
    return torch.arange(3 * heads * hd).view(heads, 3, hd).transpose(0, 1).reshape(-1)


@dataclass(frozen=True)
class GGUFArch:
    """How one family goes into a GGUF (``name``: gguf's MODEL_ARCH member)."""

    name: str
    permute_qk: bool = False
    norm_eps: str = "rms"  # "rms": rms_norm_eps, "layer": layer_norm_eps (LayerNorm with bias)
    tied_only: bool = False
    row_order: dict[str, Callable] | None = None  # linear suffix -> config -> row permutation
    rope_types: tuple[str, ...] = ("default", "linear")


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LLAMA", permute_qk=True, rope_types=("default", "linear", "llama3")),
    "mistral": GGUFArch("LLAMA", permute_qk=True, rope_types=("default", "linear", "llama3")),
    "qwen2": GGUFArch("QWEN2"),
    "qwen3": GGUFArch("QWEN3"),
    "gemma": GGUFArch("GEMMA", tied_only=True),
    "gemma2": GGUFArch("GEMMA2", tied_only=True),
    "gemma3_text": GGUFArch("GEMMA3"),
    "phi3": GGUFArch("PHI3", rope_types=("default",)),
    "gpt_neox": GGUFArch("GPTNEOX", norm_eps="layer", row_order={"attention.query_key_value": _neox_qkv_rows}),
}


def arch_of(config) -> GGUFArch:
    """The entry for ``config.model_type``; one line naming the family when it has none."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise BinarizeError(f"the GGUF writer does not map the {model_type!r} family (mapped: "
                            f"{', '.join(ARCHS)}); export it as binary / ternary / bitnet instead")
    arch = ARCHS[model_type]
    rope = rope_params(config)["rope_type"]
    if rope not in arch.rope_types:
        raise BinarizeError(f"rope scaling {rope!r} is not mapped by the GGUF writer for {model_type} "
                            f"({', '.join(arch.rope_types)})")
    if arch.name in _GEMMA_SWA:
        _check_gemma(config, arch)
    return arch


_GEMMA_SWA = {"GEMMA2": 46, "GEMMA3": 62}  # llama.cpp architecture -> the layer count it treats as 27B


def _check_gemma(config, arch: GGUFArch) -> None:
    """What llama.cpp's gemma2 / gemma3 fix rather than read (see the module docstring)."""
    hd, layers = head_dim(config), config.num_hidden_layers
    scale = config.hidden_size // config.num_attention_heads if layers == _GEMMA_SWA[arch.name] else hd
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != scale:
        raise BinarizeError(f"llama.cpp's {arch.name.lower()} scales queries by 1/sqrt({scale}) for this shape; "
                            f"this model's query_pre_attn_scalar is {scalar}")
    if arch.name == "GEMMA3" and getattr(config, "attn_logit_softcapping", None):
        raise BinarizeError("llama.cpp's gemma3 has no attention logit soft-capping; this model sets "
                            f"attn_logit_softcapping = {config.attn_logit_softcapping}")
    sliding_rope = rope_params(config, "sliding_attention")["rope_type"]
    if arch.name == "GEMMA3" and sliding_rope != "default":
        raise BinarizeError(f"llama.cpp's gemma3 has no rope scaling on sliding-window layers; this model's is "
                            f"{sliding_rope!r}")


def write_hparams(writer, config, name: str, arch: GGUFArch) -> list[str]:
    """Every key llama.cpp reads for this architecture; returns notes for the report."""
    from .gguf_q1 import _gguf

    gguf = _gguf()
    rope, hd = rope_params(config), head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    if arch.norm_eps == "layer":
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(rotary_dim(config))
    if hd != config.hidden_size // config.num_attention_heads or arch.name.startswith("GEMMA"):
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope["rope_type"] == "llama3":  # the frequencies are the rope_freqs tensor; this names the parameters' context
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_vocab_size(config.vocab_size)
    notes = []
    window = getattr(config, "sliding_window", None)
    if arch.name in _GEMMA_SWA:
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if arch.name == "GEMMA3":
            writer.add_rope_freq_base_swa(float(rope_params(config, "sliding_attention")["rope_theta"]))
        if window:
            types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
            writer.add_sliding_window(int(window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    elif window and window < config.max_position_embeddings and (
            getattr(config, "use_sliding_window", True) is not False):
        if arch.name == "PHI3":
            writer.add_sliding_window(int(window))
        else:
            notes.append(f"the {config.model_type} sliding window ({window} tokens) has no key in llama.cpp's "
                         f"{arch.name.lower()} architecture: same logits up to {window} tokens of context")
    return notes
