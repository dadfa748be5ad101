"""Text sources -> token streams -> fixed-length blocks -> seeded training order.

A source spec is one of
  * a named dataset: ``ptb`` (its train split), ``ptb:test``, ``wikitext2:test``, ``c4:validation``
  * a local file: ``.txt`` (one document), ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` (one
    document per record, field ``text`` unless ``FILE#field``)
  * a hub dataset: ``hf:ID[:CONFIG[:SPLIT]]`` (streamed with ``datasets``, field ``text``).
Documents are tokenized and joined with EOS between them, then cut into blocks of seq_len.
Records whose text is null, empty or not a string are skipped and counted (``Documents.skipped``),
never turned into the text "None"; a source left with no text is refused.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from binarize.errors import BinarizeError

from .datasets import DATASETS, local_file, sha256_of

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix)


SKIP_REASONS = ("null", "empty", "non-string")


def keep_texts(values: Iterable, skipped: dict[str, int], keep_empty: bool = False) -> list[str]:
    """The values that are non-empty strings; the others are counted in ``skipped`` by reason
    (``SKIP_REASONS``: None, whitespace only, any other type) and dropped, never stringified.
    ``keep_empty`` keeps empty strings (a named evaluation set's rows, whose joins they shape)."""
    out = []
    for v in values:
        reason = ("null" if v is None else "non-string" if not isinstance(v, str)
                  else "empty" if not keep_empty and not v.strip() else None)
        if reason is None:
            out.append(v)
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    return out


def skipped_summary(skipped: dict[str, int]) -> str:
    """``3 null, 1 empty`` for the counts of ``keep_texts`` (empty string when nothing was skipped)."""
    return ", ".join(f"{skipped[r]} {r}" for r in SKIP_REASONS if skipped.get(r))


def _refuse_if_none_left(docs: list[str], skipped: dict[str, int], what: str, field_name: str) -> None:
    if not docs:
        if skipped:
            raise BinarizeError(f"{what} has no usable text: every {field_name!r} value was skipped "
                                f"({skipped_summary(skipped)})")
        raise BinarizeError(f"{what} is empty")


@dataclass
class Documents:
    """A source's documents, where they came from, and how many records were skipped by reason
    (null, empty or non-string text; ``keep_texts``)."""

    docs: list[str]
    where: str
    skipped: dict[str, int] = field(default_factory=dict)


def named_rows(name: str, split: str | None = None, *, max_chars: int | None = None,
               skipped: dict[str, int] | None = None) -> tuple[list[str], str]:
    """Rows of a named split in the hub's layout (local file when present, else the hub); empty
    rows are kept (they shape the joined text of the evaluation protocol), null and non-string
    ones are dropped and counted in ``skipped``."""
    skipped = {} if skipped is None else skipped
    d = DATASETS[name]
    split = split or d.default_split
    if split not in d.splits:
        raise BinarizeError(f"dataset {name} has no split {split!r} (splits: {', '.join(d.splits)})")
    sdef = d.splits[split]
    path = local_file(sdef)
    if path is not None:
        if sdef.sha256 and sha256_of(path) != sdef.sha256:
            raise BinarizeError(f"{path}: sha256 does not match the {name}:{split} definition")
        text = _read_text(path) if d.local_format != "jsonl" else ""
        if d.local_format == "wikitext-raw":
            # The hub rows are the file's lines with their newline; whitespace-only lines are "".
            rows = [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]
        elif d.local_format == "lines":
            rows = [line.strip() for line in text.split("\n") if line.strip()]
        else:
            rows = _jsonl_texts(path, d.text_field, skipped, keep_empty=True)
        return rows, str(path)
    try:
        rows = _hub_rows(d.hub_id, d.hub_config, sdef.hub_split, d.text_field, sdef.hub_data_files, max_chars,
                         skipped, keep_empty=True)
    except BinarizeError as exc:
        hint = f" and no local file {sdef.local} under the data dir" if sdef.local else " (no local copy is defined)"
        raise BinarizeError(f"{exc}{hint}") from None
    return rows, f"hub:{d.hub_id}/{d.hub_config}/{sdef.hub_split}"


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _jsonl_texts(path: Path, field: str, skipped: dict[str, int], keep_empty: bool = False) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    values = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise BinarizeError(f"{path}:{n}: not a JSON line") from None
            if not isinstance(rec, dict) or field not in rec:
                raise BinarizeError(f"{path}:{n}: record has no {field!r} field")
            if isinstance(rec[field], str):
                rec[field].encode("utf-8")  # UnicodeEncodeError (a ValueError): a lone surrogate escape, not text
            values.append(rec[field])
    return keep_texts(values, skipped, keep_empty)


def _hub_rows(hub_id, config, split, field, data_files=None, max_chars=None, skipped: dict[str, int] | None = None,
              keep_empty: bool = False) -> list[str]:
    """Rows of a hub dataset (streamed) up to ``max_chars``; null, non-string (and, unless
    ``keep_empty``, empty) values are counted in ``skipped``. BinarizeError on any failure."""
    skipped = {} if skipped is None else skipped
    try:
        import datasets

        kw = {"data_files": {split: data_files}} if data_files else {}
        ds = datasets.load_dataset(hub_id, config, split=split, streaming=True, **kw)
        rows, total = [], 0
        for rec in ds:
            if not isinstance(rec, dict) or field not in rec:
                raise BinarizeError(f"record has no {field!r} field")
            kept = keep_texts([rec[field]], skipped, keep_empty)
            rows += kept
            total += sum(len(t) for t in kept)
            if max_chars and total >= max_chars:
                break
        return rows
    except Exception as exc:  # network, missing dataset, bad field: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BinarizeError(f"cannot load hub dataset {hub_id} ({split}): {first}") from None


def load_documents(spec: str, *, max_chars: int | None = None) -> tuple[list[str], str]:
    """Training/calibration documents for a source spec, plus a description of where from
    (``read_documents`` without the skip counts). Raises BinarizeError."""
    d = read_documents(spec, max_chars=max_chars)
    return d.docs, d.where


def read_documents(spec: str, *, max_chars: int | None = None) -> Documents:
    """Training/calibration documents for a source spec, where they came from and the records
    skipped for a null, empty or non-string text. Raises BinarizeError for a missing or
    unreadable source and for one that holds no usable text."""
    skipped: dict[str, int] = {}
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        hub_id, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
        rows = _hub_rows(hub_id, config, split, "text", None, max_chars, skipped)
        _refuse_if_none_left(rows, skipped, f"hub dataset {hub_id} ({split})", "text")
        return Documents(rows, spec, skipped)
    name, _, split = spec.partition(":")
    if name in DATASETS:
        rows, where = named_rows(name, split or None, max_chars=max_chars, skipped=skipped)
        if DATASETS[name].local_format == "jsonl":
            rows = keep_texts(rows, skipped)
            _refuse_if_none_left(rows, skipped, f"dataset {spec}", DATASETS[name].text_field)
            return Documents(rows, where, skipped)
        joiner = "" if DATASETS[name].local_format == "wikitext-raw" else "\n"
        return Documents([joiner.join(rows)], where, skipped)  # one running text, as in the original file
    file_part, _, field = spec.partition("#")
    path = Path(file_part)
    try:
        path = path.expanduser()
        return _read_file(path, field, skipped)
    except (OSError, ValueError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:  # bad UTF-8, gzip,
        # parquet; RuntimeError: ~user of no such user
        if not _exists(path):
            known = ", ".join(DATASETS)
            raise BinarizeError(f"data source not found: {spec[:200]!r} (a file, hf:ID, or one of {known})") from None
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise BinarizeError(f"{path}: unreadable data file ({type(exc).__name__}: {first})") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _read_file(path: Path, field: str, skipped: dict[str, int]) -> Documents:
    if not path.exists():
        raise FileNotFoundError(path)
    suffix = _suffix(path)
    if suffix == ".txt":
        docs = [_read_text(path)]
    elif suffix in (".jsonl", ".jsonl.gz", ".json.gz"):
        docs = _jsonl_texts(path, field or "text", skipped)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = field or "text"
        if col not in table.column_names:
            raise BinarizeError(f"{path}: no column {col!r} (columns: {', '.join(table.column_names)})")
        docs = keep_texts(table.column(col).to_pylist(), skipped)
    else:
        raise BinarizeError(f"unsupported data file type {path.name!r} (use {', '.join(FILE_SUFFIXES)})")
    docs = keep_texts(docs, skipped) if suffix == ".txt" else docs
    _refuse_if_none_left(docs, skipped if suffix != ".txt" else {}, f"data file {path}", field or "text")
    return Documents(docs, str(path), skipped)


def tokenize_documents(tokenizer, docs: list[str], piece_chars: int = 200_000) -> torch.Tensor:
    """One int64 stream: documents' tokens with EOS between them.

    Long documents are tokenized in newline-aligned pieces of ~piece_chars so a 5 MB file
    does not go through the tokenizer as one string.
    """
    eos = tokenizer.eos_token_id
    pieces: list[list[int]] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            pieces.append([eos])
        start = 0
        while start < len(doc):
            end = len(doc) if len(doc) - start <= piece_chars else doc.rfind("\n", start, start + piece_chars) + 1
            if end <= start:
                end = start + piece_chars
            pieces.append(tokenizer(doc[start:end], add_special_tokens=False)["input_ids"])
            start = end
    return torch.tensor([tok for piece in pieces for tok in piece], dtype=torch.long)


def join_sequences(seqs: list[list[int]], eos: int | None) -> torch.Tensor:
    """One int64 stream of already tokenized documents (self-generated ids) with EOS between
    them, as ``tokenize_documents`` joins text: the ids go in exactly as they are."""
    flat: list[int] = []
    for i, s in enumerate(seqs):
        if i and eos is not None:
            flat.append(eos)
        flat.extend(s)
    return torch.tensor(flat, dtype=torch.long)


@dataclass
class TokenBlocks:
    """A token stream cut into non-overlapping blocks of seq_len (the tail is dropped)."""

    blocks: torch.Tensor  # (n, seq_len) int64

    @classmethod
    def from_stream(cls, ids: torch.Tensor, seq_len: int) -> "TokenBlocks":
        n = ids.numel() // seq_len
        return cls(ids[: n * seq_len].view(n, seq_len))

    def __len__(self) -> int:
        return self.blocks.shape[0]


class TrainStream:
    """Blocks in a seeded order, one fresh permutation per epoch, addressed by position.

    Sequence g of the run is block perm_{g // n}[g % n]: the order is a pure function of
    (seed, g), so a resumed run sees exactly the sequences an uninterrupted one would.
    """

    def __init__(self, blocks: TokenBlocks, seed: int, allow_empty: bool = False):
        if len(blocks) == 0 and not allow_empty:  # allow_empty: a run that trains nothing (--tokens 0)
            raise BinarizeError("training data is shorter than one sequence")
        self.blocks, self.seed = blocks, seed
        self._epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.blocks), generator=g), epoch
        return self._perm

    def get(self, start: int, count: int) -> torch.Tensor:
        n = len(self.blocks)
        idx = [int(self._perm_for(g // n)[g % n]) for g in range(start, start + count)]
        return self.blocks.blocks[idx]
