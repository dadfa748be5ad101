"""The chunked linear + loss gives the full-logits loss and gradients; memory options and launch
checks refuse what they cannot do with one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from binarize.errors import BinarizeError
from binarize.recipe import load_recipe
from binarize.train.losses import Distill, TrainLoss
from binarize.train.run import check_launch, check_model_options


def _grads(model, loss_fn, x, scale=0.3):
    model.zero_grad(set_to_none=True)
    loss, ce, kd = loss_fn(x)
    (loss * scale).backward()
    return loss.detach(), ce.detach(), kd, {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}


@pytest.mark.parametrize("with_teacher", [False, True])
def test_chunked_loss_matches_full_logits(tiny_model, with_teacher):
    model = tiny_model
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if with_teacher else None
    torch.manual_seed(0)
    with torch.no_grad():  # the student differs from its teacher, so the KL and its gradient are not zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.get_output_embeddings().weight.requires_grad_(True)  # tied to the embedding: both paths reach it
    distill = Distill(teacher, alpha=0.7, temperature=2.0, ce_weight=0.5) if teacher is not None else None
    x = torch.randint(0, model.config.vocab_size, (2, 37))
    full = _grads(model, TrainLoss(model, distill, 0), x)
    chunked = _grads(model, TrainLoss(model, distill, 11), x)  # 74 positions: 11 does not divide them
    for a, b in zip(full[:2], chunked[:2]):
        assert float(b) == pytest.approx(float(a), rel=1e-5)
    if with_teacher:
        assert float(full[2]) > 1e-4
        assert float(chunked[2]) == pytest.approx(float(full[2]), rel=1e-4)
    else:
        assert full[2] is None and chunked[2] is None
    assert full[3].keys() == chunked[3].keys() and len(full[3]) == len(list(model.parameters()))
    for name, g in full[3].items():
        err = float((chunked[3][name] - g).abs().max() / g.abs().max())
        assert err < 1e-4, (name, err)


def test_chunked_loss_refuses_scaled_logits(tiny_model):
    """Logits the chunked path does not reproduce (Cohere's logit_scale) are refused with one line;
    Gemma 2's soft-capping is reproduced (tests/test_families.py)."""
    tiny_model.config.logit_scale = 0.0625
    with pytest.raises(BinarizeError, match="logit_scale"):
        TrainLoss(tiny_model, None, 64)
    TrainLoss(tiny_model, None, 0)  # the full-logits path computes what the model computes
    kl_last = load_recipe("binaryllm", {"loss_chunk": 0, "blockwise_steps": 4, "blockwise_last_loss": "kl",
                                        "blockwise_sequences": 8, "calib_sequences": 8})
    with pytest.raises(BinarizeError, match="blockwise_last_loss=kl needs logits.*use --set blockwise_last_loss=same"):
        check_model_options(tiny_model, kl_last)
    check_model_options(tiny_model, load_recipe("binaryllm", {"loss_chunk": 0}))


def test_grad_checkpointing_refused_where_the_model_cannot(tiny_model):
    recipe = load_recipe("binaryllm", {"grad_checkpointing": True})
    check_model_options(tiny_model, recipe)
    tiny_model.supports_gradient_checkpointing = False
    with pytest.raises(BinarizeError, match="does not support activation checkpointing"):
        check_model_options(tiny_model, recipe)


def test_grad_checkpointing_and_chunked_loss_train_the_same_model(trained_tiny_dir, small_text, tmp_path):
    from binarize.train import ConvertJob, convert

    losses = {}
    for name, over in {"full": dict(loss_chunk=0), "chunked-gc": dict(loss_chunk=48, grad_checkpointing=True)}.items():
        recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=128, bai_batch_tokens=128, bai_steps=2,
                                               calib_sequences=4, chunks=2, data=str(small_text), lr=1e-2,
                                               micro_batch=2, distill_alpha=1.0, **over))
        out = convert(ConvertJob(model=str(trained_tiny_dir), tokens=512, out=tmp_path / name, recipe=recipe,
                                 progress=False))
        losses[name] = [s["loss"] for s in json.loads((out / "run.json").read_text())["steps"]]
    assert len(losses["full"]) == 4
    assert losses["chunked-gc"] == pytest.approx(losses["full"], rel=1e-4)
    assert losses["full"][-1] != pytest.approx(losses["full"][0], rel=1e-3)


def test_launch_checks(monkeypatch):
    from binarize.train.sharding import fsdp_options, fsdp_requested

    check_launch({})
    check_launch({"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(BinarizeError, match="DeepSpeed launches are not supported.*DDP.*FSDP"):
        check_launch({"ACCELERATE_USE_DEEPSPEED": "true"})
    # an accelerate FSDP config reaches binarize as environment variables
    assert fsdp_requested(True, {}) and fsdp_requested(False, {"ACCELERATE_USE_FSDP": "true"})
    assert not fsdp_requested(False, {"ACCELERATE_USE_FSDP": "false"})
    assert fsdp_options({}) == {"reshard_after_forward": True, "activation_checkpointing": False}
    assert fsdp_options({"FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true"}) == {
        "reshard_after_forward": False, "activation_checkpointing": True}
    with pytest.raises(BinarizeError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        fsdp_options({"FSDP_VERSION": "1"})
    with pytest.raises(BinarizeError, match="offload .* not supported"):
        fsdp_options({"FSDP_OFFLOAD_PARAMS": "true"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_launch({"LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(BinarizeError, match="4 processes per machine .* 2 GPU"):
        check_launch({"LOCAL_WORLD_SIZE": "4"})


def _perturbed_pair(model):
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.get_output_embeddings().weight.requires_grad_(True)
    return teacher


@pytest.mark.parametrize("chunk", [0, 11])
def test_topk_distillation_over_the_whole_vocabulary_is_the_full_kl(tiny_model, chunk):
    """distill_topk = vocab keeps every logit: the same loss and gradients as the full teacher (up to
    the fp16 the cache stores); a small k gives a different (truncated) KL."""
    model = tiny_model
    teacher = _perturbed_pair(model)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (2, 37))
    full = _grads(model, TrainLoss(model, Distill(teacher, 0.7, 2.0, 0.5), chunk), x)
    sparse = _grads(model, TrainLoss(model, Distill(teacher, 0.7, 2.0, 0.5, topk=vocab), chunk), x)
    assert float(full[2]) > 1e-4
    assert float(sparse[2]) == pytest.approx(float(full[2]), rel=1e-3)
    assert float(sparse[0]) == pytest.approx(float(full[0]), rel=1e-4)
    for name, g in full[3].items():
        err = float((sparse[3][name] - g).abs().max() / g.abs().max())
        assert err < 1e-3, (name, err)
    few = _grads(model, TrainLoss(model, Distill(teacher, 0.7, 2.0, 0.5, topk=8), chunk), x)
    assert abs(float(few[2]) - float(full[2])) > 1e-3 * float(full[2])


def test_topk_cache_runs_the_teacher_once_per_sequence(tiny_model):
    model = tiny_model
    teacher = _perturbed_pair(model)
    calls = []
    teacher.get_decoder().register_forward_hook(lambda mod, args, out: calls.append(1))
    d = Distill(teacher, 1.0, 1.0, topk=16)
    loss_fn = TrainLoss(model, d, 16)
    x = torch.randint(0, model.config.vocab_size, (3, 20))
    first = float(loss_fn(x)[2])
    assert len(calls) == 1 and d.cache_info()["sequences"] == 3
    again = float(loss_fn(x[[2, 0]])[2])  # seen sequences, another batch: no teacher forward
    assert len(calls) == 1 and (d.hits, d.misses) == (2, 3)
    assert again > 0 and first > 0
    loss_fn(torch.cat([x[:1], torch.randint(0, model.config.vocab_size, (1, 20))]))
    assert len(calls) == 2 and d.cache_info()["sequences"] == 4  # only the new sequence ran
    info = d.cache_info()
    assert info["MiB"] == round(4 * 20 * 16 * 6 / 2**20, 2)  # fp16 logit + int32 id per entry


def test_topk_cache_serves_the_second_epoch(trained_tiny_dir, small_text, tmp_path):
    """A conversion with two epochs over a small text runs the teacher in the first only."""
    from binarize.train import ConvertJob, convert

    text = tmp_path / "small.txt"
    text.write_text(small_text.read_text()[:4000])
    recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=256, bai_steps=0, bai=False, calib_sequences=2,
                                           chunks=2, data=str(text), calib="ptb", lr=1e-3, micro_batch=2,
                                           distill_alpha=1.0, distill_topk=16))
    out = convert(ConvertJob(model=str(trained_tiny_dir), tokens=64 * 40, out=tmp_path / "run", recipe=recipe,
                             progress=False))
    run = json.loads((out / "run.json").read_text())
    cache, epochs = run["data"]["teacher_topk_cache"], run["data"]["epochs_over_train_data"]
    assert epochs > 1.5
    assert cache["sequences"] == run["data"]["train_blocks_available"] < 40
    assert cache["misses"] == cache["sequences"] and cache["hits"] == 40 - cache["sequences"]
    assert all(s["kd"] > 0 for s in run["steps"])
