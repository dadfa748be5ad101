"""Export formats of a converted run: the registry (``registry.py``) and one writer per kind.

* ``packed_writer.py`` / ``packed_reader.py``: binarize's packed safetensors (binary, ternary2,
  ternary-b3), written and read back (``binarize.load``);
* ``bitnet.py``: transformers' stock BitNet checkpoint;
* ``gguf_writer.py`` (+ ``gguf_tokenizer.py``, ``gguf_q1.py``): one .gguf for llama.cpp;
* ``latent.py``: the convert run directory itself (latent weights), written by training and
  read by every writer.

A new format: a writer module here and one ``Format`` entry in ``registry.FORMATS``.
"""

from __future__ import annotations

from pathlib import Path

from .registry import (FORMATS, PACKED_FORMATS, Exported, Format, check_fit, check_options, check_recipe,
                       get_format)


def export_run(run_dir: str | Path, out: str | Path, fmt: str, *, overwrite: bool = False, **options) -> Exported:
    """Write the convert run ``run_dir`` to ``out`` in format ``fmt``; options as the format's
    entry lists them (``max_shard_size``, ``cpu_cache``, ``outer_dtype``, ``gguf_outer``, ``gguf_fallback``).
    Raises BinarizeError for an unknown format, an option it does not take or a model it
    cannot hold; nothing is left at ``out`` then."""
    f = get_format(fmt)
    opts = check_options(fmt, options)
    return f.write_fn()(Path(run_dir), Path(out), fmt, overwrite=overwrite, **opts)


def export(run_dir: str | Path, out: str | Path, fmt: str = "binary", *, overwrite: bool = False, **options) -> Path:
    """``binarize.export(RUN, OUT, FORMAT)``: as ``export_run``, returning the written path."""
    return export_run(run_dir, out, fmt, overwrite=overwrite, **options).path


__all__ = ["FORMATS", "PACKED_FORMATS", "Exported", "Format", "check_fit", "check_options", "check_recipe", "export",
           "export_run", "get_format"]
