"""The convert run directory (``binarize-latent``): written at the end of training, read by every
export writer, ``eval`` and ``chat``.

A run directory holds ``model.safetensors`` (latent weights W~, St, Sl; the HF model's own
names), ``scales_sa.safetensors`` (binary: Sa = per-row mean|W~|, recomputable, for readers
outside binarize), ``config.json``, the tokenizer, ``binarize.json`` (format, method, layers,
recipe) and ``run.json`` / ``loss.png`` (written by ``train.record``). Loading goes through the
same ``qlinear.prepare`` as conversion, so a loaded run computes exactly what training computed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import share_files, write_json
from ..errors import BinarizeError
from ..models import restore_nonpersistent_buffers
from ..qlinear import finish_init, prepare, quant_layers, set_t
from ..recipe import Recipe
from .generation import attach_generation_config

LATENT_FORMAT = "binarize-latent"
FORMAT_VERSION = 1
WEIGHT_FORMULAS = {
    "binary": "W_eff = Sl * Sa * sign(W~/Sa) * St (Sa = per-row mean|W~|; sign(0) = +1)",
    "ternary": "W_eff = Sl * gamma * RoundClip(W~/gamma, -1, 1) * St (gamma = mean or median |W~|, per tensor "
               "or per row: recipe ternary_scale, per_row)",
}


def is_converted_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "binarize.json").is_file()


def require_tokenizer_files(path: Path) -> None:
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise BinarizeError(f"{path}: no tokenizer files")


def read_meta(path: Path) -> dict:
    """binarize.json of a run or packed directory; unreadable is one BinarizeError."""
    try:
        return json.loads((path / "binarize.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BinarizeError(f"{path}: unreadable binarize.json ({exc})") from None


def require_run_dir(run_dir: Path) -> None:
    """``run_dir`` is a convert run (a binarize.json that is not a packed export's)."""
    try:
        ok = is_converted_dir(run_dir) and json.loads((run_dir / "binarize.json").read_text()).get("format") != \
            "binarize-packed"
    except (OSError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise BinarizeError(f"{run_dir} is not a binarize convert run directory (no latent binarize.json)")


def recipe_of(meta: dict) -> Recipe:
    """The recipe a run was made with (keys this version does not know are ignored)."""
    known = {f.name for f in dataclasses.fields(Recipe)}
    return Recipe(**{k: v for k, v in meta.get("recipe", {}).items() if k in known})


def save_converted(model, tokenizer, recipe: Recipe, workdir: Path, layer_names: list[str]) -> None:
    """Latent weights + St, Sa, Sl (safetensors), HF config, tokenizer and binarize.json into ``workdir``."""
    from safetensors.torch import save_file, save_model

    from ..quantizers import analytic_scale

    set_t(model, math.inf)
    save_model(model, str(workdir / "model.safetensors"))
    if recipe.method == "binary":
        extra = {f"{name}.sa": analytic_scale(q.weight.detach().float()).view(-1).contiguous()
                 for name, q in quant_layers(model).items()}
        save_file(extra, str(workdir / "scales_sa.safetensors"))
    model.config.save_pretrained(workdir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    write_json(workdir / "binarize.json", {
        "format": LATENT_FORMAT, "format_version": FORMAT_VERSION, "binarize_version": __version__,
        "method": recipe.method, "quantized_layers": layer_names,
        "weight_formula": WEIGHT_FORMULAS[recipe.method], "act_bits": recipe.act_bits,
        "scaling": recipe.scaling, "recipe": recipe.to_dict(),
    })
    share_files(workdir)


def load_converted(path: str | Path):
    """(model, tokenizer, meta): the QuantLinear model of a run directory at the hard quantizer
    (t = inf). Raises BinarizeError for a damaged or mismatched directory."""
    from safetensors.torch import load_model as st_load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != LATENT_FORMAT:
        raise BinarizeError(f"{path}: unknown format {meta.get('format')!r}")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    recipe = recipe_of(meta)
    names = prepare(model, recipe)
    if sorted(names) != sorted(meta["quantized_layers"]):
        raise BinarizeError(f"{path}: quantized layers in binarize.json do not match the architecture")
    finish_init(model, recipe, from_file=True)
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
    restore_nonpersistent_buffers(model)  # rotary inv_freq, Gemma's embedding scale: garbage after to_empty
    attach_generation_config(model, path)  # the source's, whole (from_config derives a lossy one)
    model.eval()
    require_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BinarizeError(f"{path}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    return model, tokenizer, meta
