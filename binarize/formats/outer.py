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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BinarizeError

OUTER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def outer_dtype(name: str) -> torch.dtype:
    """The torch dtype for an ``--outer-dtype`` name; an unknown name is one BinarizeError."""
    if name not in OUTER_DTYPES:
        raise BinarizeError(f"--outer-dtype must be one of {', '.join(OUTER_DTYPES)}, got {name!r}")
    return OUTER_DTYPES[name]


def cast_outer_(model, name: str, skip: tuple[type, ...] = ()) -> int:
    """Cast the full-precision matrices of ``model`` (parameters with ndim >= 2 of modules that are
    not instances of ``skip``; tied parameters once) to ``name``'s dtype in place; returns their
    element count. fp16 refuses values beyond its range rather than storing inf."""
    dtype = outer_dtype(name)
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
