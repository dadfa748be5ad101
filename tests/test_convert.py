"""The conversion pipeline end to end on a tiny LLaMA (real tokenizer, real text)."""

import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from binarize.train import ConvertJob, Interrupted, convert, plan_budget
from binarize.train.bai import binary_aware_init
from binarize.train.data import prepare_data
from binarize.formats.latent import load_converted
from binarize.evaluate import mean_loss
from binarize.qlinear import QuantLinear, quant_layers, quantize_
from binarize.recipe import load_recipe


def tiny_recipe(small_text, **kw):
    base = dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, bai_steps=4, calib_sequences=8, chunks=4,
                data=str(small_text), calib=str(small_text), lr=1e-3, min_lr=1e-5)
    base.update(kw)
    return load_recipe("binaryllm", base)


def test_swap_covers_every_block_linear_and_nothing_else(tiny_model):
    names = quantize_(tiny_model)
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    assert isinstance(tiny_model.lm_head, torch.nn.Linear) and not isinstance(tiny_model.lm_head, QuantLinear)


def test_t_zero_model_is_the_original(tiny_model):
    x = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        ref = tiny_model(input_ids=x).logits
        quantize_(tiny_model)
        for q in quant_layers(tiny_model).values():
            q.fold_st()
            q.t = 0.0
        out = tiny_model(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_bai_lowers_the_binarized_loss(trained_tiny_dir, small_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    recipe = tiny_recipe(small_text, bai_steps=30, bai_lr=1e-2, calib_sequences=16)
    data = prepare_data(tok, recipe, plan_budget(recipe, 20_000))
    quantize_(model)
    res = binary_aware_init(model, data.calib, recipe)
    assert res.loss_after < res.loss_before - 0.05, res
    assert all(q.folded and not q.st.requires_grad for q in quant_layers(model).values())
    assert any(not torch.allclose(q.st, torch.ones_like(q.st)) for q in quant_layers(model).values())
    # folding St into the latent weight leaves the model's function unchanged
    assert mean_loss(model, data.calib[:8]) == pytest.approx(res.loss_after, rel=1e-5)


def test_calibration_is_held_out_of_training(tiny_model_dir, small_text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = prepare_data(tok, recipe := tiny_recipe(small_text), plan_budget(recipe, 20_000))
    train = {tuple(b.tolist()) for b in data.train.blocks.blocks}
    assert not any(tuple(c.tolist()) in train for c in data.calib)
    # the same calibration set at a budget that reads a sliver of the source and at one that
    # exhausts it and repeats it in epochs (what lets --init-from share BaI across budgets)
    small = prepare_data(tok, recipe, plan_budget(recipe, 2_000))
    large = prepare_data(tok, recipe, plan_budget(recipe, 2_000_000))
    assert large.info["epochs_over_train_data"] > 1 > small.info["epochs_over_train_data"]
    assert torch.equal(small.calib, data.calib) and torch.equal(large.calib, data.calib)


def test_convert_outputs_and_token_accounting(tiny_model_dir, small_text, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(small_text)
    convert(ConvertJob(str(tiny_model_dir), 10_000, out, recipe, progress=False))
    assert not (tmp_path / "run.partial").exists()
    for name in ("model.safetensors", "config.json", "binarize.json", "run.json", "loss.png", "tokenizer.json"):
        assert (out / name).exists(), name
    rec = json.loads((out / "run.json").read_text())
    tokens = rec["tokens"]
    assert tokens["sequences"] == 10_000 // 64 and tokens["trained"] == tokens["sequences"] * 64
    assert tokens["dropped_remainder"] == 10_000 % 64
    assert len(rec["steps"]) == tokens["optimizer_steps"] == math.ceil(156 / 4)
    assert rec["steps"][-1]["tokens"] == tokens["trained"]
    assert [s["chunk"] for s in rec["steps"]] == sorted(s["chunk"] for s in rec["steps"])
    assert rec["steps"][0]["t"] == 0.0 and rec["steps"][-1]["chunk"] == 3
    assert rec["bai"]["loss_before"] > 0 and len(rec["bai"]["losses"]) == 4
    lrs = [s["lr"] for s in rec["steps"]]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5) and lrs == sorted(lrs, reverse=True)
    # the directory loads back and runs at hard sign; per-row scales are stored for export
    model, tok, meta = load_converted(out)
    assert meta["quantized_layers"] and all(math.isinf(q.t) for q in quant_layers(model).values())
    sa = load_file(str(out / "scales_sa.safetensors"))
    assert set(sa) == {f"{n}.sa" for n in meta["quantized_layers"]}
    x = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x).logits).all()


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_model_dir, small_text, tmp_path):
    recipe = tiny_recipe(small_text, save_every=3)
    full = tmp_path / "full"
    convert(ConvertJob(str(tiny_model_dir), 8_000, full, recipe, progress=False))

    def interrupt(step):
        if step == 13:  # Ctrl-C while the step is running: it completes, then the run stops
            signal.raise_signal(signal.SIGINT)

    part = tmp_path / "part"
    with pytest.raises(Interrupted, match="after step 14"):
        convert(ConvertJob(str(tiny_model_dir), 8_000, part, recipe, progress=False, on_step=interrupt))
    assert not part.exists() and (tmp_path / "part.partial" / "checkpoint").exists()
    first_session = json.loads((tmp_path / "part.partial" / "checkpoint" / "state.json").read_text())["record"]["wall_s"]
    assert first_session > 0
    convert(ConvertJob(str(tiny_model_dir), 8_000, part, recipe, resume=True, progress=False))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (full, part))
    assert [s["loss"] for s in ra["steps"]] == [s["loss"] for s in rb["steps"]]
    assert ra["tokens"] == rb["tokens"]
    assert rb["wall_s"] > first_session  # both sessions counted


def test_ctrl_c_in_bai_leaves_nothing_to_trip_over(tiny_model_dir, small_text, tmp_path, monkeypatch):
    """BaI keeps no checkpoint: Ctrl-C there removes the partial run, so the same command runs again."""
    import binarize.train.init_stages as run_mod  # the initialisation stages' module calls BaI

    recipe = tiny_recipe(small_text)
    real = run_mod.binary_aware_init

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "binary_aware_init", ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="before the first checkpoint") as info:
        convert(ConvertJob(str(tiny_model_dir), 4_000, out, recipe, progress=False))
    assert not info.value.resumable
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    monkeypatch.setattr(run_mod, "binary_aware_init", real)
    assert (convert(ConvertJob(str(tiny_model_dir), 4_000, out, recipe, progress=False)) / "run.json").exists()


@pytest.mark.parametrize("phase", ["load_model", "prepare_data"])
def test_ctrl_c_before_any_output_exits_130_and_writes_nothing(tiny_model_dir, small_text, tmp_path, monkeypatch,
                                                                capsys, phase):
    """Loading the model and preparing the data (self-generation included) write nothing yet: Ctrl-C
    there is exit 130 and an untouched output path."""
    import binarize.train.run as run_mod
    from binarize.cli import main

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, phase, ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_model_dir), "--tokens", "4000", "--seq-len", "64", "--batch-tokens", "256",
              "--chunks", "4", "--data", str(small_text), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 130 and err == [f"interrupted before anything was written to {out}: run the same "
                                             "command again"]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_or_exporting_keeps_the_finished_run(tiny_model_dir, small_text, tmp_path, monkeypatch):
    """After the last step: a Ctrl-C while the run is written waits for it (the run is complete);
    one during the export leaves the complete run and no partial export, and says how to export."""
    import binarize.formats
    import binarize.train.run as run_mod

    recipe = tiny_recipe(small_text, bai=False)
    real_save = run_mod.save_converted

    def save_then_ctrl_c(*args, **kwargs):
        real_save(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # arrives while the run is being written

    monkeypatch.setattr(run_mod, "save_converted", save_then_ctrl_c)
    out = tmp_path / "a"
    with pytest.raises(Interrupted, match="is complete, export it with `binarize export") as info:
        convert(ConvertJob(str(tiny_model_dir), 2_048, out, recipe, progress=False, export="binary"))
    assert not info.value.resumable
    assert (out / "run.json").exists() and (out / "model.safetensors").exists()
    assert not (tmp_path / "a.partial").exists() and not (out / "packed").exists()
    load_converted(out)  # a complete run

    monkeypatch.setattr(run_mod, "save_converted", real_save)

    def export_ctrl_c(run_dir, out_dir, *args, **kwargs):
        from binarize.checkpoint import atomic_dir

        with atomic_dir(out_dir) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    monkeypatch.setattr(binarize.formats, "export_run", export_ctrl_c)
    out = tmp_path / "b"
    with pytest.raises(Interrupted, match="interrupted during the export: the run .* is complete"):
        convert(ConvertJob(str(tiny_model_dir), 2_048, out, recipe, progress=False, export="binary"))
    assert (out / "run.json").exists() and sorted(p.name for p in out.iterdir() if p.name.startswith("packed")) == []


def test_ste_and_scaling_variants_run(tiny_model_dir, small_text, tmp_path):
    for i, kw in enumerate([dict(quantizer="ste"), dict(scaling="learnable"), dict(scaling="analytic", bai=False)]):
        out = tmp_path / f"v{i}"
        convert(ConvertJob(str(tiny_model_dir), 3_000, out, tiny_recipe(small_text, **kw), progress=False))
        rec = json.loads((out / "run.json").read_text())
        assert all(math.isfinite(s["loss"]) for s in rec["steps"])
        if kw.get("quantizer") == "ste":
            assert all(s["t"] == "inf" for s in rec["steps"])
        model, _, _ = load_converted(out)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.randint(0, 1000, (1, 16))).logits).all()


def test_bai_path_fits_st_under_each_path_point_and_ends_at_the_sign(trained_tiny_dir, small_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from binarize.qlinear import set_t
    from binarize.schedules import bai_path_points

    tok = AutoTokenizer.from_pretrained(trained_tiny_dir)
    mid_losses, sts = {}, {}
    for path in (False, True):
        model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
        recipe = tiny_recipe(small_text, bai_steps=6, bai_lr=1e-2, calib_sequences=16, chunks=8, bai_path=path)
        data = prepare_data(tok, recipe, plan_budget(recipe, 20_000))
        quantize_(model)
        first = next(iter(quant_layers(model).values()))
        model.eval()  # BaI's before/after measures run in eval mode; only its steps train
        seen = []
        hook = first.register_forward_pre_hook(lambda m, a: seen.append(m.t) if m.training else None)
        res = binary_aware_init(model, data.calib, recipe)
        hook.remove()
        points = bai_path_points("exponential", 8) if path else [math.inf]
        per_step = len(seen) // recipe.bai_steps  # micro-batches per step
        steps_t = seen[::per_step]
        assert steps_t == [points[(s - 6) % len(points)] for s in range(6)], steps_t
        assert steps_t[-1] == math.inf and all(q.t == math.inf for q in quant_layers(model).values())
        assert res.loss_after < res.loss_before
        set_t(model, bai_path_points("exponential", 8)[0])  # the path's first point, for both
        mid_losses[path] = mean_loss(model, data.calib[:8])
        sts[path] = torch.cat([q.st.flatten() for q in quant_layers(model).values()])
    assert not torch.allclose(sts[True], sts[False])  # the intermediate t changed the search
    # St fitted along the path gives a lower loss at the path's first point than St fitted at the sign
    assert mid_losses[True] < mid_losses[False], mid_losses
