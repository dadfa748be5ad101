"""The source model's generation_config carried whole: convert writes it into the run directory,
every loader of a run reads it back (``attach_generation_config``), the packed and BitNet writers
save it beside the weights (stock ``from_pretrained`` reads it), and the GGUF writer maps what
llama.cpp's metadata can hold (``gguf_generation``): the first EOS id, the pad id and the sampling
defaults ``general.sampling.*``; every other field set in the source (``do_sample``, further EOS
ids, ...) is named in the export's notes as not held."""

from __future__ import annotations

from pathlib import Path

from ..errors import BinarizeError

GENERATION_FILE = "generation_config.json"
# generation_config field -> the GGUF key llama.cpp reads it from (as its sampling default)
GGUF_SAMPLING = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
                 "top_k": "general.sampling.top_k", "min_p": "general.sampling.min_p",
                 "repetition_penalty": "general.sampling.penalty_repeat"}
# fields of transformers' own bookkeeping, not the source's choices
BOOKKEEPING = {"transformers_version", "_from_model_config", "use_cache", "output_attentions",
               "output_hidden_states", "return_dict_in_generate"}


def read_generation_config(path: Path):
    """``path/generation_config.json`` as a transformers GenerationConfig, None when absent;
    an unreadable file is one BinarizeError."""
    from transformers import GenerationConfig

    if not (Path(path) / GENERATION_FILE).is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BinarizeError(f"{Path(path) / GENERATION_FILE}: unreadable ({first})") from None


def attach_generation_config(model, path: Path) -> None:
    """Give a model built from a run directory's config the run's own generation_config (a model
    built ``from_config`` derives one from config.json alone: one EOS id, no sampling fields)."""
    gen = read_generation_config(path)
    if gen is not None:
        model.generation_config = gen


def source_fields(gen) -> dict:
    """The fields the source set (differing from transformers' defaults), bookkeeping left out."""
    if gen is None:
        return {}
    return {k: v for k, v in gen.to_diff_dict().items() if k not in BOOKKEEPING}


def gguf_generation(gen) -> tuple[dict[str, int], dict[str, float | int], list[str]]:
    """(special token ids for ``tokenizer.ggml.*``, sampling defaults {GGUF key: value}, notes)
    for a GenerationConfig: the first EOS id and the pad id, temperature / top_p / top_k / min_p /
    repetition_penalty; each other field the source set is named in a note, as GGUF cannot hold it."""
    fields = source_fields(gen)
    special: dict[str, int] = {}
    sampling: dict[str, float | int] = {}
    notes: list[str] = []
    eos = fields.pop("eos_token_id", None)
    if eos is not None:
        ids = [eos] if isinstance(eos, int) else list(eos)
        if ids:
            special["eos"] = int(ids[0])
        if len(ids) > 1:
            notes.append(f"generation_config eos_token_id {ids}: GGUF holds one EOS id, {ids[0]} is kept "
                         f"({', '.join(map(str, ids[1:]))} not held)")
    for key, kind in (("pad_token_id", "pad"), ("bos_token_id", "bos")):
        value = fields.pop(key, None)
        if isinstance(value, int):
            special[kind] = value
    for key, gguf_key in GGUF_SAMPLING.items():
        value = fields.pop(key, None)
        if value is not None:
            sampling[gguf_key] = int(value) if key == "top_k" else float(value)
    if fields:
        notes.append("generation_config fields GGUF cannot hold: "
                     + ", ".join(f"{k}={v!r}" for k, v in sorted(fields.items())))
    return special, sampling, notes


def add_gguf_sampling(writer, sampling: dict[str, float | int]) -> None:
    """Write ``general.sampling.*`` values (from ``gguf_generation``) into a GGUFWriter."""
    import gguf

    for key, value in sampling.items():
        if isinstance(value, int):
            writer.add_key_value(key, value, gguf.GGUFValueType.INT32)
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType.FLOAT32)
