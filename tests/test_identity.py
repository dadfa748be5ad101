"""Run identity (train/identity.py): --resume with another model, other data, another recipe or
budget than the run started with is refused in one line; the same model at another path is not."""

import json
import shutil
import signal

import pytest
from safetensors.torch import load_file, save_file

from binarize.errors import BinarizeError
from binarize.train import ConvertJob, Interrupted, convert
from tests.test_convert import tiny_recipe


def _interrupted_run(model_dir, recipe, out, tokens: int = 2_000):
    """A conversion stopped by Ctrl-C after its third QAT step: OUT.partial holds a checkpoint."""
    def interrupt(step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted):
        convert(ConvertJob(str(model_dir), tokens, out, recipe, progress=False, on_step=interrupt))
    work = out.with_name(out.name + ".partial")
    assert (work / "checkpoint" / "state.json").exists()
    return work


def test_resume_with_another_model_recipe_or_budget_is_refused(tiny_model_dir, small_text, tmp_path):
    recipe = tiny_recipe(small_text, save_every=2)
    out = tmp_path / "run"
    work = _interrupted_run(tiny_model_dir, recipe, out)
    saved = json.loads((work / "identity.json").read_text())
    assert saved["model"] == str(tiny_model_dir) and len(saved["model_sha256"]) == 64
    assert saved["tokens"] == 2_000 and saved["recipe"]["lr"] == 1e-3 and len(saved["train_sha256"]) == 64

    # the same architecture with one weight changed: today's silent case (the other model became the teacher)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    tensors = load_file(str(other / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    before = (work / "checkpoint" / "state.json").read_text()
    with pytest.raises(BinarizeError, match=r"--resume .*: the model differs \(.*tiny-llama there, .*other-model "
                                            r"here.*start afresh with --overwrite") as exc:
        convert(ConvertJob(str(other), 2_000, out, recipe, resume=True, progress=False))
    assert "\n" not in str(exc.value)
    with pytest.raises(BinarizeError, match="recipe key lr differs"):
        convert(ConvertJob(str(tiny_model_dir), 2_000, out, tiny_recipe(small_text, save_every=2, lr=2e-3),
                           resume=True, progress=False))
    with pytest.raises(BinarizeError, match="--tokens differs"):
        convert(ConvertJob(str(tiny_model_dir), 3_000, out, recipe, resume=True, progress=False))
    assert (work / "checkpoint" / "state.json").read_text() == before and not out.exists()

    # equal files under another path are the same model: the resume goes on and finishes
    same = tmp_path / "same-model"
    shutil.copytree(tiny_model_dir, same)
    convert(ConvertJob(str(same), 2_000, out, recipe, resume=True, progress=False))
    assert (out / "run.json").exists() and (out / "identity.json").exists()


def test_resume_with_changed_training_data_is_refused(tiny_model_dir, small_text, tmp_path):
    text = tmp_path / "text.txt"
    shutil.copy(small_text, text)
    recipe = tiny_recipe(text, save_every=2)
    out = tmp_path / "run"
    work = _interrupted_run(tiny_model_dir, recipe, out)
    original = text.read_text()
    # past the held-out calibration blocks, inside the blocks training reads
    text.write_text(original[:6_000] + " a few words that were not there " + original[6_000:])
    with pytest.raises(BinarizeError, match=r"the training data differ \(other training text: .*text.txt: its content "
                                            r"changed\); resume with the command that started it, or start afresh"):
        convert(ConvertJob(str(tiny_model_dir), 2_000, out, recipe, resume=True, progress=False))
    text.write_text("new words " + original)  # the head: the held-out calibration set changes first
    with pytest.raises(BinarizeError, match=r"the calibration data differ"):
        convert(ConvertJob(str(tiny_model_dir), 2_000, out, recipe, resume=True, progress=False))
    assert (work / "checkpoint").exists() and not out.exists()


def test_a_run_without_an_identity_still_resumes_and_differences_are_named_in_order(tmp_path):
    """OUT.partial of an older binarize (no identity.json) is not checked; fields one side lacks are skipped."""
    from binarize.train.identity import check_resume, first_difference, read_identity

    assert read_identity(tmp_path) is None
    check_resume(tmp_path, None, {"model": "a"})
    old = {"model": "a", "model_sha256": "1" * 64, "tokens": 10, "recipe": {"lr": 1.0}, "train_sha256": "x"}
    assert first_difference(old, {"model": "b", "model_sha256": "1" * 64}) is None  # same files, another path
    assert first_difference(old, {"model": "a", "model_sha256": "2" * 64, "tokens": 11}).startswith("the model")
    assert first_difference(old, {"tokens": 11, "recipe": {"lr": 2.0}}).startswith("--tokens")
    assert first_difference(old, {"recipe": {"lr": 2.0}, "train_sha256": "y"}).startswith("recipe key lr")
    assert first_difference(old, {"train_sha256": "y"}).startswith("the training data differ")
    (tmp_path / "identity.json").write_text("{not json")
    with pytest.raises(BinarizeError, match="corrupt run identity .*--overwrite"):
        read_identity(tmp_path)
