"""Ternary layers, the continual 16 -> 1.58-bit switch, distillation and training from scratch."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from binarize.train import ConvertJob, Distill, check_job, convert, plan_budget
from binarize.errors import BinarizeError
from binarize.qlinear import LayerSpec, QuantLinear, quant_layers
from binarize.quantizers import dequantize, quantize_activations_int8
from binarize.recipe import load_recipe
from binarize.schedules import phase_lambda

TINY_RUN = dict(seq_len=64, batch_tokens=256, micro_batch=4, chunks=4)


def ternary_layer(method="absmean", per_row=False, act_bits=0, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(48, 16, bias=False)
    q = QuantLinear.from_linear(lin, spec=LayerSpec(method="ternary", ste=True, ternary_scale=method,
                                                    per_row=per_row, act_bits=act_bits))
    q.fold_st()
    with torch.no_grad():
        q.st.copy_(torch.rand(48).add_(0.5).half().float())  # a non-trivial St, exact in fp16
    return q


@pytest.mark.parametrize("method", ["absmean", "absmedian"])
@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_layer_export_view_is_its_weight(method, per_row):
    q = ternary_layer(method, per_row)
    codes, scale = q.codes()
    assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(dequantize(codes, scale, q.st), q.effective_weight().detach())
    assert (scale.unique().numel() == 1) != per_row  # one gamma per tensor unless per_row
    w = q.latent().detach().abs()
    gamma = (w.mean() if method == "absmean" else w.flatten().median()) if not per_row else None
    if gamma is not None:
        assert scale[0].item() == pytest.approx(gamma.item())


def test_absmean_and_absmedian_differ():
    a, b = ternary_layer("absmean"), ternary_layer("absmedian")
    assert not torch.equal(a.codes()[0], b.codes()[0])
    # AbsMedian's gamma is smaller for a Gaussian-like tensor (median|w| < mean|w|), so fewer zeros
    assert (b.codes()[0] == 0).sum() < (a.codes()[0] == 0).sum()


def test_lambda_mixes_values_and_keeps_the_identity_gradient():
    q = ternary_layer()
    fp = q.full_precision_weight().detach()
    hard = q.quantized_weight().detach()
    q.lam = 0.0
    assert torch.equal(q.effective_weight().detach(), fp)
    q.lam = 0.25
    w = q.effective_weight()
    assert torch.allclose(w.detach(), fp + 0.25 * (hard - fp), atol=1e-6)
    w.sum().backward()  # d/dW~ of (W~ * St) is St for every lam: the difference is detached
    assert torch.allclose(q.weight.grad, q.st.expand_as(q.weight.grad).float())


def test_int8_activations_follow_lambda():
    q = ternary_layer(act_bits=8)
    x = torch.randn(3, 5, 48)
    w = q.quantized_weight().detach()
    assert torch.allclose(q(x), F.linear(quantize_activations_int8(x), w), atol=1e-6)
    assert not torch.allclose(q(x), F.linear(x, w), atol=1e-4)
    q.lam = 0.0  # before the switch nothing is quantized, activations included
    assert torch.allclose(q(x), F.linear(x, q.full_precision_weight()), atol=1e-6)


def test_phase_lambda_shapes():
    assert phase_lambda(4, 5, "sigmoid", 10) == 0.0
    assert phase_lambda(5, 5, "abrupt", 10) == 1.0
    lin = [phase_lambda(s, 5, "linear", 4) for s in range(5, 10)]
    assert lin == [0.25, 0.5, 0.75, 1.0, 1.0]
    sig = [phase_lambda(s, 0, "sigmoid", 100, 10.0) for s in range(100)]
    assert all(b > a for a, b in zip(sig, sig[1:]))
    assert sig[-1] == 1.0 and sig[0] < 0.01 and sig[49] == pytest.approx(0.5, abs=0.03)
    steep = phase_lambda(20, 0, "sigmoid", 100, 30.0)
    assert steep < phase_lambda(20, 0, "sigmoid", 100, 5.0)  # steeper: later and faster


def test_switch_points_resolve_and_impossible_ones_fail():
    r = load_recipe("continual-16to158", dict(TINY_RUN, switch_at=0.25))
    b = plan_budget(r, 256 * 20)
    assert (b.steps, b.switch) == (20, 5)
    assert plan_budget(load_recipe("continual-16to158", dict(TINY_RUN, switch_at=7)), 256 * 20).switch == 7
    with pytest.raises(BinarizeError, match="nothing would be trained quantized"):
        plan_budget(load_recipe("continual-16to158", dict(TINY_RUN, switch_at=20)), 256 * 20)
    with pytest.raises(BinarizeError, match="after the switch"):
        plan_budget(load_recipe("binaryllm", dict(TINY_RUN, switch_at=0.9)), 256 * 20)
    for bad in ({"switch_at": 2.5}, {"switch_at": -1}, {"phase_in": "cosine"}, {"act_bits": 4},
                {"method": "ternary", "scaling": "learnable"}, {"distill_temperature": 0}):
        with pytest.raises(BinarizeError):
            load_recipe("continual-16to158", bad)
    with pytest.raises(BinarizeError, match="binary format cannot store"):
        check_job(load_recipe("bitnet-b158-absmean", TINY_RUN), 256 * 20, export="binary")
    with pytest.raises(BinarizeError, match="BaI has nothing"):
        check_job(load_recipe("binaryllm", TINY_RUN), 256 * 20, from_scratch="tiny")
    with pytest.raises(BinarizeError, match="teacher"):
        check_job(load_recipe("continual-16to158", dict(TINY_RUN, distill_alpha=1.0)), 256 * 20, from_scratch="tiny")


def _run(model_dir, text, out, tokens=256 * 8, recipe="continual-16to158", from_scratch=None, **kw):
    rec = load_recipe(recipe, dict(TINY_RUN, data=str(text), lr=3e-3, **kw))
    return convert(ConvertJob(model=str(model_dir), tokens=tokens, out=out, recipe=rec, progress=False,
                              from_scratch=from_scratch))


def test_continual_switch_full_precision_first_then_ternary(trained_tiny_dir, small_text, tmp_path):
    from binarize.formats.latent import load_converted
    from binarize.evaluate import mean_loss

    kept = _run(trained_tiny_dir, small_text, tmp_path / "kept", switch_at=0.5)
    fresh = _run(trained_tiny_dir, small_text, tmp_path / "fresh", switch_at=0.5, retain_optimizer=False)
    a = json.loads((kept / "run.json").read_text())["steps"]
    b = json.loads((fresh / "run.json").read_text())["steps"]
    assert [s["lambda"] for s in a] == [0.0] * 4 + [1.0] * 4
    # identical until the switch (same seed, data, full precision), then the optimizer state matters
    assert [s["loss"] for s in a[:5]] == [s["loss"] for s in b[:5]]
    assert a[5]["loss"] != b[5]["loss"]
    # the spike at the switch: on the same batch, ternary weights lose to the full-precision ones
    later = _run(trained_tiny_dir, small_text, tmp_path / "later", switch_at=6)
    c = json.loads((later / "run.json").read_text())["steps"]
    assert [s["loss"] for s in c[:4]] == [s["loss"] for s in a[:4]] and c[4]["lambda"] == 0.0
    assert a[4]["loss"] > c[4]["loss"] + 0.2, (a[4]["loss"], c[4]["loss"])  # measured: 6.42 against 6.07
    model, _, meta = load_converted(kept)
    assert meta["method"] == "ternary" and meta["act_bits"] == 8
    for q in quant_layers(model).values():
        assert set(q.codes()[0].unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert math.isfinite(mean_loss(model, torch.randint(0, 100, (2, 16))))


def test_distillation_term_is_zero_for_the_teacher_and_grows_after_the_switch(trained_tiny_dir, small_text, tmp_path):
    from binarize.models import load_model

    model, _, _ = load_model(str(trained_tiny_dir))
    x = torch.randint(0, 1000, (2, 16))
    d = Distill(model, alpha=1.0, temperature=2.0)
    assert d.kl(x, model(input_ids=x).logits).item() == pytest.approx(0.0, abs=1e-6)
    assert d.kl(x, model(input_ids=x).logits * 0.5).item() > 1e-3
    run = _run(trained_tiny_dir, small_text, tmp_path / "kd", switch_at=0.5, distill_alpha=0.5, distill_temperature=2.0)
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert steps[0]["kd"] == pytest.approx(0.0, abs=1e-5)  # student == teacher before any update
    assert steps[-1]["kd"] > 1e-3  # ternary student != FP teacher


def test_from_scratch_trains_every_parameter(tokenizer_dir, small_text, tmp_path):
    from binarize.formats.latent import load_converted
    from binarize.models import SCRATCH_CONFIGS

    run = _run(tokenizer_dir, small_text, tmp_path / "scratch", tokens=256 * 6, switch_at=0.5, from_scratch="tiny")
    record = json.loads((run / "run.json").read_text())
    assert record["from_scratch"] == "tiny" and record["recipe"]["train_fp"] == "all"
    losses = [s["loss"] for s in record["steps"]]
    assert losses[0] == pytest.approx(math.log(record_vocab(run)), rel=0.05)  # random init: ~uniform
    assert losses[2] < losses[0] - 0.1
    model, _, _ = load_converted(run)
    assert model.config.hidden_size == SCRATCH_CONFIGS["tiny"]["hidden_size"]
    torch.manual_seed(0)  # the same seed gives the same random init: the embedding moved away from it
    from transformers import LlamaForCausalLM

    init = LlamaForCausalLM(model.config)
    assert not torch.equal(init.model.embed_tokens.weight, model.model.embed_tokens.weight)


def record_vocab(run) -> int:
    return json.loads((run / "config.json").read_text())["vocab_size"]


def test_ternary_export_round_trip_with_int8_activations(trained_tiny_dir, small_text, tmp_path):
    from binarize.formats.latent import load_converted
    from binarize.formats import export
    from binarize.formats.packed_reader import load_packed

    run = _run(trained_tiny_dir, small_text, tmp_path / "bitnet", recipe="bitnet-b158-absmedian")
    with pytest.raises(BinarizeError, match="cannot store its zero"):
        export(run, tmp_path / "bin", "binary")
    assert not (tmp_path / "bin").exists()
    ref, _, _ = load_converted(run)
    x = torch.randint(0, 1000, (2, 24))
    want = ref(input_ids=x).logits
    for fmt in ("ternary2", "ternary-b3"):
        model, _, meta = load_packed(export(run, tmp_path / fmt, fmt, outer_dtype="fp32"), cpu_cache="fp32")
        assert meta["act_bits"] == 8
        assert torch.allclose(model(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)


def test_progressive_ternary_layer_follows_f3():
    from binarize.quantizers import progressive_ternary, ternary_scale

    q = ternary_layer()
    q.ste = False
    q.t = 3.0
    gamma = ternary_scale(q.latent().detach())
    want = progressive_ternary(q.latent().detach() / gamma, 3.0) * gamma * q.st
    assert torch.allclose(q.effective_weight().detach(), want, atol=1e-6)
    w = q.latent().detach().clone().requires_grad_(True)
    (progressive_ternary(w / gamma, 3.0) * gamma * q.st).sum().backward()
    q.effective_weight().sum().backward()  # the exact F3 derivative, not straight-through
    assert torch.allclose(q.weight.grad, w.grad, atol=1e-5)
    assert not torch.allclose(q.weight.grad, q.st.expand_as(q.weight.grad))


@pytest.mark.parametrize("args,needle", [
    (["--from-scratch", "--recipe", "binaryllm"], "BaI has nothing to initialise"),
    (["--from-scratch", "--config", "huge", "--recipe", "continual-16to158"], "unknown --config 'huge'"),
    (["--recipe", "continual-16to158", "--switch-at", "2.5"], "switch_at is a whole step"),
    (["--recipe", "continual-16to158", "--switch-at", "900"], "nothing would be trained quantized"),
    (["--recipe", "bitnet-b158-absmean", "--export", "binary"], "cannot store its zero weights"),
    (["--recipe", "continual-16to158", "--phase-in", "cosine"], "phase_in='cosine'"),
])
def test_bad_continual_options_are_one_line(capsys, tiny_model_dir, small_text, tmp_path, args, needle):
    from tests.test_cli_errors import assert_one_line_error, run_cli

    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", str(tiny_model_dir), "--tokens", "4096", "--data", str(small_text),
                        "--seq-len", "64", "--batch-tokens", "256", "--chunks", "4", "--out", str(out), "--no-progress",
                        *args)
    assert_one_line_error(code, err, needle)
    assert not out.exists() and not out.with_name("out.partial").exists()


STOCK_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
assert 'binarize' not in sys.modules
assert type(m.model.layers[0].mlp.down_proj).__name__ == 'BitLinear'
torch.save(m(input_ids=torch.load(sys.argv[2])).logits.detach(), sys.argv[3])
"""


def test_bitnet_export_loads_in_stock_transformers(trained_tiny_dir, small_text, tmp_path):
    """The bitnet format needs no binarize: a fresh interpreter loads it with transformers alone."""
    import subprocess
    import sys

    from binarize.formats import export
    from binarize.formats.latent import load_converted
    from binarize.formats.outer import cast_outer_
    from binarize.qlinear import QuantLinear

    run = _run(trained_tiny_dir, small_text, tmp_path / "bitnet", recipe="bitnet-b158-absmean")
    out = export(run, tmp_path / "stock", "bitnet")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitnet" and cfg["modules_to_not_convert"] == ["lm_head"]
    x = torch.randint(0, 1000, (2, 24))
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", STOCK_LOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    ref, _, _ = load_converted(run)
    cast_outer_(ref, "bf16", skip=(QuantLinear,))  # the export's embeddings / lm_head are bf16 (default)
    ref.float()
    assert torch.allclose(torch.load(tmp_path / "y.pt"), ref(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    fp = sum(f.stat().st_size for f in trained_tiny_dir.glob("*.safetensors"))
    assert size < fp  # block linears at 2 bits (the tiny model is mostly its fp32 embedding)


def test_bitnet_export_refuses_what_it_cannot_hold(converted_tiny_dir, tmp_path, tiny_model):
    from binarize.formats import export
    from binarize.formats.bitnet import check_bitnet_fit
    from binarize.qlinear import quantize_

    with pytest.raises(BinarizeError, match="holds ternary models"):
        export(converted_tiny_dir, tmp_path / "x", "bitnet")
    assert not (tmp_path / "x").exists()
    quantize_(tiny_model, LayerSpec(method="ternary", per_row=True, act_bits=8))
    with pytest.raises(BinarizeError, match="one scale per tensor"):
        check_bitnet_fit(tiny_model, {"method": "ternary", "act_bits": 8})
    with pytest.raises(BinarizeError, match="act_bits=0"):
        check_bitnet_fit(tiny_model, {"method": "ternary", "act_bits": 0})


def test_pure_distillation_drops_the_next_token_loss(trained_tiny_dir):
    from binarize.models import load_model
    from binarize.train.loop import accumulate

    model, _, _ = load_model(str(trained_tiny_dir))
    x = torch.randint(0, 1000, (2, 16))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    got = {}
    for w in (0.0, 1.0):
        model.zero_grad()
        ce, kd = accumulate(model, x, 1, lambda loss: got.__setitem__(w, got.get(w, 0.0) + float(loss)),
                            Distill(teacher, alpha=2.0, temperature=1.0, ce_weight=w))
        assert kd > 1e-3
    assert got[0.0] == pytest.approx(2.0 * kd, rel=1e-5)  # loss = alpha * KL only
    assert got[1.0] == pytest.approx(ce + 2.0 * kd, rel=1e-5)
    with pytest.raises(BinarizeError, match="no loss to train on"):
        load_recipe("binaryllm", {"distill_ce": 0.0})
