"""--save-init / --init-from (train/init_state.py): a second budget reuses BaI + block-wise exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from binarize.errors import BinarizeError
from binarize.recipe import load_recipe
from binarize.train import ConvertJob, convert


def _recipe(small_text, **kw):
    base = dict(seq_len=64, batch_tokens=256, bai=True, bai_steps=3, bai_batch_tokens=128, calib_sequences=8,
                chunks=4, data=str(small_text), calib=str(small_text), lr=1e-3, min_lr=1e-5, blockwise_steps=6,
                blockwise_sequences=8, blockwise_batch=4, blockwise_lr=3e-3)
    base.update(kw)
    return load_recipe("binaryllm", base)


def test_a_saved_initialisation_gives_the_plain_runs_model_at_another_budget(trained_tiny_dir, small_text, tmp_path):
    src, recipe = str(trained_tiny_dir), _recipe(small_text)
    short = tmp_path / "short"
    convert(ConvertJob(src, 2_000, short, recipe, progress=False, save_init=True))
    saved = json.loads((short / "init" / "init.json").read_text())
    assert saved["wall_s"] > 0 and len(saved["blockwise"]["blocks"]) == 2 and saved["bai"]["steps"] == 3

    plain, reused = tmp_path / "plain", tmp_path / "reused"
    # an end-to-end key (lr) may differ from the run that saved it: the QAT of both runs below uses 2e-3
    changed = _recipe(small_text, lr=2e-3)
    convert(ConvertJob(src, 4_000, plain, changed, progress=False))
    convert(ConvertJob(src, 4_000, reused, changed, progress=False, init_from=short))
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(reused / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (plain, reused))
    assert [s["loss"] for s in ra["steps"]] == [s["loss"] for s in rb["steps"]] and len(rb["steps"]) > 1
    assert rb["init_from"] == {"run": str(short), "wall_s": saved["wall_s"]} and "init_from" not in ra
    assert [x["loss_last"] for x in rb["blockwise"]["blocks"]] == [x["loss_last"] for x in ra["blockwise"]["blocks"]]
    assert rb["bai"]["loss_after"] == ra["bai"]["loss_after"]
    assert not (reused / "init").exists()


def test_an_initialisation_for_another_recipe_or_none_is_refused_before_any_output(trained_tiny_dir, small_text,
                                                                                    tmp_path):
    src = str(trained_tiny_dir)
    run = tmp_path / "run"
    convert(ConvertJob(src, 1_000, run, _recipe(small_text, blockwise_steps=0, bai_steps=1), progress=False,
                       save_init=True))
    out = tmp_path / "out"
    with pytest.raises(BinarizeError, match="recipe key bai_steps differs"):
        convert(ConvertJob(src, 1_000, out, _recipe(small_text, blockwise_steps=0, bai_steps=2), progress=False,
                           init_from=run))
    with pytest.raises(BinarizeError, match=r"recipe key calib_sequences differs \(8 there, 6 here\)"):
        convert(ConvertJob(src, 1_000, out, _recipe(small_text, blockwise_steps=0, bai_steps=1, calib_sequences=6),
                           progress=False, init_from=run))
    with pytest.raises(BinarizeError, match="no saved initialisation there"):
        convert(ConvertJob(src, 1_000, out, _recipe(small_text), progress=False, init_from=tmp_path))
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_key_an_older_initialisation_lacks_counts_as_its_default(tmp_path):
    """An init.json written before a recipe key existed matches a recipe at that key's default only."""
    from binarize.train.init_state import check_init, init_key

    recipe = load_recipe("binaryllm-distill", {})
    calib = torch.arange(12).view(2, 6)
    key = init_key(recipe, "m", calib)
    older = json.loads(json.dumps(key))
    del older["recipe"]["blockwise_last_loss"]
    check_init(tmp_path, {"key": older}, init_key(load_recipe("binaryllm-distill", {"blockwise_last_loss": "same"}),
                                                  "m", calib))
    with pytest.raises(BinarizeError, match="recipe key blockwise_last_loss differs"):
        check_init(tmp_path, {"key": older}, init_key(load_recipe("binaryllm-distill", {"blockwise_last_loss": "kl"}),
                                                      "m", calib))

