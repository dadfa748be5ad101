"""Self-generated data: sampling with a KV cache, caching, mixing, convert --data self."""

import gzip
import json
import re

import pytest
import torch

from binarize.calibration.selfgen import SelfGenConfig, cached_self_data, generate_sequences
from binarize.calibration.streams import load_documents
from binarize.recipe import parse_mix
from tests.test_cli_errors import assert_one_line_error, run_cli


@pytest.fixture()
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BINARIZE_CACHE", str(tmp_path / "cache"))


def test_greedy_generation_matches_transformers_generate(trained_tiny_dir, tok):
    """Temperature 0: our KV-cache loop must reproduce HF generate's greedy continuation exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    cfg = SelfGenConfig(tokens=100, seq_len=24, batch_size=4, temperature=0.0, seed=int(torch.randint(1000, ())))
    seqs = generate_sequences(model, tok, cfg)
    assert sum(map(len, seqs)) >= 100
    special = set(tok.all_special_ids)
    for s in seqs[:4]:
        assert s[0] not in special
        ref = model.generate(torch.tensor([s[:1]]), max_new_tokens=23, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)[0].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
        assert s == ref


def test_sampling_is_seeded_and_keeps_the_greedy_prefix(trained_tiny_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    cfg = SelfGenConfig(tokens=200, seq_len=32, batch_size=8, greedy_prefix=3, seed=7)
    a, b = generate_sequences(model, tok, cfg), generate_sequences(model, tok, cfg)
    c = generate_sequences(model, tok, SelfGenConfig(tokens=200, seq_len=32, batch_size=8, greedy_prefix=3, seed=8))
    assert a == b and a != c
    with torch.no_grad():
        for s in a[:4]:
            logits = model(input_ids=torch.tensor([s])).logits[0]
            assert [int(logits[i].argmax()) for i in range(3)] == s[1:4]  # top-1 after the random first token
    # a vanishing top-p keeps only the most likely token: sampling becomes greedy
    greedy = generate_sequences(model, tok, SelfGenConfig(tokens=60, seq_len=16, batch_size=4, temperature=0, seed=3))
    nucleus = generate_sequences(model, tok, SelfGenConfig(tokens=60, seq_len=16, batch_size=4, top_p=1e-6, seed=3))
    assert greedy == nucleus


def test_cache_is_reused(trained_tiny_dir, tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    from binarize.calibration import selfgen
    from binarize.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    src = resolve_model(str(trained_tiny_dir))
    cfg = SelfGenConfig(tokens=150, seq_len=32, batch_size=8)
    path, meta = cached_self_data(model, tok, src, cfg, progress=False)
    assert meta["tokens"] >= 150 and meta["tokens_per_s"] > 0
    docs, _ = load_documents(str(path))
    with gzip.open(path, "rt") as f:
        recs = [json.loads(line) for line in f]
    assert docs == [r["text"] for r in recs if r["text"].strip()] and sum(len(r["ids"]) for r in recs) == meta["tokens"]
    monkeypatch.setattr(selfgen, "generate_sequences", lambda *a, **k: pytest.fail("cache not used"))
    again, _ = cached_self_data(model, tok, src, cfg, progress=False)
    assert again == path
    with pytest.raises(pytest.fail.Exception):  # different settings: a new file
        cached_self_data(model, tok, src, SelfGenConfig(tokens=150, seq_len=32, batch_size=8, seed=1), progress=False)


@pytest.mark.parametrize("spec,expected", [("self", ("", 1.0)), ("self+ptb:0.25", ("ptb", 0.25)),
                                           ("self+wikitext2:test:0.5", ("wikitext2:test", 0.5)), ("ptb", ("ptb", 0.0))])
def test_parse_mix(spec, expected):
    assert parse_mix(spec) == expected


def test_convert_with_self_and_mixed_data(capsys, trained_tiny_dir, tmp_path, small_text):
    from binarize.cli import main

    out = tmp_path / "self-run"
    base = [str(trained_tiny_dir), "--tokens", "2048", "--seq-len", "64", "--batch-tokens", "256", "--chunks", "4",
            "--bai-steps", "2", "--set", "calib_sequences=4", "--export", "none"]
    with pytest.raises(SystemExit) as exc:
        main(["convert", *base, "--data", "self", "--out", str(out)])
    assert exc.value.code in (0, None)
    # no --progress flag and stdout is not a terminal (captured): timestamped lines, not live bars
    log = capsys.readouterr().out
    assert re.search(r"^\[\d\d:\d\d:\d\d\] self-generated [\d,]+ tokens in", log, re.M), log
    assert re.search(r"^\[\d\d:\d\d:\d\d\] QAT step 8/8 ", log, re.M), log
    info = json.loads((out / "run.json").read_text())["data"]
    assert info["train_source"].startswith("self-generated") and info["self_generation"]["tokens"] >= 2048 + 4 * 64
    assert info["calib_source"].endswith("held out of training)")

    mixed = tmp_path / "mixed-run"
    with pytest.raises(SystemExit):
        main(["convert", *base, "--data", f"self+{small_text}:0.25", "--calib", str(small_text), "--out", str(mixed)])
    info = json.loads((mixed / "run.json").read_text())["data"]
    self_part, real_part = info["train_source"].split(" + ")
    n_self, n_real = (int(p.rsplit("(", 1)[1].split()[0]) for p in (self_part, real_part))
    assert (n_self, n_real) == (8, 24)  # 2048 tokens = 32 blocks of 64: a quarter self-generated


def test_self_tokens_sizes_the_corpus_and_training_repeats_it(trained_tiny_dir, tmp_path):
    from binarize.cli import main

    out = tmp_path / "capped"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(trained_tiny_dir), "--tokens", "2048", "--seq-len", "64", "--batch-tokens", "256",
              "--chunks", "4", "--bai-steps", "2", "--set", "calib_sequences=4", "--set", "self_tokens=768",
              "--data", "self", "--no-progress", "--export", "none", "--out", str(out), "--set", "max_epochs=0"])
    assert exc.value.code in (0, None)
    run = json.loads((out / "run.json").read_text())
    info = run["data"]
    assert info["self_generation"]["settings"]["tokens"] == 768 and info["self_generation"]["tokens"] < 2048
    assert info["calib_sequences"] == 4 and info["calib_source"].endswith("held out of training)")
    assert 0 < info["train_blocks_available"] <= 768 // 64 - 4  # what is left after the held-out calibration
    assert info["epochs_over_train_data"] > 2  # 32 training sequences over a few blocks
    assert run["tokens"]["trained"] == 2048
    # by default (max_epochs 2) the same request generates enough text that nothing is read more than twice
    grown = tmp_path / "grown"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(trained_tiny_dir), "--tokens", "2048", "--seq-len", "64", "--batch-tokens", "256",
              "--chunks", "4", "--bai-steps", "2", "--set", "calib_sequences=4", "--set", "self_tokens=768",
              "--data", "self", "--no-progress", "--export", "none", "--out", str(grown)])
    assert exc.value.code in (0, None)
    info = json.loads((grown / "run.json").read_text())["data"]
    assert info["self_generation"]["settings"]["tokens"] == 2048 // 2 + 4 * 64
    assert 1 <= info["epochs_over_train_data"] <= 2


@pytest.mark.parametrize("spec", ["self+ptb", "self+ptb:1.5", "ptb+c4", "self+:0.5"])
def test_bad_mix_syntax(capsys, trained_tiny_dir, tmp_path, spec):
    out = tmp_path / "o"
    code, err = run_cli(capsys, "convert", str(trained_tiny_dir), "--tokens", "2048", "--data", spec, "--out", str(out))
    assert_one_line_error(code, err, "data mix")
    assert not out.exists()


def test_generate_data_cli(capsys, trained_tiny_dir, tmp_path, monkeypatch):
    from binarize.cli import main

    out = tmp_path / "gen.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(["generate-data", str(trained_tiny_dir), "--tokens", "120", "--seq-len", "16", "--out", str(out)])
    printed = capsys.readouterr().out  # not a terminal: the log line of --no-progress, then the summary
    assert exc.value.code in (0, None) and "] self-generated " in printed and printed.rstrip().endswith(str(out))
    docs, _ = load_documents(str(out))
    assert len(docs) >= 120 // 16
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["tokens"] >= 120 and meta["settings"]["seq_len"] == 16

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    code, err = run_cli(capsys, "generate-data", str(trained_tiny_dir), "--tokens", "1M", "--out", str(tmp_path / "x.jsonl"))
    assert_one_line_error(code, err, "GiB free")
    assert not (tmp_path / "x.jsonl").exists()

    notok = tmp_path / "no-tokenizer"
    notok.mkdir()
    for f in trained_tiny_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, notok / f.name)
    code, err = run_cli(capsys, "generate-data", str(notok), "--tokens", "100", "--out", str(tmp_path / "y.jsonl"))
    assert_one_line_error(code, err, "cannot load model")


class _EosFirstModel(torch.nn.Module):
    """A causal LM whose every next token is EOS: its samples end right after the first token."""

    def __init__(self, vocab_size: int, eos: int):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.eos = eos
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        from types import SimpleNamespace

        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.config.vocab_size)
        logits[..., self.eos] = 10.0
        return SimpleNamespace(logits=logits)


def test_generation_stops_when_samples_end_at_once(tok):
    from binarize.calibration.selfgen import MAX_EMPTY_BATCHES
    from binarize.errors import BinarizeError

    model = _EosFirstModel(len(tok), tok.eos_token_id)
    with pytest.raises(BinarizeError, match=f"EOS right after the first token.*{MAX_EMPTY_BATCHES} batches.*0 of 500"):
        generate_sequences(model, tok, SelfGenConfig(tokens=500, seq_len=16, batch_size=4))
    assert model.calls == MAX_EMPTY_BATCHES  # one forward per batch: each stops at its first EOS


def test_a_conversion_trains_on_exactly_the_generated_ids(tiny_model_dir, tmp_path, monkeypatch):
    """``data: self`` trains and calibrates on the sampled ids as they were sampled (decoding them to
    text and tokenizing again gives other ids, most of all on a random model), and run.json's counts
    are the generated tokens."""
    from transformers import AutoTokenizer

    import binarize.train.run as run_mod
    from binarize.calibration.streams import join_sequences
    from binarize.recipe import load_recipe
    from binarize.train import ConvertJob, convert

    seen = {}
    real = run_mod.prepare_data
    monkeypatch.setattr(run_mod, "prepare_data", lambda *a, **k: seen.setdefault("data", real(*a, **k)))
    recipe = load_recipe("binaryllm", dict(seq_len=32, batch_tokens=128, bai_steps=1, bai_batch_tokens=64,
                                           calib_sequences=4, chunks=2, data="self", calib="self", self_batch=8))
    out = tmp_path / "run"
    convert(ConvertJob(str(tiny_model_dir), 1_024, out, recipe, progress=False, export=None))
    data, info = seen["data"], json.loads((out / "run.json").read_text())["data"]
    gen = info["self_generation"]
    with gzip.open(gen["file"], "rt") as f:
        recs = [json.loads(line) for line in f]
    assert sum(len(r["ids"]) for r in recs) == gen["tokens"]
    read = [r["ids"] for r in recs[:gen["sequences_read"]]]
    assert gen["tokens_read"] == sum(map(len, read)) > 0
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    stream = join_sequences(read, eos)
    used = torch.cat([data.calib, data.train.blocks.blocks])  # calibration: the first blocks, held out
    assert used.shape[1] == 32 and torch.equal(used.flatten(), stream[:used.numel()])


def test_self_text_records_without_ids_are_tokenized_and_bad_ids_refused(tok, tmp_path):
    """A cache file written before ids were read (text only) still trains; ids that are not this
    vocabulary's token ids are refused in one line."""
    from binarize.errors import BinarizeError
    from binarize.recipe import load_recipe
    from binarize.train.data import SelfText

    st = SelfText(None, tok, None, load_recipe("binaryllm", {}))
    st.path = tmp_path / "old.jsonl.gz"
    assert st._ids({"text": "hello world"}, 1) == tok("hello world", add_special_tokens=False)["input_ids"]
    assert st._ids({"text": "x", "ids": [5, 7]}, 1) == [5, 7]
    for bad in ({"ids": [1, len(tok)]}, {"ids": [1.5]}, {"ids": "12"}, {"ids": [True]}, {"other": 1}, None):
        with pytest.raises(BinarizeError, match="old.jsonl.gz:3: ") as exc:
            st._ids(bad, 3)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("spec", ["self", "self+ptb:0.5"])
def test_a_timed_run_reads_all_of_its_self_generated_corpus(tok, tmp_path, spec):
    """``SelfText.whole`` (the --time path) trains on every generated block, not only the budget's
    share, so a later re-plan of the end-to-end stage has all of the text; the calibration set (the
    corpus's head) is the same either way; a mix keeps its own share of self text."""
    from binarize.recipe import load_recipe
    from binarize.train.data import SelfText, prepare_data
    from binarize.train.plan import plan_budget

    recipe = load_recipe("binaryllm", dict(seq_len=16, batch_tokens=32, calib_sequences=2, chunks=2, data=spec,
                                           calib="self"))
    g = torch.Generator().manual_seed(0)
    docs = [{"ids": torch.randint(5, 200, (40,), generator=g).tolist()} for _ in range(30)]  # ~1,230 tokens
    budget = plan_budget(recipe, 64)  # 4 sequences of 16: a small share of the corpus
    got = {}
    for whole in (False, True):
        st = SelfText(None, tok, None, recipe, whole=whole)
        st.docs, st.path = list(docs), tmp_path / "corpus.jsonl.gz"
        got[whole] = prepare_data(tok, recipe, budget, st)
    part, full = got[False], got[True]
    assert torch.equal(part.calib, full.calib)
    if spec == "self":
        assert part.info["train_blocks_available"] < 10 < full.info["train_blocks_available"]
        assert full.info["train_blocks_available"] + 2 == (30 * 41) // 16  # every whole block of the corpus
        assert torch.equal(full.train.blocks.blocks[: len(part.train.blocks)], part.train.blocks.blocks)
    else:
        assert torch.equal(full.train.blocks.blocks, part.train.blocks.blocks)
