"""Loading a ``binarize convert`` output directory back as a runnable model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model

from .errors import BinarizeError
from .models import load_model
from .qlinear import LayerSpec, quant_layers, quantize_, share_st_
from .recipe import Recipe


def is_converted_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "binarize.json").is_file()


def recipe_of(meta: dict) -> Recipe:
    """The recipe a run was made with (keys this version does not know are ignored)."""
    known = {f.name for f in dataclasses.fields(Recipe)}
    return Recipe(**{k: v for k, v in meta.get("recipe", {}).items() if k in known})


def require_tokenizer_files(path: Path) -> None:
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise BinarizeError(f"{path}: no tokenizer files")


def load_converted(path: str | Path):
    """(model, tokenizer, meta): the QuantLinear model at hard sign (t = inf)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        meta = json.loads((path / "binarize.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BinarizeError(f"{path}: unreadable binarize.json ({exc})") from None
    if meta.get("format") != "binarize-latent":
        raise BinarizeError(f"{path}: unknown format {meta.get('format')!r}")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    recipe = recipe_of(meta)
    names = quantize_(model, LayerSpec.from_recipe(recipe))
    if recipe.share_st:
        share_st_(model)
    if sorted(names) != sorted(meta["quantized_layers"]):
        raise BinarizeError(f"{path}: quantized layers in binarize.json do not match the architecture")
    if meta.get("scaling") == "learnable":
        for q in quant_layers(model).values():
            q.use_learnable_scale()
    model.tie_weights()
    try:
        missing, unexpected = st_load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise BinarizeError(f"{path / 'model.safetensors'}: cannot load ({str(exc).splitlines()[0]})") from None
    shared: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(p.data_ptr(), []).append(n)
    aliases = {n for names in shared.values() if len(names) > 1 for n in names}  # tied embeddings
    bad = [m for m in missing if "rotary" not in m and m not in aliases]
    if bad or unexpected:
        raise BinarizeError(f"{path}: weights do not match the config (missing {bad[:3]}, unexpected {unexpected[:3]})")
    model.model.rotary_emb.__init__(config=config)  # recompute non-persistent buffers after to_empty
    for q in quant_layers(model).values():
        q.folded = True
    model.eval()
    require_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BinarizeError(f"{path}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    return model, tokenizer, meta


def load_any(spec: str | None, cpu_cache: str | None = None):
    """A packed export, a convert run directory or any full-precision model spec."""
    from .export import is_packed_dir, load_packed

    if is_packed_dir(spec):
        model, tok, meta = load_packed(spec, cpu_cache)
        return model, tok, f"{spec} (packed {meta['packing']}, {meta['bits_per_weight']:.3f} bits/weight)"
    if is_converted_dir(spec):
        model, tok, meta = load_converted(spec)
        return model, tok, f"{spec} (converted, {meta['recipe']['name']})"
    model, tok, src = load_model(spec)
    return model, tok, src.spec
