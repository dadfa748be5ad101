import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from binarize.calibration.datasets import DATASETS, local_file
from binarize.calibration.streams import TokenBlocks, TrainStream, load_documents, named_rows, tokenize_documents
from binarize.errors import BinarizeError


def test_file_formats_give_the_same_documents(tmp_path):
    docs = ["first document.\nwith two lines", "second one", "third, the last"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    assert load_documents(str(tmp_path / "a.txt"))[0] == ["\n\n".join(docs)]
    assert load_documents(str(tmp_path / "a.jsonl"))[0] == docs
    assert load_documents(str(tmp_path / "a.jsonl.gz") + "#body")[0] == docs
    assert load_documents(str(tmp_path / "a.parquet"))[0] == docs


def test_bad_data_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(BinarizeError, match="empty"):
        load_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(BinarizeError, match="not found"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(BinarizeError, match="bad.jsonl:2"):
        load_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(BinarizeError, match="no 'text' field"):
        (tmp_path / "f.jsonl").write_text('{"body": "x"}\n')
        load_documents(str(tmp_path / "f.jsonl"))


def test_named_local_files_match_their_definitions():
    if local_file(DATASETS["wikitext2"].splits["test"]) is None:
        pytest.skip("shared data not present")
    rows, where = named_rows("wikitext2", "test")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    ptb, _ = named_rows("ptb", "test")
    assert len(ptb) == 3761 and not ptb[0].startswith(" ")
    c4, _ = named_rows("c4", "validation")
    assert len(c4) == 1025 and c4[0].startswith("The woman who died")
    with pytest.raises(BinarizeError, match="no split"):
        named_rows("ptb", "dev")


def test_tokenize_pieces_and_eos(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "\n".join(f"line number {i} of the text" for i in range(400))
    whole = tok(text, add_special_tokens=False)["input_ids"]
    pieced = tokenize_documents(tok, [text], piece_chars=1000)
    assert pieced.tolist() == whole  # newline-aligned pieces tokenize like the whole string
    two = tokenize_documents(tok, ["a b", "c d"])
    assert tok.eos_token_id in two.tolist()


def test_train_stream_is_seeded_and_covers_each_epoch():
    blocks = TokenBlocks.from_stream(torch.arange(10 * 4 + 3), 4)
    assert len(blocks) == 10  # the 3-token tail is dropped
    a, b, c = TrainStream(blocks, seed=1), TrainStream(blocks, seed=1), TrainStream(blocks, seed=2)
    first = a.get(0, 10)
    assert sorted(first[:, 0].tolist()) == list(range(0, 40, 4))  # a permutation of all blocks
    assert torch.equal(first, b.get(0, 10)) and not torch.equal(first, c.get(0, 10))
    # position-addressed: reading 3 then 7 gives the same as reading 10 at once, and epochs reshuffle
    assert torch.equal(torch.cat([b.get(0, 3), b.get(3, 7)]), first)
    assert not torch.equal(a.get(10, 10), first)
