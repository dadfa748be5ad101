"""The tensors that stay in full precision (token embeddings, lm_head, any linear left unconverted)
in an exported checkpoint: their storage dtype.

They hold most of a small binarized model's bytes: SmolLM2-135M's tied 49152 x 576 embedding is
113 MB in fp32 against 14 MB of 1-bit block linears. ``outer_dtype`` (export option
``--outer-dtype``) stores every floating-point tensor of two or more dimensions that is not a
converted layer's in ``bf16`` (default: fp32's exponent range, so no source overflows; the
half-precision checkpoints LLMs ship in are bf16), ``fp16`` or ``fp32`` (the training weights
exactly). One-dimensional tensors (norm weights, which may carry a folded St, and biases) stay
fp32: a few KB. Loaders compute in fp32 as before; only the stored values are rounded
(bf16: relative error <= 2^-9).

``int8`` (packed format only; stock transformers cannot read it, so the BitNet layout refuses it)
stores each such matrix as int8 codes with one fp32 absmax scale per row, the vector-wise weight
quantization of LLM.int8() (Dettmers et al., arXiv 2208.07339): q = round(127 w / max_j |w_j|),
w' = q max_j |w_j| / 127, error <= max_j |w_j| / 254 per row. The checkpoint holds
``NAME_int8`` / ``NAME_int8_scale`` instead of ``NAME`` (a tied lm_head is the embedding's
tensor, stored once) and binarize.json lists them under ``outer_int8``; ``restore_int8_`` puts the
dequantized values back after loading. SmolLM2-135M's binary export: 71.3 -> 43 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BinarizeError

OUTER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8}
INT8_SUFFIX, SCALE_SUFFIX = "_int8", "_int8_scale"


def outer_dtype(name: str, int8: bool = True) -> torch.dtype:
    """The torch dtype for an ``--outer-dtype`` name; an unknown name (or int8 where the format
    cannot hold it, ``int8=False``) is one BinarizeError."""
    known = [k for k in OUTER_DTYPES if int8 or k != "int8"]
    if name not in known:
        raise BinarizeError(f"--outer-dtype must be one of {', '.join(known)}, got {name!r}")
    return OUTER_DTYPES[name]


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (rows, cols) float -> (int8 codes (rows, cols), fp32 scale (rows,)); w ~ codes * scale[:, None]."""
    scale = w.detach().float().abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    codes = torch.round(w.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def outer_matrices(model, skip: tuple[type, ...] = ()) -> dict[str, list[str]]:
    """Full-precision matrices of ``model``: first parameter name -> every name of that tensor (ties)."""
    names: dict[int, list[str]] = {}
    keep = {id(p) for m in model.modules() if not (skip and isinstance(m, skip))
            for p in m.parameters(recurse=False) if p.ndim >= 2 and p.is_floating_point()}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in keep:
            names.setdefault(id(p), []).append(name)
    return {v[0]: v for v in names.values()}


def int8_state_dict(model, skip: tuple[type, ...] = ()) -> tuple[dict, dict[str, list[str]]]:
    """``model.state_dict()`` with every full-precision matrix replaced by NAME_int8 / NAME_int8_scale
    (tied names dropped); returns it and {NAME: tied names} for binarize.json."""
    sd = model.state_dict()
    matrices = outer_matrices(model, skip)
    for first, names in matrices.items():
        codes, scale = quantize_rows_int8(model.get_parameter(first))
        for n in names:
            sd.pop(n, None)
        sd[first + INT8_SUFFIX], sd[first + SCALE_SUFFIX] = codes, scale
    return sd, matrices


@torch.no_grad()
def restore_int8_(model, files: list, matrices: dict[str, list[str]]) -> None:
    """After loading: set each NAME listed in ``matrices`` (binarize.json ``outer_int8``) from the
    NAME_int8 codes and scales in the safetensors ``files``. Raises BinarizeError when one is missing
    or has the wrong shape."""
    from safetensors import safe_open

    found = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                if key.endswith(INT8_SUFFIX) or key.endswith(SCALE_SUFFIX):
                    found[key] = f
    for name in matrices:
        keys = (name + INT8_SUFFIX, name + SCALE_SUFFIX)
        if any(k not in found for k in keys):
            raise BinarizeError(f"int8 tensor {name} is missing from the checkpoint")
        tensors = []
        for k in keys:
            with safe_open(str(found[k]), "pt") as sf:
                tensors.append(sf.get_tensor(k))
        codes, scale = tensors
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise BinarizeError(f"int8 tensor {name} is not a parameter of the model") from None
        if codes.dtype != torch.int8 or tuple(codes.shape) != tuple(param.shape) or scale.shape != param.shape[:1]:
            raise BinarizeError(f"int8 tensor {name}: codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not "
                                f"fit the parameter {tuple(param.shape)}")
        param.copy_((codes.float() * scale.float()[:, None]).to(param.dtype))


def cast_outer_(model, name: str, skip: tuple[type, ...] = ()) -> int:
    """Cast the full-precision matrices of ``model`` (parameters with ndim >= 2 of modules that are
    not instances of ``skip``; tied parameters once) to ``name``'s dtype in place; returns their
    element count. fp16 refuses values beyond its range rather than storing inf; int8 leaves the
    values in place (``int8_state_dict`` quantizes them at save time)."""
    dtype = outer_dtype(name)
    if dtype == torch.int8:
        return sum(model.get_parameter(n).numel() for n in outer_matrices(model, skip))
    seen, n = set(), 0
    for module in model.modules():
        if skip and isinstance(module, skip):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or p.ndim < 2 or not p.is_floating_point():
                continue
            seen.add(id(p))
            if dtype == torch.float16 and bool((p.detach().abs() > torch.finfo(torch.float16).max).any()):
                raise BinarizeError(f"{type(module).__name__}.{pname} holds values beyond fp16's range: "
                                    "use --outer-dtype bf16")
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


def keep_fp32_compute(directory) -> None:
    """``save_pretrained`` records the first matrix's dtype as the model's; set config.json back to
    float32 so a stock ``from_pretrained`` computes in fp32 as before (the stored bf16/fp16
    matrices are upcast on load, the fp32 norms kept)."""
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
