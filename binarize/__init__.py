"""binarize: pretrained Hugging Face LLM -> 1-bit / 1.58-bit model."""

__version__ = "0.1.0"

from .errors import BinarizeError  # noqa: E402
from .qlinear import QuantLinear, quantize_, set_t, unswap_  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402
from .export import export, load  # noqa: E402
from .hf_quantizer import register as _register  # noqa: E402

_register()  # AutoModelForCausalLM.from_pretrained(DIR) now reads binarize's packed checkpoints

__all__ = ["BinarizeError", "export", "load", "QuantLinear", "Recipe", "load_recipe", "quantize_", "set_t", "unswap_", "__version__"]
