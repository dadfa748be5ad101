"""transformers integration: ``quant_method: "binarize"`` in config.json loads packed models.

After ``import binarize``, ``AutoModelForCausalLM.from_pretrained(DIR)`` on an exported
directory swaps the converted linears for ``PackedLinear`` before the weights are read, so the
packed bytes are loaded as they are and never become float weights.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "binarize"


class BinarizeConfig(QuantizationConfigMixin):
    """What a packed checkpoint holds: format, bits, which layers, where St went, the recipe."""

    def __init__(self, format: str = "binary", format_version: int = 1, bits: float = 1.0,
                 layers: list[str] | None = None, st_layers: list[str] | None = None,
                 st_folded_into_norm: list[str] | None = None, scale_layout: str | None = None,
                 recipe: dict | None = None, cpu_cache: str = "bf16", act_bits: int = 0, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format, self.format_version, self.bits = format, format_version, bits
        self.layers = list(layers or [])
        self.st_layers = list(st_layers or [])
        self.st_folded_into_norm = list(st_folded_into_norm or [])
        self.scale_layout = scale_layout or "scale: fp32 per output row (Sl*Sa); st: per input column (fp16 or fp32)"
        self.recipe = recipe or {}
        self.cpu_cache = cpu_cache
        self.act_bits = act_bits  # 8: inputs pass through BitLinear's per-token int8 quantizer


class BinarizeHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-packed checkpoints: conversion is ``binarize convert``

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .models import convertible_linears
        from .packed import PackedLinear

        convertible_linears(model)  # MoE experts were packed one linear per expert (binarize.experts)
        cfg = self.quantization_config
        with_st = set(cfg.st_layers)
        for name in cfg.layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lin = getattr(parent, child)
            setattr(parent, child, PackedLinear(lin.in_features, lin.out_features, cfg.format,
                                                bias=lin.bias is not None, has_st=name in with_st,
                                                cpu_cache=cfg.cpu_cache, act_bits=getattr(cfg, "act_bits", 0)))

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Idempotent registration with transformers' quantizer registry."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BinarizeConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BinarizeHfQuantizer)


register()  # on import: ``import binarize`` brings this module in once transformers' quantizers load
