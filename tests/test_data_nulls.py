"""Lossless data path (issue 42): null, empty and non-string texts are skipped and counted by
every reader, never stringified to "None"; a source with nothing left is refused with one line."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binarize.calibration.streams import load_documents, read_documents
from binarize.errors import BinarizeError
from tests.test_cli_errors import assert_one_line_error, run_cli

RECORDS = ["first document", None, "", "   \n", 5, ["a", "list"], {"x": 1}, "second document"]
KEPT = ["first document", "second document"]
COUNTS = {"null": 1, "empty": 2, "non-string": 3}


def _jsonl(path, values, field="text"):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for v in values:
            f.write(json.dumps({field: v, "id": 0}) + "\n")
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_skips_and_counts_unusable_texts(tmp_path, name):
    got = read_documents(str(_jsonl(tmp_path / name, RECORDS)))
    assert got.docs == KEPT and "None" not in got.docs
    assert got.skipped == COUNTS
    assert load_documents(str(tmp_path / name))[0] == KEPT


def test_parquet_skips_and_counts_nulls_empties_and_non_strings(tmp_path):
    pq.write_table(pa.table({"text": ["first document", None, "", "  ", "second document"]}), tmp_path / "s.parquet")
    got = read_documents(str(tmp_path / "s.parquet"))
    assert got.docs == KEPT and got.skipped == {"null": 1, "empty": 2}
    pq.write_table(pa.table({"text": [1, 2, None]}), tmp_path / "n.parquet")  # a column of numbers
    with pytest.raises(BinarizeError, match=r"no usable text: every 'text' value was skipped \(1 null, 2 non-string\)"):
        read_documents(str(tmp_path / "n.parquet"))


@pytest.mark.parametrize("name", ["all.jsonl", "all.jsonl.gz"])
def test_a_file_with_no_usable_text_is_refused(tmp_path, name):
    _jsonl(tmp_path / name, [None, None, ""])
    with pytest.raises(BinarizeError, match=r"has no usable text: every 'text' value was skipped \(2 null, 1 empty\)"):
        read_documents(str(tmp_path / name))


def test_hub_rows_skip_and_count_unusable_texts(monkeypatch):
    import datasets

    def fake_load(hub_id, config, split, streaming, **kw):
        return iter({"text": v} for v in RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = read_documents("hf:someone/some-data")
    assert got.docs == KEPT and got.skipped == COUNTS
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"text": None}] * 3))
    with pytest.raises(BinarizeError, match=r"hub dataset someone/some-data \(train\) has no usable text: .*\(3 null\)"):
        read_documents("hf:someone/some-data")


def test_the_counts_go_to_the_run_record(tiny_model_dir, small_text, tmp_path, capsys):
    """prepare_data (what convert writes to run.json's data record) names the source and its counts."""
    from transformers import AutoTokenizer

    from binarize.recipe import load_recipe
    from binarize.train import plan_budget
    from binarize.train.data import prepare_data

    lines = [line for line in small_text.read_text().splitlines() if line.strip()][:400]
    data = _jsonl(tmp_path / "d.jsonl", [v for line in lines for v in (line, None, "")])
    recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, calib_sequences=4,
                                           chunks=4, data=str(data), calib=str(data)))
    info = prepare_data(AutoTokenizer.from_pretrained(tiny_model_dir), recipe, plan_budget(recipe, 2_000)).info
    assert info["skipped_records"] == {str(data): {"null": 400, "empty": 400}}
    assert "skipped 800 records whose text is not usable (400 null, 400 empty)" in capsys.readouterr().out


def test_convert_on_an_all_null_file_is_one_line(capsys, tiny_model_dir, tmp_path):
    data = _jsonl(tmp_path / "nulls.jsonl", [None] * 50)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", str(tiny_model_dir), "--tokens", "1k", "--data", str(data), "--out",
                        str(out), "--seq-len", "64", "--batch-tokens", "256", "--chunks", "4", "--no-progress")
    assert_one_line_error(code, err, "has no usable text: every 'text' value was skipped (50 null)")
    assert not out.exists() and not out.with_name("out.partial").exists()
