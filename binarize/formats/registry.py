"""The export formats: one ``Format`` entry per name, with its checks, writer and options.

transformers' ``AUTO_QUANTIZER_MAPPING`` is the model: a name maps to everything needed to
check and write that format, so adding a format is one entry here plus its writer module.
``convert --export``, ``binarize export`` and ``check_job`` all go through this table, and the
method/format compatibility is checked here only (``check_fit``).

Writers are named as ``"module:function"`` inside ``binarize.formats`` and imported only when
used, so choosing a packed format never imports the GGUF writer (nor ``gguf``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import BinarizeError

GGUF_TIE_ADVICE = ("convert with the recipe option share_st: true (or a recipe without BaI, train_st and "
                   "init: hessian, where St = 1)")
BITNET_FIT = "use a bitnet-b158 or continual-16to158 recipe (per-tensor scale, no BaI, act_bits 8)"


@dataclass
class Exported:
    """What a writer wrote: the model path (a directory, or a .gguf file) and summary lines."""

    path: Path
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Format:
    """One export format.

    ``writer(run_dir, out, fmt, *, overwrite, **options) -> Exported``; ``options`` are the
    keyword options it takes (with the CLI's defaults); ``zero_code`` says whether it can store a
    ternary zero (``instead`` names formats that can); ``code_format`` is the packing.py code
    layout a packed format uses.
    """

    name: str
    kind: str  # packed | bitnet | gguf
    description: str
    writer: str
    options: dict
    zero_code: bool = True
    instead: str = ""

    def write_fn(self) -> Callable:
        module, _, fn = self.writer.partition(":")
        return getattr(importlib.import_module(f"binarize.formats.{module}"), fn)


_PACKED_OPTIONS = {"max_shard_size": "2GB", "cpu_cache": "bf16", "outer_dtype": "bf16"}
_GGUF_OPTIONS = {"gguf_outer": "f16", "gguf_fallback": "q4_0"}

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("binary", "packed", "8 signs per byte along the input dim (set bit = -1)", "packed_writer:export_packed",
           _PACKED_OPTIONS, zero_code=False, instead="ternary2 or ternary-b3"),
    Format("ternary2", "packed", "2-bit codes, 4 per byte, transformers' BitNet pack_weights layout",
           "packed_writer:export_packed", _PACKED_OPTIONS),
    Format("ternary-b3", "packed", "base 3, 5 trits per byte", "packed_writer:export_packed", _PACKED_OPTIONS),
    Format("bitnet", "bitnet", "transformers' own BitNet checkpoint (quant_method: bitnet)",
           "bitnet:export_bitnet_dir", {"max_shard_size": "2GB", "outer_dtype": "bf16"}),
    Format("gguf-tq2", "gguf", "llama.cpp TQ2_0 (2.06 bits)", "gguf_writer:export_gguf_format", _GGUF_OPTIONS),
    Format("gguf-tq1", "gguf", "llama.cpp TQ1_0 (1.69 bits)", "gguf_writer:export_gguf_format", _GGUF_OPTIONS),
    Format("gguf-q1", "gguf", "llama.cpp Q1_0 (1.125 bits, binary only)", "gguf_writer:export_gguf_format",
           _GGUF_OPTIONS, zero_code=False, instead="gguf-tq2 or gguf-tq1"),
)}
PACKED_FORMATS = tuple(n for n, f in FORMATS.items() if f.kind == "packed")


def get_format(name: str | None) -> Format:
    """The entry for ``name``; an unknown name is one BinarizeError listing the known ones."""
    if name not in FORMATS:
        raise BinarizeError(f"unknown packed format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def check_fit(method: str, fmt: str, what: str) -> Format:
    """A ternary model needs a format with a zero code; ``binary`` and GGUF's Q1_0 have none."""
    f = get_format(fmt)
    if method == "ternary" and not f.zero_code:
        raise BinarizeError(f"{what} is ternary: the {fmt} format cannot store its zero weights, it has no zero "
                            f"code (use {f.instead})")
    return f


def check_recipe(recipe, fmt: str) -> Format:
    """Before training: the recipe can produce a model this format holds (method, St, scales)."""
    f = check_fit(recipe.method, fmt, f"recipe {recipe.name}")
    learns_st = recipe.bai or recipe.train_st or (recipe.init == "hessian" and recipe.hessian_column_scale)
    if f.kind == "gguf" and learns_st and not recipe.share_st:
        raise BinarizeError(f"{fmt} has no per-input scale, and recipe {recipe.name} learns one St per layer: "
                            f"{GGUF_TIE_ADVICE}")
    if f.kind == "bitnet" and (recipe.method != "ternary" or recipe.act_bits != 8 or recipe.per_row or recipe.bai
                               or recipe.scaling != "analytic" or recipe.init == "hessian"):
        raise BinarizeError(f"recipe {recipe.name} does not make a model the bitnet format holds ({BITNET_FIT})")
    return f


def check_options(fmt: str, options: dict) -> dict:
    """The options this format takes, defaults filled in; an option it does not take is an error."""
    f = get_format(fmt)
    extra = set(options) - set(f.options)
    if extra:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        raise BinarizeError(f"the {fmt} format takes no option {', '.join(flag(k) for k in sorted(extra))} "
                            f"(it takes: {', '.join(flag(k) for k in f.options) or 'none'})")
    return {**f.options, **options}
