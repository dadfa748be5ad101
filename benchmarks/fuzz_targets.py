"""One fuzz target per reader: a Hypothesis strategy of cases and a check that runs the reader on
the mutated input and applies the oracle (``fuzz_readers.py`` has the outcomes and mutations)."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml
from hypothesis import strategies as st

from fuzz_readers import (BYTE_OPS, JUNK, Altered, Fixtures, SilentAccept, any_op, check_recipe_values, dump_json,
                          exact_tokens, mutate_bytes, mutated_file, scratch, tensors_equal)


@dataclass
class Target:
    """A reader under fuzzing: ``check(case)`` returns on success and raises otherwise."""

    name: str
    strategy: st.SearchStrategy
    check: Callable[[Any], None]
    seconds: float = 10.0  # per-case time limit


def _fields() -> list[str]:
    from binarize.recipe import Recipe

    return list(Recipe().to_dict())


SET_VALUES = st.one_of(st.text(max_size=12), JUNK.map(str), st.sampled_from(
    [".nan", "nan", "inf", "-.inf", "1e999", "9" * 400, "[0.9, x]", "[]", "[1, 2, 3]", "{a: 1}", "2024-01-01",
     "yes", "~", "1e-4", "0x10", "'1'", "!!python/object:os.system x", "[" * 50]))


def recipe_targets(fx: Fixtures) -> list[Target]:
    from binarize.recipe import load_recipe, parse_set, parse_tokens

    base_text = fx.recipe_yaml.read_bytes()
    base = yaml.safe_load(base_text)

    def recipe_yaml(case):
        op, as_yaml = case
        with scratch() as d:
            p = d / "r.yaml"
            if as_yaml and op[0] in ("remove", "set", "add"):
                p.write_text(yaml.safe_dump(json.loads(mutated_file(b"", base, op) or b"null"), allow_unicode=True))
            else:
                p.write_bytes(mutate_bytes(base_text, op) if op[0] not in ("remove", "set", "add") else base_text)
            check_recipe_values(load_recipe(str(p)))

    def set_values(items):
        check_recipe_values(load_recipe("binaryllm", parse_set(items)))

    def tokens(case):
        text, allow_zero = case
        n = parse_tokens(text, allow_zero)
        want = exact_tokens(text)
        if want is None or n != want:
            raise SilentAccept(f"--tokens {text!r} read as {n} (means {want})")

    item = st.one_of(st.tuples(st.sampled_from(_fields()), SET_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
                     st.text(max_size=20))
    token_text = st.one_of(st.text(max_size=12), st.from_regex(r"\s*[+-]?[0-9_,]{1,30}(\.[0-9]{0,20})?[kKmMbBgGtT]?\s*",
                                                               fullmatch=True))
    return [Target("recipe yaml", st.tuples(any_op(), st.booleans()), recipe_yaml),
            Target("--set values", st.lists(item, max_size=4), set_values),
            Target("--tokens", st.tuples(token_text, st.booleans()), tokens)]


def path_target(fx: Fixtures) -> Target:
    """Path-like arguments: a model spec, a data spec, a recipe name or path."""
    from binarize.models import resolve_model
    from binarize.calibration.streams import read_documents
    from binarize.recipe import load_recipe

    real = [str(fx.packed), str(fx.gguf), str(fx.data["jsonl"]) + "#text", str(fx.root / "missing.gguf"),
            str(fx.root), "~/nothing", "org/name", "a/b/c", "hf:", "self+ptb:0.5"]
    spec = st.one_of(st.text(max_size=40).filter(lambda s: not s.startswith("hf:")),
                     st.sampled_from(real), st.tuples(st.sampled_from(real), st.text(max_size=8)).map("".join),
                     st.just("x" * 300), st.just("a\x00b"))

    def check(case):
        kind, s = case
        if kind == "model":
            resolve_model(s)
        elif kind == "data":
            if s.startswith("hf:"):
                return
            docs = read_documents(s)
            if not docs.docs or not all(isinstance(d, str) and d.strip() for d in docs.docs):
                raise SilentAccept(f"data {s!r} gave an empty or non-text document")
        else:
            check_recipe_values(load_recipe(s))

    return Target("paths", st.tuples(st.sampled_from(["model", "data", "recipe"]), spec), check)


def data_target(fx: Fixtures) -> Target:
    from binarize.calibration.streams import read_documents

    sources = {k: p.read_bytes() for k, p in fx.data.items()}
    records = [json.loads(line) for line in sources["jsonl"].decode().splitlines()]

    def check(case):
        kind, op, structured, field = case
        with scratch() as d:
            path = d / f"data.{kind}"
            if structured and kind != "txt":
                recs = [dict(r) for r in records]
                i = min(int(op[1] * len(recs)), len(recs) - 1)
                if op[0] == "set":
                    recs[i]["text"] = op[2]
                else:
                    del recs[i]["text"]
                if kind == "parquet":
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    try:
                        table = pa.Table.from_pylist(recs)
                    except (pa.ArrowException, OverflowError):
                        return  # pyarrow cannot hold the mixed column: no file to read
                    pq.write_table(table, path)
                else:
                    body = b"".join(dump_json(r) + b"\n" for r in recs)
                    path.write_bytes(gzip.compress(body) if kind == "jsonl.gz" else body)
            else:
                path.write_bytes(mutate_bytes(sources[kind], op))
            docs = read_documents(str(path) + ("#" + field if field else ""))
            for t in docs.docs:
                if not isinstance(t, str) or not t.strip():
                    raise SilentAccept(f"{kind}: document {t!r} accepted")
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise SilentAccept(f"{kind}: text that is not valid Unicode accepted") from None

    struct_op = st.one_of(st.tuples(st.just("set"), st.floats(0, 1), JUNK), st.tuples(st.just("remove"), st.floats(0, 1)))
    case = st.one_of(st.tuples(st.sampled_from(list(fx.data)), BYTE_OPS, st.just(False), st.sampled_from(["", "", "id"])),
                     st.tuples(st.sampled_from(["jsonl", "jsonl.gz", "parquet"]), struct_op, st.just(True), st.just("")))
    return Target("data files", case, check)


def _model_fingerprint(model, tok) -> dict:
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "config": cfg,
            "tokenizer": tok.backend_tokenizer.to_str(), "template": getattr(tok, "chat_template", None),
            "special": tok.special_tokens_map, "generation": model.generation_config.to_dict()}


def _same(a: dict, b: dict) -> str | None:
    """The first part in which two fingerprints differ (None: the same model)."""
    if not tensors_equal(a["state"], b["state"]):
        return "weights"
    for k in ("config", "tokenizer", "template", "special", "generation"):
        if json.dumps(a[k], sort_keys=True, default=str) != json.dumps(b[k], sort_keys=True, default=str):
            return k
    return None


def packed_target(fx: Fixtures) -> Target:
    from binarize.formats.packed_reader import load_packed

    files = sorted(p.name for p in fx.packed.iterdir() if p.name != "loss.png")
    model, tok, _ = load_packed(fx.packed)
    ref = _model_fingerprint(model, tok)

    def check(case):
        name, op = case
        with scratch() as d:
            out = d / "export"
            shutil.copytree(fx.packed, out)
            raw = (out / name).read_bytes()
            try:
                doc = json.loads(raw) if name.endswith(".json") else None
            except ValueError:
                doc = None
            new = mutated_file(raw, doc, op) if doc is not None or op[0] not in ("remove", "set", "add") else raw
            (out / name).write_bytes(new)
            m, t, _ = load_packed(out)
            what = _same(_model_fingerprint(m, t), ref)
            if what:
                raise SilentAccept(f"{name} {op[0]}: loaded a different model ({what})")

    return Target("packed export", st.tuples(st.sampled_from(files), any_op()), check)


def gguf_target(fx: Fixtures) -> Target:
    """GGUF input files: bytes mutated anywhere, or in the header (the first 4 KiB)."""
    from binarize.models import load_model

    raw = fx.gguf.read_bytes()
    model, tok, _ = load_model(str(fx.gguf))
    ref = _model_fingerprint(model, tok)

    def check(case):
        op, head = case
        if head:
            op = (op[0], op[1] * min(1.0, 4096 / len(raw)), *op[2:])
        with scratch() as d:
            p = d / "m.gguf"
            p.write_bytes(mutate_bytes(raw, op))
            m, t, _ = load_model(str(p))
            if any(not torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point()):
                raise SilentAccept("non-finite weights loaded")
            if m.get_input_embeddings().weight.shape[0] < len(t):
                raise SilentAccept("tokenizer larger than the embedding")
            what = _same(_model_fingerprint(m, t), ref)
            if what:
                raise Altered(f"loaded with different {what} (GGUF holds no checksum)")

    return Target("gguf input", st.tuples(BYTE_OPS, st.booleans()), check, seconds=20.0)


def record_targets(fx: Fixtures) -> list[Target]:
    from binarize.train.resume_state import read_checkpoint_state
    from binarize.recipe import Recipe
    from binarize.train.record import RunRecord

    run_raw = (fx.run / "run.json").read_bytes()
    run_doc = json.loads(run_raw)
    state_doc = {"phase": "qat", "step": 3, "fsdp": False, "recipe": run_doc["recipe"], "record": run_doc}
    state_raw = json.dumps(state_doc).encode()

    def numbers_ok(rec) -> None:
        for s in rec.steps:
            for k in ("step", "chunk", "t", "lam", "lr", "loss", "tokens", "tokens_per_s", "wall_s"):
                v = getattr(s, k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (k != "t" and not math.isfinite(v)):
                    raise SilentAccept(f"step {k}={v!r} accepted")
        tok = rec.tokens
        for k in ("requested", "seq_len", "sequences", "budget_used", "per_step", "optimizer_steps", "trained"):
            v = getattr(tok, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SilentAccept(f"tokens.{k}={v!r} accepted")
        if not isinstance(rec.recipe, dict) or not isinstance(rec.data, dict):
            raise SilentAccept("recipe or data record is not a mapping")
        rec.tail_loss()
        json.dumps(rec.to_dict())

    def run_json(op):
        with scratch() as d:
            (d / "run.json").write_bytes(mutated_file(run_raw, run_doc, op))
            numbers_ok(RunRecord.read(d))

    def state(op):
        with scratch() as d:
            (d / "checkpoint").mkdir()
            (d / "checkpoint" / "state.json").write_bytes(mutated_file(state_raw, state_doc, op))
            s = read_checkpoint_state(d)
            # what run.py reads from it on --resume
            check_recipe_values(Recipe(**s["recipe"]).validate())
            numbers_ok(RunRecord.from_dict(s["record"]))
            if s["phase"] not in ("bai", "blockwise", "qat") or not isinstance(s["step"], int) or s["step"] < 0:
                raise SilentAccept(f"phase {s['phase']!r} step {s['step']!r} accepted")
            bool(s.get("fsdp")), s.get("init")

    return [Target("run.json", any_op(), run_json), Target("checkpoint state", any_op(), state)]


def all_targets(fx: Fixtures) -> list[Target]:
    return [*recipe_targets(fx), path_target(fx), data_target(fx), packed_target(fx), gguf_target(fx),
            *record_targets(fx)]
