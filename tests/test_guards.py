"""Nothing silently wrong (issue 42): non-finite source weights and results, missing local paths."""

import pytest
import torch

from tests.test_cli_errors import assert_one_line_error, run_cli


def _edited_copy(tiny_model_dir, out, edit):
    """The tiny model with ``edit(model)`` applied, saved with its tokenizer to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_a_source_with_a_non_finite_weight_is_refused_before_any_work(capsys, tiny_model_dir, small_text, tmp_path,
                                                                        value, kind):
    def poison(model):
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value

    bad = _edited_copy(tiny_model_dir, tmp_path / "bad", poison)
    capsys.readouterr()  # transformers' load and save bars
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", str(bad), "--tokens", "1k", "--data", str(small_text), "--out", str(out),
                        "--seq-len", "64", "--batch-tokens", "256", "--chunks", "4", "--no-progress")
    assert_one_line_error(code, err, f"non-finite values ({kind}) in model.layers.1.mlp.up_proj.weight: 1 of")
    assert code == 2 and not out.exists() and not out.with_name("out.partial").exists()
    code, err = run_cli(capsys, "eval", str(bad), "--seq-len", "64", "--limit", "1", "--no-progress")
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("scale", [3e38, 1e37])  # logits NaN; logits finite but the NLL infinite
def test_eval_never_prints_a_non_finite_perplexity(capsys, tiny_model_dir, tmp_path, scale):
    """Finite weights whose outputs overflow fp32: one line naming the dataset and a non-zero exit,
    never ``ppl nan`` (or ``inf``) with exit 0."""
    def overflow(model):
        model.model.norm.weight.fill_(scale)

    big = _edited_copy(tiny_model_dir, tmp_path / "big", overflow)
    capsys.readouterr()
    code, err = run_cli(capsys, "eval", str(big), "--datasets", "ptb", "--seq-len", "64", "--limit", "2",
                        "--no-progress")
    assert_one_line_error(code, err, "ptb: the perplexity of")
    assert "not finite" in err


def test_perplexity_past_exp_range_is_inf_not_an_overflow_error():
    from binarize.evaluate import check_finite_result, perplexity

    class Confident(torch.nn.Module):  # always sure of the wrong token: NLL ~ 1e4 per token
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 8)
            logits[..., 0] = 1e4
            return type("Out", (), {"logits": logits})()

    res = perplexity(Confident(), torch.ones(64, dtype=torch.long), 16)
    assert res["ppl"] == float("inf") and res["nll"] == pytest.approx(1e4)
    with pytest.raises(Exception, match="wikitext2: the perplexity of m is not finite"):
        check_finite_result("wikitext2", "m", res)


@pytest.mark.parametrize("command", [["convert", "--tokens", "1k"], ["eval", "--limit", "1"]])
def test_a_missing_org_name_path_offline_says_both_in_one_line(capsys, tmp_path, monkeypatch, command):
    """``runs/does-not-exist`` with no ``runs`` here looks like a hub id: the answer names the
    missing local directory and the unreachable hub, not the hub client's connection error."""
    import huggingface_hub.constants as c

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    code, err = run_cli(capsys, command[0], "runs/does-not-exist", *command[1:])
    assert_one_line_error(code, err, "cannot load model 'runs/does-not-exist': there is no local directory "
                                     "runs/does-not-exist, and the hub was not reachable (HF_HUB_OFFLINE is set)")
    assert "couldn't connect" not in err and not (tmp_path / "runs").exists()


def test_a_missing_org_name_path_without_network_says_both(capsys, tmp_path, monkeypatch):
    """The same with the hub online but no network (what transformers raises then, simulated)."""
    import huggingface_hub.constants as c
    import transformers
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        except LocalEntryNotFoundError as e:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                          "them in the cached files.\nCheck your internet connection") from e

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    code, err = run_cli(capsys, "convert", "runs/does-not-exist", "--tokens", "1k")
    assert_one_line_error(code, err, "there is no local directory runs/does-not-exist, and the hub was not "
                                     "reachable (no connection)")


def test_a_non_finite_qat_loss_stops_with_one_line_and_keeps_the_last_good_step(monkeypatch, tiny_model_dir,
                                                                                  small_text, tmp_path):
    import json

    import binarize.train.loop as loop
    from binarize.errors import BinarizeError
    from binarize.train import ConvertJob, convert
    from tests.test_convert import tiny_recipe

    real = loop.step_gradients

    def poisoned(s, batch):  # the third step's loss overflows
        loss, kd = real(s, batch)
        return (float("nan") if len(s.record.steps) == 2 else loss), kd

    monkeypatch.setattr(loop, "step_gradients", poisoned)
    out = tmp_path / "run"
    with pytest.raises(BinarizeError, match=r"QAT step 3/\d+: the loss is nan") as exc:
        convert(ConvertJob(str(tiny_model_dir), 2048, out, tiny_recipe(small_text, bai_steps=1), progress=False))
    assert "\n" not in str(exc.value) and not out.exists()
    state = json.loads((tmp_path / "run.partial" / "checkpoint" / "state.json").read_text())
    assert state["phase"] == "qat" and state["step"] == 2
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run.partial" / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
