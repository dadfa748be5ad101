"""binarize: pretrained Hugging Face LLM -> 1-bit / 1.58-bit model."""

__version__ = "0.1.0"

from .errors import BinarizeError  # noqa: E402
from .qlinear import QuantLinear, quantize_, set_t, unswap_  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["BinarizeError", "QuantLinear", "Recipe", "load_recipe", "quantize_", "set_t", "unswap_", "__version__"]
