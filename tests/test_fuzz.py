"""The CI slice of the reader fuzz campaign (``benchmarks/fuzz.py``): a few Hypothesis cases per
reader, each ending in success or one BinarizeError line (no traceback, no hang, no silent accept
of corrupt data), and the regressions the campaign found, one test each."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_readers import build_fixtures, classify  # noqa: E402
from fuzz_targets import all_targets  # noqa: E402

from binarize.errors import BinarizeError  # noqa: E402

READERS = ["recipe yaml", "--set values", "--tokens", "paths", "data files", "packed export", "gguf input",
           "run.json", "checkpoint state"]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, small_text):
    """A 1-block model with a 320-token vocabulary: its run, packed export, GGUF and data files (~5 s)."""
    return build_fixtures(tmp_path_factory.mktemp("fuzz"), small_text)


@pytest.fixture(scope="module")
def targets(fixtures):
    return {t.name: t for t in all_targets(fixtures)}


@pytest.mark.parametrize("reader", READERS)
def test_mutated_input_is_read_or_refused_in_one_line(targets, reader):
    target = targets[reader]

    @settings(max_examples=25, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        case = data.draw(target.strategy)
        outcome, detail = classify(target.check, case, target.seconds)
        assert outcome in ("success", "error", "altered"), f"{reader}: {outcome}: {detail}"

    run()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_packed_export_refuses_a_changed_tokenizer_or_config(fixtures, tmp_path):
    from binarize.formats.packed_reader import load_packed

    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        d = _copy(fixtures.packed, tmp_path / name)
        raw = bytearray((d / name).read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one bit: still valid JSON, a different model
        (d / name).write_bytes(bytes(raw))
        with pytest.raises(BinarizeError, match="checksum mismatch"):
            load_packed(d)
    d = _copy(fixtures.packed, tmp_path / "list")
    (d / "binarize.json").write_text("[]")
    with pytest.raises(BinarizeError, match="not a JSON object"):
        load_packed(d)
    meta = json.loads((fixtures.packed / "binarize.json").read_text())
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(meta["file_checksums"])


def test_token_budgets_are_exact_and_never_overflow():
    from binarize.recipe import parse_tokens

    assert parse_tokens("123456789012345678901") == 123456789012345678901
    assert parse_tokens("1.5k") == 1500
    with pytest.raises(BinarizeError):
        parse_tokens("9" * 400 + ".5")  # was OverflowError / a rounded float


@pytest.mark.parametrize("text", ["lr: .nan", "bai_lr: .inf", "switch_at: .inf", f"lr: {'9' * 400}",
                                  "betas: [0.9, x]", "\xff\xfe: 1"])
def test_recipe_refuses_non_finite_and_undecodable_values(tmp_path, text):
    from binarize.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(BinarizeError):
        load_recipe(str(p))


def test_damaged_data_files_are_one_line(fixtures, tmp_path):
    from binarize.calibration.streams import read_documents

    for kind, damage in [("jsonl.gz", lambda b: b[:len(b) // 2]), ("parquet", lambda b: b[:-9]),
                         ("txt", lambda b: b"\xff" + b), ("jsonl", lambda b: b'{"text": "\\ud800"}\n')]:
        p = tmp_path / f"d.{kind}"
        p.write_bytes(damage(fixtures.data[kind].read_bytes()))
        with pytest.raises(BinarizeError, match="unreadable data file"):
            read_documents(str(p))
    with pytest.raises(BinarizeError, match="not found"):
        read_documents("x" * 300)


def test_damaged_gguf_and_bad_model_paths_are_one_line(fixtures, tmp_path):
    from binarize.models import load_model

    p = tmp_path / "t.gguf"
    p.write_bytes(fixtures.gguf.read_bytes()[:3000])
    with pytest.raises(BinarizeError, match="cannot load model|GGUF"):
        load_model(str(p))
    with pytest.raises(BinarizeError, match="cannot be used"):
        load_model("x" * 300)
    from binarize.calibration.streams import read_documents
    from binarize.models import resolve_model

    with pytest.raises(BinarizeError, match="cannot be used"):
        resolve_model("~no-such-user-xyz/m")  # was RuntimeError: Could not determine home directory
    with pytest.raises(BinarizeError, match="not found"):
        read_documents("~no-such-user-xyz/d.txt")
    with pytest.raises(BinarizeError) as exc:
        resolve_model("/no/such\ndir")
    assert "\n" not in str(exc.value)


def test_run_record_and_checkpoint_state_are_checked(fixtures, tmp_path):
    from binarize.train.resume_state import read_checkpoint_state
    from binarize.train.record import RunRecord

    doc = json.loads((fixtures.run / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**doc, "tokens": {**doc["tokens"], "requested": "many"}}))
    with pytest.raises(BinarizeError, match="tokens.requested"):
        RunRecord.read(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    state = {"phase": "qat", "step": 3, "fsdp": False, "recipe": doc["recipe"], "record": doc}
    for broken in ({**state, "recipe": {**doc["recipe"], "lr": None}}, {**state, "step": "3"}, [state],
                   {k: v for k, v in state.items() if k != "record"}):
        (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(broken))
        with pytest.raises(BinarizeError):
            read_checkpoint_state(tmp_path)
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    assert read_checkpoint_state(tmp_path)["step"] == 3
