"""binarize: pretrained Hugging Face LLM -> 1-bit / 1.58-bit model.

Importing the package is cheap (no torch, no transformers): the public names below load on first
use (PEP 562), so ``binarize --help`` and argument errors answer at once. transformers still
reads binarize's packed checkpoints after ``import binarize``: the quantizer registers itself when
transformers' quantizer package is imported (or at once, when it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from ._version import __version__
from .errors import BinarizeError

_LAZY = {
    "export": ".formats",
    "load": ".formats.packed_reader",
    "QuantLinear": ".qlinear",
    "prepare": ".qlinear",
    "quantize_": ".qlinear",
    "set_t": ".qlinear",
    "unswap_": ".qlinear",
    "Recipe": ".recipe",
    "load_recipe": ".recipe",
}

__all__ = ["BinarizeError", "export", "load", "prepare", "QuantLinear", "Recipe", "load_recipe", "quantize_", "set_t",
           "unswap_", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_HOOKED = "transformers.quantizers"


def _register() -> None:
    """Import ``hf_quantizer``, which registers itself at the end of its import (when that import
    is what brought transformers' quantizers in, it is in flight and will do so itself)."""
    importlib.import_module(".hf_quantizer", __name__)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers binarize's HfQuantizer right after ``transformers.quantizers`` is imported, so
    ``AutoModelForCausalLM.from_pretrained(PACKED_DIR)`` works after a plain ``import binarize``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _HOOKED:
            return None
        sys.meta_path.remove(self)  # find the real spec, then wrap its loader
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


if _HOOKED in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
