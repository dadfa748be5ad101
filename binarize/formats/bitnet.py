"""``binarize export --format bitnet``: a ternary model in transformers' own BitNet layout.

The output loads with stock ``transformers`` (``quant_method: "bitnet"``, offline BitLinear), no
binarize needed: each converted linear becomes ``weight`` (uint8, four 2-bit codes per byte along
the output dimension, packed by transformers' ``pack_weights``) and ``weight_scale`` = 1/gamma,
and BitLinear quantizes activations to int8 per token as our ``act_bits: 8`` does.

That layout has one scale per tensor and no input-channel scale, so only models whose every
layer has a single merged scale, St = 1 and 8-bit activations fit (the bitnet-b158 recipes, and
continual-16to158); anything else is refused with the reason rather than exported approximately.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..checkpoint import atomic_dir, check_output_dir, write_json
from ..errors import BinarizeError
from ..experts import MOE_REFUSAL, has_moe_experts
from ..qlinear import quant_layers
from .latent import load_converted, require_run_dir
from .outer import cast_outer_, keep_fp32_compute
from .outer import outer_dtype as outer_dtype_of
from .registry import BITNET_FIT as FIT
from .registry import Exported


class _BitLinearWeights(nn.Module):
    """What transformers' BitLinear reads from a checkpoint: packed codes and one scale."""

    def __init__(self, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)


def check_bitnet_fit(model, meta: dict) -> None:
    """Refuse models the BitNet layout cannot hold exactly (one clear reason)."""
    if meta.get("method") != "ternary":
        raise BinarizeError(f"the bitnet format holds ternary models; this run is {meta.get('method')!r} ({FIT})")
    if meta.get("act_bits", 0) != 8:
        raise BinarizeError(f"transformers' BitLinear always quantizes activations to 8 bits; this run was trained "
                            f"with act_bits={meta.get('act_bits', 0)} ({FIT})")
    if has_moe_experts(model):
        raise BinarizeError(MOE_REFUSAL.format(model_type=model.config.model_type))
    for name, q in quant_layers(model).items():
        _, scale = q.codes()
        if not torch.all(scale == scale[0]):
            raise BinarizeError(f"the bitnet format holds one scale per tensor; {name} has one per row ({FIT})")
        if not torch.all(q.scale_in() == 1):
            raise BinarizeError(f"the bitnet format has no input-channel scale; {name} has St != 1 ({FIT})")
        if q.out_features % 4:
            raise BinarizeError(f"the bitnet format packs 4 rows per byte; {name} has {q.out_features} rows")


@torch.no_grad()
def to_bitnet_(model) -> list[str]:
    """Swap each QuantLinear for BitLinear's stored tensors; returns the converted layer names."""
    from transformers.integrations.bitnet import pack_weights
    from transformers.utils.quantization_config import BitNetQuantConfig

    names = []
    for name, q in quant_layers(model).items():
        codes, scale = q.codes()
        packed = pack_weights(codes.to(torch.int8).clone())
        bias = q.bias.detach().float().clone() if q.bias is not None else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                _BitLinearWeights(packed, (1.0 / scale[:1].float()).clone(), bias))
        names.append(name)
    # everything outside the decoder blocks stays full precision, as in the converted model
    keep = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    model.config.quantization_config = BitNetQuantConfig(modules_to_not_convert=keep or ["lm_head"],
                                                         linear_class="bitlinear", quantization_mode="offline")
    return names


def export_bitnet(model, tokenizer, meta: dict, tmp: Path, max_shard_size: str = "2GB",
                  outer_dtype: str = "bf16") -> dict:
    """Write the BitNet checkpoint into ``tmp``; returns the size summary for binarize.json.
    ``outer_dtype``: storage dtype of the full-precision matrices (``outer.py``)."""
    check_bitnet_fit(model, meta)
    names = to_bitnet_(model)
    cast_outer_(model, outer_dtype, skip=(_BitLinearWeights,))
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    keep_fp32_compute(tmp)
    tokenizer.save_pretrained(tmp)
    n = sum(model.get_submodule(x).weight.numel() * 4 for x in names)
    stored = sum(model.get_submodule(x).weight.numel() * 8 + 32 for x in names)
    return {"converted_weights": n, "code_bits_per_weight": 2.0, "bits_per_weight": stored / n, "layers": names}


def export_bitnet_dir(run_dir: Path, out: Path, fmt: str = "bitnet", *, overwrite: bool = False,
                      max_shard_size: str = "2GB", outer_dtype: str = "bf16") -> Exported:
    """A convert run -> transformers' stock BitNet layout in ``out`` (atomic). Provenance goes to
    binarize_export.json, not binarize.json, so every loader (ours included) treats it as the
    plain HF model it is. Raises BinarizeError for a run the layout cannot hold exactly."""
    from transformers.utils import logging as hf_logging

    outer_dtype_of(outer_dtype, int8=False)  # stock transformers reads the layout: no int8 matrices
    require_run_dir(run_dir)
    check_output_dir(out, overwrite)
    model, tokenizer, meta = load_converted(run_dir)
    hf_logging.disable_progress_bar()
    with atomic_dir(out) as tmp:
        info = export_bitnet(model, tokenizer, meta, tmp, max_shard_size, outer_dtype)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        write_json(tmp / "binarize_export.json", {
            "format": "transformers-bitnet", "binarize_version": __version__, "source_run": str(run_dir),
            "method": meta.get("method"), "act_bits": meta.get("act_bits"), "recipe": meta.get("recipe", {}), **info,
            "outer_dtype": outer_dtype,
            "weight_formula": "W = code[i, j] / weight_scale (one scale per tensor); activations int8 per token",
        })
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return Exported(out, [f"{fmt}: {info['bits_per_weight']:.4f} bits per converted weight (codes "
                          f"{info['code_bits_per_weight']:.3f}), {info['converted_weights']:,} weights, safetensors "
                          f"{size / 2**20:.1f} MiB"])
