"""One entry point for ``eval`` and ``chat``: any model spec a user types, loaded the right way."""

from __future__ import annotations

from .formats.latent import is_converted_dir, load_converted
from .formats.packed_reader import is_packed_dir, load_packed
from .models import load_model


def load_any(spec: str | None, cpu_cache: str | None = None):
    """(model, tokenizer, description) for a packed export, a convert run directory or any
    full-precision model spec (hub id, local HF directory, .gguf, None for the default model).
    ``cpu_cache`` applies to packed layers (``packed.CPU_CACHE_MODES``) and is checked for every
    spec, so a mistyped mode is refused before any model loads. Raises BinarizeError."""
    from .packed import check_cpu_cache

    if cpu_cache is not None:
        check_cpu_cache(cpu_cache)
    if is_packed_dir(spec):
        model, tok, meta = load_packed(spec, cpu_cache)
        return model, tok, f"{spec} (packed {meta['packing']}, {meta['bits_per_weight']:.3f} bits/weight)"
    if is_converted_dir(spec):
        model, tok, meta = load_converted(spec)
        return model, tok, f"{spec} (converted, {meta['recipe']['name']})"
    model, tok, src = load_model(spec)
    return model, tok, src.spec
