"""``binarize export``: a convert run directory -> packed safetensors that load back exactly.

St placement: a layer's St is folded into the RMSNorm weight in front of it when every layer
reading that norm has the same St (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``; so it is when no St was learned, as in the ternary recipes without
BaI, where St = 1). Otherwise (the default binaryllm recipe learns one St per layer, and
o_proj/down_proj never follow a norm)
St stays an explicit per-input vector, stored in fp16 when that is exact (``fold_st`` rounds
it so) and fp32 otherwise. ``binarize.json`` lists where each St went.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from . import __version__
from .checkpoint import atomic_dir, write_json
from .converted import is_converted_dir, load_converted, require_tokenizer_files
from .errors import BinarizeError
from .hf_quantizer import BinarizeConfig, register
from .packed import CPU_CACHE_MODES, PackedLinear
from .packing import check_format, check_method_format, pack, packed_shape
from .qlinear import quant_layers

PACKED_FORMAT = "binarize-packed"
PACKED_VERSION = 1
# (norm, consumers) per decoder block whose St can be folded into the norm when shared
NORM_GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_packed_dir(path: str | Path | None) -> bool:
    if path is None or not (Path(path) / "binarize.json").is_file():
        return False
    try:
        return json.loads((Path(path) / "binarize.json").read_text()).get("format") == PACKED_FORMAT
    except (OSError, json.JSONDecodeError):
        return True  # let the loader report the damage


def require_run_dir(run_dir: Path) -> None:
    if not is_converted_dir(run_dir) or is_packed_dir(run_dir):
        raise BinarizeError(f"{run_dir} is not a binarize convert run directory (no latent binarize.json)")


def _fold_shared_st(model, qlayers: dict) -> list[str]:
    """Fold St into the preceding norm where all of the norm's readers share it."""
    folded = []
    prefix = next(n for n, m in model.named_modules() if m is model.model.layers)
    for i, block in enumerate(model.model.layers):
        for norm_name, readers in NORM_GROUPS:
            names = [f"{prefix}.{i}.{r}" for r in readers]
            if not all(n in qlayers for n in names):
                continue
            sts = [qlayers[n].scale_in().detach() for n in names]
            norm = getattr(block, norm_name, None)
            if norm is None or not all(torch.equal(sts[0], s) for s in sts[1:]):
                continue
            with torch.no_grad():
                norm.weight.mul_(sts[0].to(norm.weight.dtype))
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


def export(run_dir: str | Path, out: str | Path, fmt: str = "binary", *, overwrite: bool = False,
           max_shard_size: str = "2GB", cpu_cache: str = "bf16") -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if fmt != "bitnet":
        check_format(fmt)
    if cpu_cache not in CPU_CACHE_MODES:
        raise BinarizeError(f"--cpu-cache must be one of {', '.join(CPU_CACHE_MODES)}, got {cpu_cache!r}")
    require_run_dir(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BinarizeError(f"output {out} exists and is not empty (use --overwrite)")
    model, tokenizer, meta = load_converted(run_dir)
    check_method_format(meta.get("method", "binary"), fmt, str(run_dir))
    if fmt == "bitnet":
        return _export_bitnet(model, tokenizer, meta, run_dir, out, max_shard_size)
    layout = pack_model_(model, fmt, cpu_cache)
    bits = storage_bits(model, layout["layers"])
    qcfg = BinarizeConfig(format=fmt, format_version=PACKED_VERSION, bits=bits["bits_per_weight"],
                          layers=layout["layers"], st_layers=layout["st_layers"],
                          st_folded_into_norm=layout["st_folded_into_norm"], recipe=meta.get("recipe", {}),
                          cpu_cache=cpu_cache, act_bits=meta.get("act_bits", 0))
    model.config.quantization_config = qcfg
    register()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
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
            "st_layout": {k: layout[k] for k in ("st_layers", "st_folded_into_norm", "st_dtypes")},
            "weight_formula": "W = scale[i] * code[i, j] * st[j] (st = 1 where folded into the norm or not stored)",
            "act_bits": meta.get("act_bits", 0),
        })
    return out


def _export_bitnet(model, tokenizer, meta: dict, run_dir: Path, out: Path, max_shard_size: str) -> Path:
    """transformers' stock BitNet layout (see export_bitnet); provenance in binarize_export.json,
    not binarize.json, so every loader (ours included) treats it as the plain HF model it is."""
    from .export_bitnet import export_bitnet

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with atomic_dir(out) as tmp:
        info = export_bitnet(model, tokenizer, meta, tmp, max_shard_size)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        write_json(tmp / "binarize_export.json", {
            "format": "transformers-bitnet", "binarize_version": __version__, "source_run": str(run_dir),
            "method": meta.get("method"), "act_bits": meta.get("act_bits"), "recipe": meta.get("recipe", {}), **info,
            "weight_formula": "W = code[i, j] / weight_scale (one scale per tensor); activations int8 per token",
        })
    return out


# ----------------------------------------------------------------------------- loading


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def validate_packed_dir(path: Path) -> dict:
    """Format, version, checksums and tensor shapes, before any weight is read."""
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        meta = json.loads((path / "binarize.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BinarizeError(f"{path}: unreadable binarize.json ({_first_line(exc)})") from None
    if meta.get("format") != PACKED_FORMAT:
        raise BinarizeError(f"{path}: unknown format {meta.get('format')!r}")
    if meta.get("format_version") != PACKED_VERSION:
        raise BinarizeError(f"{path}: format version {meta.get('format_version')!r} is not supported "
                            f"(this binarize reads version {PACKED_VERSION})")
    check_format(meta.get("packing"))
    for f, digest in meta.get("checksums", {}).items():
        if not (path / f).is_file():
            raise BinarizeError(f"{path / f}: missing")
        if sha256(path / f) != digest:
            raise BinarizeError(f"{path / f}: checksum mismatch (file corrupted or modified)")
    require_tokenizer_files(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BinarizeError(f"{path}: cannot read config.json ({_first_line(exc)})") from None
    qcfg = getattr(config, "quantization_config", None)
    qcfg = qcfg if isinstance(qcfg, dict) else getattr(qcfg, "to_dict", lambda: {})()
    if qcfg.get("format") != meta["packing"]:
        raise BinarizeError(f"{path}: config.json and binarize.json disagree on the packed format")
    shapes = {}
    for f in meta.get("checksums", {}):
        try:
            with safe_open(str(path / f), "pt") as sf:
                for k in sf.keys():
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        except Exception as exc:  # safetensors raises several types on damaged headers
            raise BinarizeError(f"{path / f}: unreadable safetensors ({_first_line(exc)})") from None
    dims = _linear_dims(config)
    for name in qcfg.get("layers", []):
        if name not in dims:
            raise BinarizeError(f"{path}: layer {name} is not in the model architecture")
        out_f, in_f = dims[name]
        expect = {f"{name}.qweight": packed_shape(meta["packing"], out_f, in_f), f"{name}.scale": (out_f,)}
        if name in qcfg.get("st_layers", []):
            expect[f"{name}.st"] = (in_f,)
        for key, shape in expect.items():
            if key not in shapes:
                raise BinarizeError(f"{path}: tensor {key} is missing")
            if shapes[key] != tuple(shape):
                raise BinarizeError(f"{path}: tensor {key} has shape {shapes[key]}, config says {tuple(shape)}")
    return meta


def _linear_dims(config) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    from .models import target_linears

    plain = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain)
    return {n: (m.out_features, m.in_features) for n, m in target_linears(model).items()}


def load_packed(path: str | Path, cpu_cache: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, meta) for an exported directory; converted layers stay packed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    meta = validate_packed_dir(path)
    register()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BinarizeError(f"{path}: cannot load packed model ({_first_line(exc)})") from None
    if cpu_cache is not None:
        if cpu_cache not in CPU_CACHE_MODES:
            raise BinarizeError(f"cpu cache must be one of {', '.join(CPU_CACHE_MODES)}")
        for m in model.modules():
            if isinstance(m, PackedLinear):
                m.set_cpu_cache(cpu_cache)
    model.eval()
    return model, tokenizer, meta


def load(path: str | Path, cpu_cache: str | None = None):
    """``binarize.load(DIR)``: the exported model as a transformers model with packed layers."""
    return load_packed(path, cpu_cache)[0]


def resident_bytes(model) -> int:
    """Bytes held by parameters and buffers (ties counted once), plus CPU unpack caches."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, PackedLinear) and m._cache is not None:
            total += m._cache.numel() * m._cache.element_size()
    return total
