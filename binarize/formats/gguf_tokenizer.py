"""Tokenizer metadata for a GGUF: copied from the source GGUF a run came from, or built from the
run's byte-level BPE ``tokenizer.json`` (tokens, merges, special tokens, chat template; the
llama.cpp pre-tokenizer name read off its structure)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BinarizeError
from .gguf_q1 import _gguf


def _source_gguf(run_dir: Path) -> Path | None:
    """The GGUF a run was converted from, when it is still on this machine."""
    from ..models import DEFAULT_MODEL_NAME, default_model_file

    try:
        spec = json.loads((run_dir / "run.json").read_text()).get("model", "")
    except (OSError, json.JSONDecodeError):
        return None
    if spec == DEFAULT_MODEL_NAME:
        try:
            return default_model_file()
        except BinarizeError:
            return None
    p = Path(spec).expanduser()
    return p if p.suffix == ".gguf" and p.is_file() else None


SPECIAL_KEYS = {"eos": "tokenizer.ggml.eos_token_id", "pad": "tokenizer.ggml.padding_token_id",
                "bos": "tokenizer.ggml.bos_token_id"}


def copy_tokenizer_fields(writer, source: Path, special_ids: dict[str, int] | None = None) -> None:
    """The source GGUF's ``tokenizer.*`` fields; ``special_ids`` (eos / pad / bos, from the run's
    generation_config) replace the ids it holds."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    override = {SPECIAL_KEYS[k]: v for k, v in (special_ids or {}).items() if k in SPECIAL_KEYS}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            if key in override:
                writer.add_key_value(key, override.pop(key), gguf.GGUFValueType.UINT32)
                continue
            sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for key, value in override.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for the byte-level BPE structures we recognise."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # llama.cpp's smollm/starcoder group: single digits, then the GPT-2 regex
    if kinds == ["Split", "ByteLevel"]:
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern and "\\p{N}{1,3}" in pattern:
            return "llama-bpe"
    return "default"


def add_hf_tokenizer_fields(writer, tokenizer, tok_dir: Path, n_vocab: int,
                            special_ids: dict[str, int] | None = None) -> str:
    """Tokens, types, merges, special ids and chat template from a byte-level BPE tokenizer.json;
    ``special_ids`` (eos / pad / bos, from the run's generation_config) take precedence."""
    gguf = _gguf()
    try:
        tj = json.loads((tok_dir / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise BinarizeError(f"{tok_dir}: no readable tokenizer.json for the GGUF tokenizer metadata") from None
    if (tj.get("model") or {}).get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise BinarizeError(f"{tok_dir}: only byte-level BPE tokenizers are mapped to GGUF metadata")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i, text in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        tokens.append(text)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for i in range(len(tokens), n_vocab):  # the embedding may be padded past the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    pre = _pre_tokenizer_name(tj)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=n_vocab)
    special.special_token_ids.update({k: v for k, v in (special_ids or {}).items() if 0 <= v < n_vocab})
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return pre
