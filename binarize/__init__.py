"""binarize: pretrained Hugging Face LLM -> 1-bit / 1.58-bit model."""

from ._version import __version__
from .errors import BinarizeError
from .formats import export
from .formats.packed_reader import load
from .hf_quantizer import register as _register
from .qlinear import QuantLinear, prepare, quantize_, set_t, unswap_
from .recipe import Recipe, load_recipe

_register()  # AutoModelForCausalLM.from_pretrained(DIR) now reads binarize's packed checkpoints

__all__ = ["BinarizeError", "export", "load", "prepare", "QuantLinear", "Recipe", "load_recipe", "quantize_", "set_t",
           "unswap_", "__version__"]
