"""Reading binarize's packed safetensors back: ``load_packed`` / ``binarize.load``.

An exported directory holds ``model.safetensors`` (converted linears as ``qweight`` uint8 codes,
``scale`` (out,) fp32 and optionally ``st`` (in,)), ``config.json`` with a ``quantization_config``
(``quant_method: binarize``), the tokenizer and ``binarize.json`` with a sha256 per file. Loading
checks format, version, checksums, tensor shapes and the tokenizer before any weight is read, and
refuses anything else with one BinarizeError line. The writer is ``packed_writer.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from binarize.calibration.datasets import sha256_of as sha256

from ..errors import BinarizeError
from ..hf_quantizer import register
from ..packed import PackedLinear, check_cpu_cache
from ..packing import check_format, packed_shape
from .latent import require_tokenizer_files

PACKED_FORMAT = "binarize-packed"
PACKED_VERSION = 1


def is_packed_dir(path: str | Path | None) -> bool:
    if path is None or not (Path(path) / "binarize.json").is_file():
        return False
    try:
        return json.loads((Path(path) / "binarize.json").read_text()).get("format") == PACKED_FORMAT
    except (OSError, json.JSONDecodeError):
        return True  # let the loader report the damage


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def validate_packed_dir(path: Path) -> dict:
    """Format, version, checksums and tensor shapes, before any weight is read."""
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        meta = json.loads((path / "binarize.json").read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and undecodable UTF-8
        raise BinarizeError(f"{path}: unreadable binarize.json ({_first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise BinarizeError(f"{path}: binarize.json is not a JSON object")
    if meta.get("format") != PACKED_FORMAT:
        raise BinarizeError(f"{path}: unknown format {meta.get('format')!r}")
    if meta.get("format_version") != PACKED_VERSION:
        raise BinarizeError(f"{path}: format version {meta.get('format_version')!r} is not supported "
                            f"(this binarize reads version {PACKED_VERSION})")
    check_format(meta.get("packing"))
    require_tokenizer_files(path)
    for key in ("checksums", "file_checksums"):  # file_checksums: every other file (exports since issue 42)
        sums = meta.get(key, {})
        if not isinstance(sums, dict) or not all(isinstance(v, str) and isinstance(f, str) and f and "/" not in f
                                                 and f not in (".", "..") for f, v in sums.items()):
            raise BinarizeError(f"{path}: binarize.json's {key} is not a map of file names to sha256 digests")
        for f, digest in sums.items():
            if not (path / f).is_file():
                raise BinarizeError(f"{path / f}: missing")
            if sha256(path / f) != digest:
                raise BinarizeError(f"{path / f}: checksum mismatch (file corrupted or modified)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many types (KeyError, TypeError, ...) on a damaged config.json
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

    from ..models import convertible_linears

    plain = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain)
    return {n: (m.out_features, m.in_features) for n, m in convertible_linears(model).items()}


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
    from ..models import restore_nonpersistent_buffers

    restore_nonpersistent_buffers(model)  # transformers leaves them uninitialised when a quantizer loads
    if meta.get("outer_int8"):  # embeddings / lm_head stored as int8 rows (outer.py): dequantize them in place
        from .outer import restore_int8_

        restore_int8_(model, [path / f for f in meta.get("checksums", {})], meta["outer_int8"])
    if cpu_cache is not None:
        check_cpu_cache(cpu_cache)
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
