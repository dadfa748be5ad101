"""Writing binarize's packed safetensors (binary, ternary2, ternary-b3) from a convert run; the
reader is ``packed_reader.py``.

St placement: a layer's St is folded into the RMSNorm weight in front of it when every layer
reading that norm has the same St (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``; so it is when no St was learned, as in the ternary recipes without
BaI, where St = 1). Otherwise (the default binaryllm recipe learns one St per layer, and
o_proj/down_proj never follow a norm)
St stays an explicit per-input vector, stored in fp16 when that is exact (``fold_st`` rounds
it so) and fp32 otherwise. ``binarize.json`` lists where each St went.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import atomic_dir, check_output_dir, write_json
from ..hf_quantizer import BinarizeConfig, register
from ..experts import has_moe_experts
from ..families import family_of, fold_into_norm_
from ..models import decoder_layers
from ..packed import PackedLinear, check_cpu_cache
from ..packing import pack
from ..qlinear import quant_layers
from .latent import load_converted, require_run_dir
from .outer import cast_outer_, int8_state_dict, keep_fp32_compute
from .outer import outer_dtype as outer_dtype_of
from .packed_reader import PACKED_FORMAT, PACKED_VERSION, sha256
from .registry import Exported, check_fit

def _fold_shared_st(model, qlayers: dict) -> list[str]:
    """Fold St into the preceding norm where all of the norm's readers share it (``binarize.families``:
    Gemma's (1 + w) multiplier and a LayerNorm's bias included)."""
    folded = []
    family = family_of(model.config)
    prefix = next(n for n, m in model.named_modules() if m is decoder_layers(model))
    for i, block in enumerate(decoder_layers(model)):
        for norm_name, readers in family.norm_groups:
            names = [f"{prefix}.{i}.{r}" for r in readers]
            if not all(n in qlayers for n in names):
                continue
            sts = [qlayers[n].scale_in().detach() for n in names]
            norm = getattr(block, norm_name, None)
            if norm is None or not all(torch.equal(sts[0], s) for s in sts[1:]):
                continue
            fold_into_norm_(norm, sts[0].float(), family.norm_offset)
            folded.extend(names)
    return folded


def pack_model_(model, fmt: str, cpu_cache: str = "bf16") -> dict:
    """Replace every QuantLinear by a PackedLinear holding its hard-sign codes; returns a layout."""
    qlayers = quant_layers(model)
    folded = set(_fold_shared_st(model, qlayers)) if fmt else set()
    st_layers, st_dtypes = [], {}
    for name, q in qlayers.items():
        with torch.no_grad():
            codes, scale = q.codes()
            st = q.scale_in().detach().float()
            has_st = name not in folded and not bool(torch.all(st == 1))  # St = 1: nothing to store
            p = PackedLinear(q.in_features, q.out_features, fmt, bias=q.bias is not None, has_st=has_st,
                             cpu_cache=cpu_cache, act_bits=q.spec.act_bits)
            p.qweight.copy_(pack(codes, fmt))
            p.scale = scale.float().contiguous()
            if has_st:
                exact16 = torch.equal(st.half().float(), st)
                p.st = st.half() if exact16 else st
                st_layers.append(name)
                st_dtypes[str(p.st.dtype)] = st_dtypes.get(str(p.st.dtype), 0) + 1
            if q.bias is not None:
                p.bias.copy_(q.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, p)
    return {"layers": list(qlayers), "st_layers": st_layers, "st_folded_into_norm": sorted(folded),
            "st_dtypes": st_dtypes}


def storage_bits(model, layers: list[str]) -> dict:
    """Bits per converted weight: codes, and codes + scales + St."""
    n_weights = code_bits = scale_bits = 0
    for name in layers:
        p = model.get_submodule(name)
        n_weights += p.in_features * p.out_features
        code_bits += p.qweight.numel() * 8
        scale_bits += p.scale.numel() * p.scale.element_size() * 8
        if p.st is not None:
            scale_bits += p.st.numel() * p.st.element_size() * 8
    return {"converted_weights": n_weights, "code_bits_per_weight": code_bits / n_weights,
            "bits_per_weight": (code_bits + scale_bits) / n_weights}


def export_packed(run_dir: Path, out: Path, fmt: str = "binary", *, overwrite: bool = False,
                  max_shard_size: str = "2GB", cpu_cache: str = "bf16", outer_dtype: str = "bf16") -> Exported:
    """A convert run -> a packed directory ``out`` (written to a temporary sibling, then renamed).

    ``cpu_cache`` is the default CPU unpack cache the loaded model uses (``packed.CPU_CACHE_MODES``);
    ``outer_dtype`` the storage dtype of the full-precision matrices (``outer.py``).
    Raises BinarizeError for a bad option, a directory that is not a run, an existing ``out``
    without ``overwrite`` and a ternary run in the binary format.
    """
    check_cpu_cache(cpu_cache)
    outer_dtype_of(outer_dtype)
    require_run_dir(run_dir)
    check_output_dir(out, overwrite)
    model, tokenizer, meta = load_converted(run_dir)
    check_fit(meta.get("method", "binary"), fmt, str(run_dir))
    layout = pack_model_(model, fmt, cpu_cache)
    cast_outer_(model, outer_dtype, skip=(PackedLinear,))
    bits = storage_bits(model, layout["layers"])
    qcfg = BinarizeConfig(format=fmt, format_version=PACKED_VERSION, bits=bits["bits_per_weight"],
                          layers=layout["layers"], st_layers=layout["st_layers"],
                          st_folded_into_norm=layout["st_folded_into_norm"], recipe=meta.get("recipe", {}),
                          cpu_cache=cpu_cache, act_bits=meta.get("act_bits", 0))
    model.config.quantization_config = qcfg
    register()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    int8 = {}
    # per-expert linears (binarize.experts) are saved under their own names: transformers' reversal to
    # the hub's stacked-expert layout would try to split them
    save_kw = {"save_original_format": False} if has_moe_experts(model) else {}
    with atomic_dir(out) as tmp:
        if outer_dtype == "int8":
            state, int8 = int8_state_dict(model, skip=(PackedLinear,))
            model.save_pretrained(tmp, max_shard_size=max_shard_size, state_dict=state, **save_kw)
        else:
            model.save_pretrained(tmp, max_shard_size=max_shard_size, **save_kw)
        keep_fp32_compute(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for extra in ("run.json", "loss.png"):
            if (run_dir / extra).exists():
                shutil.copy2(run_dir / extra, tmp / extra)
        files = sorted(p.name for p in tmp.glob("*.safetensors"))
        write_json(tmp / "binarize.json", {
            "format": PACKED_FORMAT, "format_version": PACKED_VERSION, "binarize_version": __version__,
            "packing": fmt, "method": meta.get("method", "binary"), "source_run": str(run_dir),
            "checksums": {f: sha256(tmp / f) for f in files}, **bits,
            "file_checksums": {p.name: sha256(p) for p in sorted(tmp.iterdir())
                               if p.is_file() and p.name not in files and p.name != "binarize.json"},
            "st_layout": {k: layout[k] for k in ("st_layers", "st_folded_into_norm", "st_dtypes")},
            "weight_formula": "W = scale[i] * code[i, j] * st[j] (st = 1 where folded into the norm or not stored)",
            "act_bits": meta.get("act_bits", 0), "outer_dtype": outer_dtype,
            **({"outer_int8": int8} if int8 else {}),
        })
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return Exported(out, [f"{fmt}: {bits['bits_per_weight']:.4f} bits per converted weight (codes "
                          f"{bits['code_bits_per_weight']:.3f}), {bits['converted_weights']:,} weights, safetensors "
                          f"{size / 2**20:.1f} MiB"])


