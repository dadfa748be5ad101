"""Bad input: one clear error line, a non-zero exit, no traceback, nothing written."""

import json

import pytest

from binarize.cli import main


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    return exc.value.code, err


def assert_one_line_error(code, err, needle):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.fixture()
def base(tiny_model_dir, small_text, tmp_path):
    out = tmp_path / "out"
    return out, [str(tiny_model_dir), "--data", str(small_text), "--out", str(out), "--seq-len", "64",
                 "--batch-tokens", "256", "--chunks", "4", "--no-progress"]


@pytest.mark.parametrize("tokens,needle", [("-5", "whole number of tokens >= 0"), ("lots", "cannot parse"),
                                           ("-2B", "whole number of tokens >= 0"), ("1.5", "whole number")])
def test_bad_token_budget(capsys, base, tokens, needle):
    out, args = base
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", tokens), needle)
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_missing_model_path(capsys, tmp_path):
    code, err = run_cli(capsys, "convert", str(tmp_path / "nope"), "--tokens", "1k", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "model path not found")
    code, err = run_cli(capsys, "convert", str(tmp_path / "nope.gguf"), "--tokens", "1k", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "model file not found")
    assert not (tmp_path / "o").exists()


def test_directory_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notamodel").mkdir()
    code, err = run_cli(capsys, "convert", str(tmp_path / "notamodel"), "--tokens", "1k")
    assert_one_line_error(code, err, "not a model directory")


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(d)
    code, err = run_cli(capsys, "convert", str(d), "--tokens", "1k", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'")


def test_unknown_hub_id_offline(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    code, err = run_cli(capsys, "convert", "nobody-xyz/no-such-model", "--tokens", "1k", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "cannot load model 'nobody-xyz/no-such-model'")


def test_recipe_errors(capsys, base, tmp_path):
    out, args = base
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "1k", "--recipe", "nope"), "unknown recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-4\nlearning_rate: 3\n")
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "1k", "--recipe", str(bad)),
                          "unknown recipe key 'learning_rate'")
    bad.write_text("lr: [oops\n")
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "1k", "--recipe", str(bad)),
                          "malformed recipe")
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "1k", "--set", "bai_lr=fast"), "needs a finite float")
    assert not out.exists()


def test_seq_len_above_model_maximum(capsys, base):
    out, args = base
    args = [a if a != "64" else "512" for a in args] + ["--batch-tokens", "512"]
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "10k"), "exceeds the model's maximum of 256")
    assert not out.exists()


def test_budget_too_small_for_a_schedule(capsys, base):
    out, args = base  # 3 sequences of 64 tokens, 4 per step: one optimizer step cannot hold a t schedule
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "200"), "fewer than the 4 chunks")
    assert not out.exists()


def test_small_budget_runs_fewer_chunks_with_a_notice(capsys, base):
    """7 sequences, 4 per step: two optimizer steps, so the 4-chunk schedule runs 2 chunks (t rising)
    and says so, where it used to refuse the budget."""
    out, args = base
    with pytest.raises(SystemExit) as exc:
        main(["convert", *args, "--tokens", "500", "--set", "bai=false", "--export", "none"])
    printed = capsys.readouterr()
    assert exc.value.code in (0, None), printed.err
    assert "the progressive schedule runs 2 chunks, one per step" in printed.out
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["chunks"] == 2
    assert [s["chunk"] for s in run["steps"]] == [0, 1]
    assert float(run["steps"][0]["t"]) < float(run["steps"][1]["t"])  # t rises over the two chunks


def test_existing_output_and_nothing_to_resume(capsys, base):
    out, args = base
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "10k"), "exists and is not empty")
    assert (out / "keep.txt").read_text() == "mine"
    fresh = out.with_name("fresh")
    args = [str(fresh) if a == str(out) else a for a in args]
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "10k", "--resume"), "nothing to resume")


def test_an_output_path_that_is_a_file_is_refused_even_with_overwrite(capsys, base, converted_tiny_dir, tmp_path):
    out, args = base
    out.write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "10k", *extra), "is a file")
        assert_one_line_error(*run_cli(capsys, "export", str(converted_tiny_dir), "--out", str(out), *extra),
                              "is a file")
        assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]  # no .old, .tmp


def test_a_corrupt_weight_file_or_a_bad_cache_mode_is_one_line(capsys, tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for command in (["eval", str(bad), "--limit", "1", "--seq-len", "64"], ["chat", str(bad), "--prompt", "hi"]):
        assert_one_line_error(*run_cli(capsys, *command), "cannot load model")
    # --cpu-cache is checked for every kind of model, not only packed exports
    assert_one_line_error(*run_cli(capsys, "chat", str(tiny_model_dir), "--prompt", "hi", "--cpu-cache", "bogus"),
                          "--cpu-cache must be one of")


@pytest.mark.parametrize("content,needle", [(None, "data source not found"), ("   \n\n", "empty")])
def test_missing_or_empty_data(capsys, base, tmp_path, content, needle):
    out, args = base
    data = tmp_path / "d.txt"
    if content is not None:
        data.write_text(content)
    args = [str(data) if a.endswith("ptb.valid.txt") else a for a in args]
    assert_one_line_error(*run_cli(capsys, "convert", *args, "--tokens", "10k"), needle)
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_good_run_through_the_cli(capsys, base):
    out, args = base
    with pytest.raises(SystemExit) as exc:
        main(["convert", *args, "--tokens", "3k", "--bai-steps", "2", "--bai-batch-tokens", "64",
              "--set", "calib_sequences=4"])
    assert exc.value.code in (0, None)
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["tokens"]["trained"] == (3000 // 64) * 64
    assert json.loads((out / "packed" / "binarize.json").read_text())["packing"] == "binary"  # exported by default


def test_missing_local_path_never_goes_to_the_hub(capsys, tmp_path, monkeypatch):
    """DIR/NAME under an existing local DIR is a missing path, answered at once (not a hub id)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it tried on the hub, the error would name the hub
    code, err = run_cli(capsys, "eval", "runs/does-not-exist", "--limit", "1")
    assert_one_line_error(code, err, "model path not found: runs/does-not-exist")


def test_import_is_light_and_still_registers_the_quantizer():
    """``import binarize`` loads neither torch nor transformers; transformers then still finds
    binarize's quantizer once its quantizer package is imported."""
    import subprocess
    import sys

    code = ("import sys, binarize; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; "
            "print(heavy, 'binarize' in M, binarize.Recipe.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True Recipe"


def test_an_unexpected_error_is_one_line_and_debug_shows_it(capsys, monkeypatch, tmp_path):
    """A dependency's exception that no check caught: one line naming the command and exit 1; with
    --debug the exception itself propagates (the full traceback)."""
    import binarize.formats

    def boom(*args, **kwargs):
        raise ValueError("shape mismatch in a dependency\nsecond line of detail")

    monkeypatch.setattr(binarize.formats, "export_run", boom)
    code, err = run_cli(capsys, "export", str(tmp_path), "--out", str(tmp_path / "x"))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: export failed: ValueError: shape mismatch in a dependency") and "--debug" in lines[0]
    with pytest.raises(ValueError, match="shape mismatch"):
        main(["export", str(tmp_path), "--out", str(tmp_path / "x"), "--debug"])
