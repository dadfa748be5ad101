"""binarize eval: the windowed-perplexity protocol, comparisons, naive baselines and lm-eval plumbing."""

import json
import math

import pytest
import torch

from binarize.cli import main
from binarize.evaluate import EVAL_SPLITS, eval_tokens, perplexity
from tests.test_cli_errors import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_perplexity_matches_a_plain_transformers_loop(trained_tiny_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    ids, info = eval_tokens(tok, "wikitext2")
    assert info["tokens"] == ids.numel() > 200_000 and info["join"] == "\n\n"
    seq = 64
    with torch.no_grad():  # HF's own loss, one window at a time: windows are equal length, so mean of means
        losses = [float(model(input_ids=ids[i * seq:(i + 1) * seq][None], labels=ids[i * seq:(i + 1) * seq][None]).loss)
                  for i in range(7)]
    ref = math.exp(sum(losses) / len(losses))
    one = perplexity(model, ids, seq, limit=7, batch_size=1)
    batched = perplexity(model, ids, seq, limit=7, batch_size=3)
    assert one["windows"] == 7 and one["predicted_tokens"] == 7 * (seq - 1)
    assert one["ppl"] == pytest.approx(ref, rel=1e-5)
    assert batched["ppl"] == pytest.approx(one["ppl"], rel=1e-5)


def test_c4_keeps_at_most_256_windows(tok):
    ids, info = eval_tokens(tok, "c4")
    assert info["rows"] == min(1100, 1025) and info["max_windows"] == 256
    assert ids.numel() // 64 > 256  # enough text, so the cap is what limits it

    class Uniform(torch.nn.Module):  # every token equally likely: ppl must be the vocabulary size
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tok))})()

    res = perplexity(Uniform(), ids, 64, max_windows=info["max_windows"], batch_size=64)
    assert res["windows"] == 256
    assert res["ppl"] == pytest.approx(len(tok), rel=1e-4)


def test_ptb_joins_sentences_with_a_space(tok):
    from binarize.calibration.streams import named_rows

    rows, _ = named_rows("ptb", "test")
    ids, info = eval_tokens(tok, "ptb")
    assert EVAL_SPLITS["ptb"].join == " " and info["rows"] == len(rows) == 3761
    assert tok.decode(ids[:40]).startswith(rows[0] + " " + rows[1][:10])


def test_compare_ptq_json_and_markdown(capsys, trained_tiny_dir, converted_tiny_dir, tmp_path):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["eval", "--compare", str(trained_tiny_dir), str(converted_tiny_dir), "--datasets", "wikitext2,ptb",
            "--seq-len", "64", "--limit", "6", "--batch-size", "3", "--no-progress", "--json", str(js),
            "--markdown", str(md)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code in (0, None)
    rows = json.loads(js.read_text())
    assert [r["spec"] for r in rows] == [str(trained_tiny_dir), str(converted_tiny_dir)]
    fp, conv = (r["perplexity"]["ptb"]["ppl"] for r in rows)  # PTB: the tiny model's own domain
    assert rows[0]["perplexity"]["ptb"]["windows"] == 6 and rows[0]["perplexity"]["ptb"]["join"] == " "
    table = md.read_text()
    assert f"{conv / fp:.2f}x)" in table.splitlines()[3].split("|")[3] and "(1.00x)" in table.splitlines()[2]

    with pytest.raises(SystemExit):
        main(["eval", str(trained_tiny_dir), "--ptq", "sign", "--datasets", "ptb", "--seq-len", "64",
              "--limit", "6", "--no-progress", "--json", str(js)])
    sign = json.loads(js.read_text())[0]["perplexity"]["ptb"]["ppl"]
    with pytest.raises(SystemExit):
        main(["eval", str(trained_tiny_dir), "--ptq", "ternary", "--datasets", "ptb", "--seq-len", "64",
              "--limit", "6", "--no-progress", "--json", str(js)])
    ternary = json.loads(js.read_text())[0]["perplexity"]["ptb"]["ppl"]
    assert sign > fp and ternary > fp, (fp, sign, ternary)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from binarize.evaluate import apply_ptq
    from binarize.quantizers import naive_sign

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    apply_ptq(model, "sign")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, naive_sign(w))
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # full precision untouched
    ids, _ = eval_tokens(AutoTokenizer.from_pretrained(trained_tiny_dir), "ptb")
    assert perplexity(model, ids, 64, limit=6)["ppl"] == pytest.approx(sign, rel=1e-6)


@pytest.mark.parametrize("extra,needle", [
    (["--datasets", "lambada"], "unknown eval dataset"),
    (["--seq-len", "4096"], "exceeds the model's maximum"),
    (["--ptq", "int4"], "--ptq must be"),
    (["--limit", "0"], "--limit must be positive"),
])
def test_eval_bad_input(capsys, trained_tiny_dir, extra, needle):
    assert_one_line_error(*run_cli(capsys, "eval", str(trained_tiny_dir), "--no-progress", *extra), needle)


def test_eval_rejects_dirs_that_are_not_models(capsys, tmp_path, converted_tiny_dir):
    (tmp_path / "notes.txt").write_text("not a model")
    assert_one_line_error(*run_cli(capsys, "eval", str(tmp_path), "--no-progress"), str(tmp_path))
    assert_one_line_error(*run_cli(capsys, "eval", str(converted_tiny_dir), "--ptq", "sign", "--no-progress"),
                          "already converted")


TASK_YAML = """task: binarize_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_zero_shot_task_through_lm_eval(trained_tiny_dir, tok, tmp_path, monkeypatch):
    """A local multiple-choice task: lm-eval's accuracy equals choosing by our own log-likelihoods."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    from binarize.zeroshot import run_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))  # fresh questions each run
    words = ["the", "market", "said", "stock", "year", "company", "price", "shares", "new", "trading", "bank", "rose"]
    docs = []
    for _ in range(12):
        pick = lambda n: " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))
        docs.append({"question": pick(6), "choices": [pick(2), pick(3), pick(1)], "answer": int(torch.randint(3, (1,), generator=g))})
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(TASK_YAML.format(data=data))

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    out = run_tasks(model, tok, ["binarize_toy"], include=tmp_path / "tasks")
    acc = out["results"]["binarize_toy"]["acc"]

    def loglik(context: str, continuation: str) -> float:
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
        x = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))

    ours = [max(range(3), key=lambda c: loglik(d["question"], " " + d["choices"][c])) == d["answer"] for d in docs]
    assert acc == pytest.approx(sum(ours) / len(ours))


def test_chunked_head_equals_full_logits(trained_tiny_dir, tok, monkeypatch):
    """The chunked lm_head + loss path gives the NLL of the plain full-logits path."""
    from transformers import AutoModelForCausalLM

    import binarize.evaluate as ev

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    assert ev._plain_head(model)
    x = torch.randint(0, len(tok), (2, 300), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ev, "HEAD_CHUNK", 64)  # several chunks and a ragged last one
    with torch.inference_mode():
        chunked = ev.window_nll(model, x)
        monkeypatch.setattr(ev, "_PLAIN_HEAD_TYPES", set())
        full = ev.window_nll(model, x)
    assert chunked == pytest.approx(full, rel=1e-5)


def test_eval_missing_local_file_offline(capsys, trained_tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BINARIZE_DATA_DIR", str(tmp_path))  # a data dir without the eval files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = run_cli(capsys, "eval", str(trained_tiny_dir), "--no-progress", "--datasets", "ptb", "--limit", "1",
                        "--seq-len", "64")
    assert_one_line_error(code, err, "no local file ptb/ptb.test.txt")


THREE = ["wikitext2", "c4", "ptb"]


def test_eval_presets_resolve_to_their_protocols():
    from binarize.evaluate import resolve_protocol

    assert resolve_protocol(quick=True) == {"name": "quick", "seq_len": 1024, "limit": 16, "datasets": THREE}
    assert resolve_protocol(full=True) == {"name": "full", "seq_len": 2048, "limit": None, "datasets": THREE}
    assert resolve_protocol() == {"name": "full", "seq_len": 2048, "limit": None, "datasets": ["wikitext2"]}
    assert resolve_protocol(quick=True, seq_len=1024, limit=16) == resolve_protocol(quick=True)  # repeating: fine
    assert resolve_protocol(full=True, seq_len=2048)["limit"] is None
    assert resolve_protocol(quick=True, datasets=["ptb"])["datasets"] == ["ptb"]  # other sets, same windows
    assert resolve_protocol(seq_len=1024, limit=16, datasets=THREE)["name"] == "quick"  # the flags it stands for
    assert resolve_protocol(seq_len=64, limit=2)["name"] == "custom"


@pytest.mark.parametrize("flags,needle", [
    (["--quick", "--full"], "--quick and --full are exclusive"),
    (["--quick", "--seq-len", "2048"], "--quick evaluates the first 16 windows x 1024 tokens; --seq-len 2048"),
    (["--quick", "--limit", "8"], "--limit 8 contradicts"),
    (["--full", "--limit", "16"], "--full evaluates every window x 2048 tokens; --limit 16"),
    (["--full", "--seq-len", "1024"], "--seq-len 1024 contradicts"),
])
def test_eval_preset_contradictions_are_one_line(capsys, tmp_path, flags, needle):
    # refused before any model is looked at: the spec need not exist
    assert_one_line_error(*run_cli(capsys, "eval", str(tmp_path / "no-model"), "--no-progress", *flags), needle)


def test_eval_quick_prints_and_records_its_protocol(capsys, trained_tiny_dir, tmp_path, monkeypatch):
    from binarize import evaluate

    # the tiny model holds 256 positions: the same preset at windows it can run
    monkeypatch.setitem(evaluate.PROTOCOLS, "quick", {"seq_len": 64, "limit": 2, "datasets": THREE})
    js = tmp_path / "q.json"
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(trained_tiny_dir), "--quick", "--no-progress", "--json", str(js)])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "protocol: quick (first 2 windows x 64 tokens) on wikitext2, c4, ptb", out
    row = json.loads(js.read_text())[0]
    assert row["protocol"] == {"name": "quick", "seq_len": 64, "limit": 2, "datasets": THREE}
    assert list(row["perplexity"]) == THREE
    assert all(r["windows"] == 2 and r["seq_len"] == 64 for r in row["perplexity"].values())
