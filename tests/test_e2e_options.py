"""End-to-end stage options of issue 41: hidden-state distillation (``distill_hidden``) and
training the scales and norms only (``qat_latent: false``, EfficientQAT's E2E-QP)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from binarize.errors import BinarizeError
from binarize.recipe import load_recipe
from binarize.train.losses import Distill, TrainLoss
from tests.test_losses import _perturbed_pair


def _relative_errors(model, teacher, x) -> float:
    """The per-layer relative error written out token by token (the loss's definition, not its code)."""
    with torch.no_grad():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states
        ht = teacher(input_ids=x, output_hidden_states=True).hidden_states
    per_layer = []
    for s, t in zip(hs[1:], ht[1:]):
        tokens = [float(torch.linalg.vector_norm(s[b, i] - t[b, i]) ** 2 / torch.linalg.vector_norm(t[b, i]) ** 2)
                  for b in range(x.shape[0]) for i in range(x.shape[1])]
        per_layer.append(sum(tokens) / len(tokens))
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("chunk", [0, 11])
def test_hidden_distillation_adds_the_per_layer_relative_error(tiny_model, chunk):
    model = tiny_model
    teacher = _perturbed_pair(model)
    x = torch.randint(0, model.config.vocab_size, (2, 13))
    base = float(TrainLoss(model, Distill(teacher, 0.7, 2.0, 0.5), chunk)(x)[0].detach())
    loss, ce, kd = TrainLoss(model, Distill(teacher, 0.7, 2.0, 0.5, hidden=0.3), chunk)(x)
    expected = _relative_errors(model, teacher, x)
    assert expected > 1e-3
    assert float(loss) - base == pytest.approx(0.3 * expected, rel=1e-4)
    assert float(loss) == pytest.approx(0.5 * float(ce) + 0.7 * float(kd) + 0.3 * expected, rel=1e-5)
    same = copy.deepcopy(model).requires_grad_(False).eval()  # the student as its own teacher: no hidden error
    d = Distill(same, 0.7, 2.0, 0.5, hidden=0.3)
    assert float(TrainLoss(model, d, chunk)(x)[0]) == pytest.approx(0.5 * float(ce), rel=1e-5, abs=1e-6)


def test_hidden_distillation_gradients_agree_between_loss_paths(tiny_model):
    """The full-logits and chunked paths give one loss and one gradient with the hidden term on,
    also beside the teacher's top-k cache (where the teacher then runs every step)."""
    model = tiny_model
    teacher = _perturbed_pair(model)
    x = torch.randint(0, model.config.vocab_size, (2, 17))
    grads = {}
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        loss = TrainLoss(model, Distill(teacher, 1.0, 1.0, hidden=2.0), chunk)(x)[0]
        loss.backward()
        grads[chunk] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        # the top-k over the whole vocabulary, its misses served from the hidden states' teacher pass
        every = Distill(teacher, 1.0, 1.0, topk=model.config.vocab_size, hidden=2.0)
        assert float(TrainLoss(model, every, chunk)(x)[0]) == pytest.approx(float(loss), rel=1e-4)
    assert grads[7][0] == pytest.approx(grads[0][0], rel=1e-5)
    for name, g in grads[0][1].items():
        assert float((grads[7][1][name] - g).abs().max() / g.abs().max()) < 1e-4, name
    calls = []
    teacher.get_decoder().register_forward_hook(lambda mod, args, out: calls.append(1))
    cached = TrainLoss(model, Distill(teacher, 1.0, 1.0, topk=16, hidden=2.0), 7)
    first, again = float(cached(x)[0]), float(cached(x)[0])
    # the top-k miss reuses the teacher's pass for the hidden states; the second call is a cache hit,
    # but its hidden states still need the teacher
    assert len(calls) == 2 and first == pytest.approx(again, rel=1e-6) and cached.distill.hits == 2


def test_recipe_checks_the_new_keys():
    with pytest.raises(BinarizeError, match="distill_hidden distils from the teacher"):
        load_recipe("binaryllm", {"distill_hidden": 1.0})
    with pytest.raises(BinarizeError, match="distill_hidden must be >= 0"):
        load_recipe("binaryllm-distill", {"distill_hidden": -1.0})
    with pytest.raises(BinarizeError, match="qat_latent=false .* nothing to train"):
        load_recipe("binaryllm", {"qat_latent": False, "scaling": "analytic", "train_fp": "none"})
    assert load_recipe("binaryllm-distill", {"distill_hidden": 0.5, "qat_latent": False}).distill_hidden == 0.5


def test_qat_latent_false_trains_scales_and_norms_only(trained_tiny_dir, small_text, tmp_path):
    """E2E-QP on a real conversion: the latent weights leave the end-to-end stage as they entered it
    (no BaI, no block-wise: the original weights), Sl and the norms move."""
    from binarize.train import ConvertJob, convert

    recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=128, bai=False, calib_sequences=2, chunks=2,
                                           data=str(small_text), calib="ptb", lr=1e-2, micro_batch=2,
                                           qat_latent=False, quantizer="ste"))
    out = convert(ConvertJob(model=str(trained_tiny_dir), tokens=128 * 8, out=tmp_path / "run", recipe=recipe,
                             progress=False))
    original = load_file(trained_tiny_dir / "model.safetensors")
    latent = load_file(out / "model.safetensors")
    linears = [k for k in latent if k.endswith("proj.weight")]
    assert linears and all(torch.equal(latent[k], original[k].float()) for k in linears)
    sl = [latent[k] for k in latent if k.endswith(".sl")]
    assert sl and max(float((s - 1).abs().max()) for s in sl) > 1e-3
    norms = [k for k in latent if "norm" in k]
    assert any(not torch.equal(latent[k], original[k].float()) for k in norms)
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert len(steps) == 8 and all(math.isfinite(s["loss"]) for s in steps)
