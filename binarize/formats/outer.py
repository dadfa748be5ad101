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


# The largest magnitude each storage type of a full-precision tensor holds: fp16 / GGUF F16 65504,
# bf16 and fp32 about 3.4e38, int8 rows and GGUF Q8_0 blocks store absmax / 127 (in fp32 and in
# fp16 respectively), so Q8_0 holds magnitudes up to 127 * 65504.
STORAGE_LIMITS = {"fp16": torch.finfo(torch.float16).max, "f16": torch.finfo(torch.float16).max,
                  "bf16": torch.finfo(torch.bfloat16).max, "fp32": torch.finfo(torch.float32).max,
                  "f32": torch.finfo(torch.float32).max, "int8": torch.finfo(torch.float32).max * 127,
                  "q8_0": torch.finfo(torch.float16).max * 127}


@torch.no_grad()
def check_fits(name: str, t: torch.Tensor, storage: str, hint: str = "") -> None:
    """The one precision rule of every writer (packed, BitNet, GGUF): refuse, with one line naming
    the tensor, a full-precision tensor ``t`` whose values ``storage`` (a key of STORAGE_LIMITS)
    cannot hold: any NaN or infinity (no format keeps a non-finite weight faithfully), or a
    magnitude past the type's range (fp16 beyond 65504 would be stored as inf). ``hint`` says
    what to do instead (a wider ``--outer-dtype``). Raises BinarizeError."""
    if storage not in STORAGE_LIMITS:
        raise ValueError(f"unknown storage type {storage!r}")
    if not t.is_floating_point() or t.numel() == 0:
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise BinarizeError(f"{name} holds {bad} non-finite value(s) (NaN/Inf), which no export stores faithfully: "
                            "the converted model is corrupt (convert again, e.g. with a lower --lr)")
    amax = float(t.abs().max())
    limit = STORAGE_LIMITS[storage]
    if storage in ("bf16", "f16", "fp16"):  # past the largest finite value, a cast may still round to it
        over = not bool(torch.isfinite(t.to(OUTER_DTYPES.get(storage, torch.float16))).all())
    elif storage == "q8_0":
        over = not bool(torch.isfinite(torch.tensor(amax / 127, dtype=torch.float32).half()))
    else:
        over = amax > limit
    if over:
        raise BinarizeError(f"{name} holds values up to {amax:.4g}, beyond what {storage} stores (largest "
                            f"{limit:.4g}){': ' + hint if hint else ''}")


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
    element count. Every matrix passes ``check_fits`` first (non-finite values, or values beyond
    fp16's range for fp16, are one BinarizeError naming the tensor); int8 leaves the values in
    place (``int8_state_dict`` quantizes them at save time)."""
    dtype = outer_dtype(name)
    hint = "use --outer-dtype bf16 (or fp32)" if name in ("fp16", "int8") else ""
    matrices = outer_matrices(model, skip)
    for first in matrices:  # every tensor checked before any is cast
        check_fits(first, model.get_parameter(first), name, hint)
    if dtype == torch.int8:
        return sum(model.get_parameter(n).numel() for n in matrices)
    n = 0
    for first in matrices:
        p = model.get_parameter(first)
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
