"""The readers ``benchmarks/fuzz.py`` and ``tests/test_fuzz.py`` fuzz, with Hypothesis strategies
that mutate a valid input (truncate, flip / insert / delete bytes; JSON and YAML fields removed,
retyped, NaN, infinite, huge) and an oracle per reader.

Every case ends in one of: ``success`` (accepted, and what was read is what was written),
``error`` (one-line BinarizeError), ``traceback`` (any other exception, or an error of several
lines), ``hang`` (past the per-case time limit) or ``silent`` (accepted, but what was read differs
from what was written where the format can tell, or breaks an invariant its reader promises).
``altered`` counts cases accepted with changed content where the format holds no checksum
(a data file's text, a GGUF's weights): information, not a failure.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no case may wait on the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from hypothesis import strategies as st

from binarize.errors import BinarizeError

OUTCOMES = ("success", "error", "traceback", "hang", "silent", "altered")


class SilentAccept(Exception):
    """The reader accepted corrupt input (raised by an oracle)."""


class Altered(Exception):
    """Accepted with changed content the format cannot detect (no checksum): not a failure."""


class Hang(BaseException):
    """The per-case time limit passed (BaseException: no reader's ``except Exception`` eats it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after ``seconds`` (SIGALRM; C code is interrupted on return)."""
    def on_alarm(signum, frame):
        raise Hang(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def classify(check: Callable[[Any], None], case: Any, seconds: float = 10.0) -> tuple[str, str]:
    """(outcome, detail) of ``check(case)``; see the module docstring for the outcomes."""
    try:
        with time_limit(seconds):
            check(case)
        return "success", ""
    except BinarizeError as exc:
        text = str(exc)
        return ("error", text) if text.strip() and "\n" not in text.strip() else ("traceback", f"bad error line: {text!r}")
    except SilentAccept as exc:
        return "silent", str(exc)
    except Altered as exc:
        return "altered", str(exc)
    except Hang as exc:
        return "hang", str(exc)
    except Exception as exc:  # noqa: BLE001  (what the fuzzing is for)
        return "traceback", f"{type(exc).__name__}: {str(exc).strip()[:200]}"


# ----------------------------------------------------------------------------------- mutations
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=10**400),
    st.integers(max_value=-(2**63)), st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

BYTE_OPS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
)


def mutate_bytes(data: bytes, op: tuple) -> bytes:
    """Apply one BYTE_OPS operation; positions are fractions of the length."""
    kind, frac = op[0], op[1]
    i = min(int(frac * len(data)), max(len(data) - 1, 0))
    if kind == "truncate":
        return data[:int(frac * len(data))]
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ op[2]]) + data[i + 1:] if data else data
    if kind == "insert":
        return data[:i] + op[2] + data[i:]
    return data[:i] + data[i + op[2]:]


def json_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key / index path in a JSON document (the root is ``()``)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            out += json_paths(v, prefix + (i,))
    return out


JSON_OPS = st.one_of(st.tuples(st.just("remove"), st.floats(0, 1)), st.tuples(st.just("set"), st.floats(0, 1), JUNK),
                     st.tuples(st.just("add"), st.text(max_size=12), JUNK))


def mutate_json(doc: Any, op: tuple) -> Any:
    """A deep copy of ``doc`` with one field removed, replaced by junk, or junk added at the root."""
    doc = json.loads(json.dumps(doc))
    if op[0] == "add":
        if isinstance(doc, dict):
            doc[op[1]] = op[2]
        return doc
    paths = json_paths(doc)
    path = paths[min(int(op[1] * len(paths)), len(paths) - 1)]
    if not path:
        return None if op[0] == "remove" else op[2]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if op[0] == "remove":
        del parent[path[-1]]
    else:
        parent[path[-1]] = op[2]
    return doc


def dump_json(doc: Any) -> bytes:
    """JSON as Python writes it, NaN and Infinity included; huge ints stay digits."""
    try:
        return json.dumps(doc).encode()
    except ValueError:  # int too long for str(): a number of 400 digits
        return b"1" * 5000


def mutated_file(original: bytes, doc: Any | None, op: tuple) -> bytes:
    """A JSON file mutated structurally (``doc`` given and a JSON_OPS op) or bytewise."""
    if doc is not None and op[0] in ("remove", "set", "add"):
        return dump_json(mutate_json(doc, op))
    return mutate_bytes(original, op)


def any_op(structured: bool = True) -> st.SearchStrategy:
    return st.one_of(BYTE_OPS, JSON_OPS) if structured else BYTE_OPS


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="binarize-fuzz-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def exact_tokens(text: str) -> Fraction | None:
    """The value a token budget's text means, exactly (None: not a plain NUMBER[SUFFIX])."""
    import re

    s = text.strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)([kmbgt]?)", s)
    if not m:
        return None
    return Fraction(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}[m.group(2)]


def check_recipe_values(recipe) -> None:
    """A validated recipe holds finite numbers of its fields' types (SilentAccept otherwise)."""
    from binarize.recipe import Recipe

    for name, default in Recipe().to_dict().items():
        v = getattr(recipe, name)
        if isinstance(default, float) and not (isinstance(v, float) and math.isfinite(v)):
            raise SilentAccept(f"{name}={v!r} accepted")
        if isinstance(default, bool) and not isinstance(v, bool):
            raise SilentAccept(f"{name}={v!r} accepted")
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in recipe.betas):
        raise SilentAccept(f"betas={recipe.betas!r} accepted")


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(a[k], b[k]) for k in a)


@dataclass
class Fixtures:
    """A tiny model's files, built once: a convert run, its packed export and GGUF, and data files."""

    root: Path
    run: Path
    packed: Path
    gguf: Path
    data: dict[str, Path]
    recipe_yaml: Path


def build_fixtures(root: Path, text_file: Path) -> Fixtures:
    """A 1-block LLaMA (64 wide) with a 320-token byte-level BPE trained on ``text_file``,
    converted with --tokens 0 (BaI 1 step), exported packed and as gguf-q1 (~5 s on one core)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from binarize.formats.gguf_writer import export_gguf
    from binarize.formats.packed_writer import export_packed
    from binarize.recipe import load_recipe, recipe_dir
    from binarize.train import ConvertJob, convert

    root.mkdir(parents=True, exist_ok=True)
    lines = text_file.read_text().splitlines()[:2000]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    recipe = load_recipe("binaryllm", dict(bai_steps=1, share_st=True, seq_len=32, batch_tokens=32, bai_batch_tokens=32,
                                           calib_sequences=2, chunks=4, data=str(text_file), calib=str(text_file)))
    run = convert(ConvertJob(model=str(root / "model"), tokens=0, out=root / "run", recipe=recipe, progress=False))
    export_packed(Path(run), root / "packed")
    export_gguf(Path(run), root / "model.gguf", "gguf-q1")
    docs = [" ".join(lines[i:i + 5]) for i in range(0, 60, 5)]
    data = {"txt": root / "d.txt", "jsonl": root / "d.jsonl", "jsonl.gz": root / "d.jsonl.gz",
            "parquet": root / "d.parquet"}
    data["txt"].write_text("\n".join(docs))
    records = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    data["jsonl"].write_text(records)
    data["jsonl.gz"].write_bytes(gzip.compress(records.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), data["parquet"])
    return Fixtures(root, Path(run), root / "packed", root / "model.gguf", data, recipe_dir() / "binaryllm.yaml")
