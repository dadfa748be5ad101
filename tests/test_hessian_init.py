"""The Hessian-aware initialisation (binarize/gptq.py, train/hessian_init.py) and the PTQ-only
path (``convert --tokens 0``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from binarize.errors import BinarizeError
from binarize.gptq import HessianQuantConfig, gptq_codes, damped_inverse_factor, output_error, quantize_layer
from binarize.qlinear import QuantLinear
from binarize.recipe import Recipe


def _layer_problem(out=48, inp=64, n=512, seed=0):
    """A weight with outlier columns and inputs with correlated channels and a few large ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * (1 + 3 * (torch.rand(inp, generator=g) > 0.9))
    mix = torch.randn(inp, inp, generator=g) / math.sqrt(inp) + torch.eye(inp)
    x = torch.randn(n, inp, generator=g) @ mix
    x[:, :3] *= 8
    return w, x.T @ x / n


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_each_element_lowers_the_output_error_and_never_loses_to_rounding(method):
    w, h = _layer_problem()
    ones = torch.ones(w.shape[1])
    errs = {}
    for name, cfg in {"refit": HessianQuantConfig(method, feedback=False, refine=0, column_scale=False),
                      "gptq": HessianQuantConfig(method, refine=0, column_scale=False),
                      "full": HessianQuantConfig(method)}.items():
        res = quantize_layer(w, h, ones, cfg)
        assert res.error <= res.error_plain + 1e-9
        # the reported error is the error of the returned codes and scales
        w_eff = res.row_scale.view(-1, 1) * res.codes * res.col_scale.view(1, -1)
        assert res.error == pytest.approx(output_error(w, w_eff, h), rel=1e-5)
        errs[name] = res.error
    assert errs["gptq"] < errs["refit"] and errs["full"] <= errs["gptq"]
    assert errs["full"] < 0.9 * res.error_plain


def test_salient_residual_plane_lowers_the_error_on_the_columns_that_carry_it():
    from binarize.gptq import salient_residual

    w, h = _layer_problem()
    res = quantize_layer(w, h, torch.ones(w.shape[1]), HessianQuantConfig("binary"))
    w_eff = res.row_scale.view(-1, 1) * res.codes * res.col_scale.view(1, -1)
    errs = []
    for frac in (0.05, 0.25, 1.0):
        sal = salient_residual(w, w_eff, h, frac)
        k = math.ceil(frac * w.shape[1])
        assert sal.cols.numel() == k and sal.codes.shape == (w.shape[0], k)
        assert set(sal.codes.unique().tolist()) <= {-1.0, 1.0} and (sal.scale >= 0).all() and (sal.scale > 0).any()
        assert sal.extra_bits == pytest.approx((k + 16) / w.shape[1])
        plane = torch.zeros_like(w)
        plane[:, sal.cols] = sal.scale.view(-1, 1) * sal.codes
        assert sal.error == pytest.approx(output_error(w, w_eff + plane, h), rel=1e-5)
        errs.append(sal.error)
        # the chosen columns are those whose own best correction removes the most error
        score = ((w - w_eff) @ h).pow(2).sum(0) / torch.diagonal(h)
        rest = torch.ones(w.shape[1], dtype=torch.bool)
        rest[sal.cols] = False
        if rest.any():
            assert score[sal.cols].min() >= score[rest].max()
    assert errs[0] < res.error and errs[1] < errs[0] and errs[2] < errs[1]
    # a plane that cannot help is left out (scale 0): the error never rises, whatever W_eff is
    far = w_eff + 5 * torch.randn_like(w)
    assert salient_residual(w, far, h, 0.05).error <= output_error(w, far, h) + 1e-9
    for bad in (0.0, 1.5):
        with pytest.raises(BinarizeError, match="salient column fraction"):
            salient_residual(w, w_eff, h, bad)
    with pytest.raises(BinarizeError, match="non-finite"):
        salient_residual(w, w_eff * float("nan"), h, 0.05)


def test_gptq_latent_rounds_to_its_codes_and_feedback_moves_later_columns():
    w, h = _layer_problem(out=8, inp=32)
    a = w.abs().mean(1)
    codes, latent = gptq_codes(w, a, damped_inverse_factor(h, 0.01), "binary", block=8)
    assert torch.equal(torch.where(latent >= 0, 1.0, -1.0), codes)
    assert torch.equal(latent[:, 0], w[:, 0])  # the first column is quantized as it is
    assert not torch.allclose(latent[:, -1], w[:, -1])  # the last one carries the others' errors


def test_non_finite_weight_and_singular_damping_are_one_line_errors():
    w, h = _layer_problem(out=4, inp=8)
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(BinarizeError, match="non-finite"):
        quantize_layer(bad, h, torch.ones(8), HessianQuantConfig())
    with pytest.raises(BinarizeError, match="hessian_damp"):
        Recipe(hessian_damp=0).validate()
    with pytest.raises(BinarizeError, match="not positive definite"):
        damped_inverse_factor(-torch.eye(8), 0.01)


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_applied_codes_survive_the_layers_own_quantizer(method):
    from binarize.fake_quant import LayerSpec
    from binarize.train.hessian_init import apply_layer

    w, h = _layer_problem(out=16, inp=32)
    lin = torch.nn.Linear(32, 16, bias=False)
    lin.weight.data.copy_(w)
    q = QuantLinear.from_linear(lin, spec=LayerSpec(method=method, per_row=True))
    q.fold_st()
    res = quantize_layer(w, h, torch.ones(32), HessianQuantConfig(method))
    apply_layer(q, res.codes, res.row_scale, res.col_scale, res.latent)
    codes, scale = q.codes()
    assert torch.equal(codes, res.codes)
    expect = res.row_scale.view(-1, 1) * res.codes * res.col_scale.half().float().view(1, -1)
    torch.testing.assert_close(q.effective_weight().detach(), expect, rtol=1e-5, atol=1e-6)


def _ptq_recipe(small_text, method="binary", **kw):
    from binarize.recipe import load_recipe

    return load_recipe(f"{method}-ptq", {"seq_len": 64, "calib_sequences": 16, "data": str(small_text),
                                        "calib": str(small_text), "micro_batch": 4, **kw})


def test_corrected_target_undoes_the_error_its_inputs_carry():
    from binarize.train.hessian_init import corrected_target

    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=g)
    x_fp = torch.randn(4096, 32, generator=g)
    x_q = x_fp @ (torch.eye(32) + 0.2 * torch.randn(32, 32, generator=g)) + 0.05 * torch.randn(4096, 32, generator=g)
    h, m = x_q.T @ x_q / 4096, x_fp.T @ x_q / 4096
    v = corrected_target(w, h, m, 1e-4)
    err = lambda a: float((x_q @ a.T - x_fp @ w.T).pow(2).mean())  # noqa: E731
    assert err(v) < 0.2 * err(w)
    torch.testing.assert_close(corrected_target(w, h, h, 1e-6), w, rtol=1e-3, atol=1e-3)  # no input error: W itself


@pytest.mark.parametrize("method, settings", [("binary", {}),
                                              ("ternary", {"hessian_inputs": "corrected", "hessian_scale_steps": 2})])
def test_tokens_zero_writes_a_ptq_run_that_exports_and_tracks_the_fp_model_closer(trained_tiny_dir, small_text,
                                                                                   tmp_path, method, settings):
    from transformers import AutoModelForCausalLM

    from binarize.formats.latent import load_converted
    from binarize.formats.packed_reader import load_packed
    from binarize.train import ConvertJob, convert

    out, plain = tmp_path / "ptq", tmp_path / "plain"
    fmt = "binary" if method == "binary" else "ternary2"
    convert(ConvertJob(str(trained_tiny_dir), 0, out, _ptq_recipe(small_text, method, bai_batch_tokens=256, **settings),
                       progress=False, export=fmt))
    rec = json.loads((out / "run.json").read_text())
    assert rec["steps"] == [] and rec["tokens"]["requested"] == 0 and rec["tokens"]["trained"] == 0
    layers = rec["hessian"]["layers"]
    assert len(layers) == rec["quantized_layers"]
    assert all(v["error"] <= v["plain"] for v in layers.values())
    if settings.get("hessian_scale_steps"):
        search = rec["hessian"]["scale_search"]
        assert search["steps"] == 2 and search["loss_after"] < search["loss_before"]
    convert(ConvertJob(str(trained_tiny_dir), 0, plain, _ptq_recipe(small_text, method, init="sign", bai=True,
                                                                     bai_steps=1), progress=False))
    fp = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    model, tok, _ = load_converted(out)
    ref, _, _ = load_converted(plain)
    packed, _, _ = load_packed(out / "packed")
    x = torch.randint(0, 2000, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = [m.model(input_ids=x).last_hidden_state for m in (fp, model, ref)]
    err = lambda a: float((a - h[0]).pow(2).sum() / h[0].pow(2).sum())  # noqa: E731
    assert err(h[1]) < err(h[2])  # the Hessian-aware start is closer to the FP model than the plain sign's
    from binarize.qlinear import quant_layers

    for name, q in quant_layers(model).items():  # the packed export holds exactly the chosen weights
        assert torch.equal(packed.get_submodule(name).dequantized(), q.effective_weight().detach())


def test_tokens_zero_without_an_initialisation_is_refused_before_work(tiny_model_dir, tmp_path, capsys):
    from binarize.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as exc:
            main(list(argv))
        return exc.value.code, capsys.readouterr().err

    code, err = run("convert", str(tiny_model_dir), "--tokens", "0", "--recipe", "binary-ste", "--set", "bai=false",
                    "--out", str(tmp_path / "x"))
    assert code == 2 and "has none" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    code, err = run("generate-data", "--tokens", "0", "--out", str(tmp_path / "g.jsonl"))
    assert code == 2 and "positive" in err


def test_tokens_zero_reads_and_generates_no_training_text(trained_tiny_dir, small_text, tmp_path):
    from binarize.train import ConvertJob, convert

    out = tmp_path / "ptq"
    recipe = _ptq_recipe(small_text, "ternary", data="self")  # calibration from the file: nothing to generate
    convert(ConvertJob(str(trained_tiny_dir), 0, out, recipe, progress=False))
    info = json.loads((out / "run.json").read_text())["data"]
    assert info["train_source"] == "none (--tokens 0)" and "self_generation" not in info
    assert info["calib_sequences"] == 16


def test_ptq_refusals_come_before_any_work_and_leave_nothing(tiny_model_dir, small_text, tmp_path, capsys):
    from binarize.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as exc:
            main(list(argv))
        return exc.value.code, capsys.readouterr().err

    out = tmp_path / "x"
    base = ("convert", str(tiny_model_dir), "--tokens", "0", "--recipe", "ternary-ptq", "--seq-len", "64",
            "--data", str(small_text), "--calib", str(small_text), "--out", str(out))
    code, err = run(*base, "--set", "calib_sequences=1")  # 64 tokens for a 256-wide layer input
    assert code == 2 and "at least 256 calibration tokens" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("x.partial").exists()
    code, err = run(*base, "--set", "calib_sequences=8", "--export", "gguf-tq2")  # St per layer: no GGUF
    assert code == 2 and "share_st" in err and not out.with_name("x.partial").exists()


def test_a_ptq_run_saves_its_initialisation_for_a_later_budget(trained_tiny_dir, small_text, tmp_path):
    from binarize.train import ConvertJob, convert

    recipe = _ptq_recipe(small_text, "ternary", hessian_inputs="quantized")
    convert(ConvertJob(str(trained_tiny_dir), 0, tmp_path / "ptq", recipe, progress=False, save_init=True))
    init = json.loads((tmp_path / "ptq" / "init" / "init.json").read_text())
    assert len(init["hessian"]["layers"]) == 14
    convert(ConvertJob(str(trained_tiny_dir), 512, tmp_path / "more", recipe, progress=False,
                       init_from=tmp_path / "ptq"))
    rec = json.loads((tmp_path / "more" / "run.json").read_text())
    assert rec["init_from"]["run"] == str(tmp_path / "ptq") and rec["hessian"] == init["hessian"]
    assert rec["tokens"]["trained"] == 512


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_block_wise_after_the_hessian_stage_targets_the_original_blocks(trained_tiny_dir, small_text, method):
    """The Hessian stage writes its codes into the latent weights, so a block at lam = 0 is no
    longer the original: block-wise targets come from the original model's blocks."""
    from transformers import AutoModelForCausalLM

    from binarize.models import decoder_layers
    from binarize.qlinear import finish_init, prepare, set_t
    from binarize.train.blockwise import block_inputs, blockwise_reconstruct, reconstruction_loss
    from binarize.train.hessian_init import hessian_init

    recipe = _ptq_recipe(small_text, method, blockwise_steps=1, blockwise_sequences=8, blockwise_batch=4,
                         blockwise_lr=1e-12, blockwise_scale_lr=1e-12, hessian_scale_steps=0)
    fp = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (16, 64), generator=torch.Generator().manual_seed(2))
    prepare(model, recipe)
    finish_init(model, recipe)
    hessian_init(model, ids, recipe)
    x, kwargs = block_inputs(fp, ids[:8])
    with torch.no_grad():
        want = decoder_layers(fp)[0](x, **kwargs)
        set_t(model, math.inf, 1.0)
        got = decoder_layers(model)[0](x, **kwargs)
    want, got = (t[0] if isinstance(t, tuple) else t for t in (want, got))
    expected = float(reconstruction_loss(got, want, recipe.blockwise_loss))
    rec = blockwise_reconstruct(model, ids, recipe, None, None, write=False, fp_layers=decoder_layers(fp))
    assert rec.blocks[0]["loss_hard_before"] == pytest.approx(expected, rel=1e-4)
    assert 0 < expected < 1  # a Hessian-initialised block is near its original
