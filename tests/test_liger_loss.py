"""loss_backend=liger: liger-kernel's fused linear CE (its Triton kernel through the CPU interpreter)
gives the chunked path's loss and gradients; its distillation is the forward KL over the positions
with a target; the backend is chosen, or refused in one line, before any work."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from binarize.errors import BinarizeError
from binarize.recipe import load_recipe
from binarize.train.liger_loss import resolve_backend
from binarize.train.losses import Distill, TrainLoss

pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (the test extra installs it)")
needs_kernel = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="liger's CE kernel needs CUDA or the Triton interpreter")


def small_llama(seed: int = 0, vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def _grads(model, loss_fn, x):
    model.zero_grad(set_to_none=True)
    loss, ce, kd = loss_fn(x)
    (0.3 * loss).backward()
    return float(loss.detach()), float(ce.detach()), None if kd is None else float(kd.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_grads(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6, msg=n)


@needs_kernel
@pytest.mark.parametrize("head_trains", [False, True])
def test_liger_cross_entropy_matches_the_chunked_loss(head_trains):
    model = small_llama()
    model.get_output_embeddings().weight.requires_grad_(head_trains)
    x = torch.randint(0, 300, (3, 21))
    chunked = _grads(model, TrainLoss(model, None, 16, "chunked"), x)
    liger = _grads(model, TrainLoss(model, None, 16, "liger"), x)
    assert liger[0] == pytest.approx(chunked[0], rel=1e-5) and liger[1] == pytest.approx(chunked[1], rel=1e-5)
    assert liger[2] is None
    _same_grads(chunked[3], liger[3])
    assert ("lm_head.weight" in liger[3]) == head_trains


def test_liger_distillation_is_the_forward_kl_over_positions_with_a_target():
    model, teacher = small_llama(0), small_llama(1).requires_grad_(False).eval()
    model.get_output_embeddings().weight.requires_grad_(False)
    distill = Distill(teacher, alpha=0.7, temperature=2.0, ce_weight=0.5)
    x = torch.randint(0, 300, (2, 19))
    liger = _grads(model, TrainLoss(model, distill, 16, "liger"), x)

    def reference(x):  # from the full logits: CE and tau^2 KL(p_T || p_S), both over the 2 x 18 targets
        z = model(input_ids=x).logits[:, :-1].flatten(0, 1)
        with torch.no_grad():
            zt = teacher(input_ids=x).logits[:, :-1].flatten(0, 1)
        ce = F.cross_entropy(z, x[:, 1:].flatten())
        kd = 4.0 * F.kl_div(F.log_softmax(z / 2, -1), F.log_softmax(zt / 2, -1), log_target=True,
                            reduction="batchmean")
        return 0.5 * ce + 0.7 * kd, ce, kd

    ref = _grads(model, reference, x)
    for got, want in zip(liger[:3], ref[:3]):
        assert got == pytest.approx(want, rel=1e-5)
    _same_grads(ref[3], liger[3])
    # the chunked path averages the KL over all 2 x 19 positions, the last of each sequence included
    chunked = _grads(model, TrainLoss(model, distill, 16, "chunked"), x)
    assert chunked[1] == pytest.approx(ref[1], rel=1e-5) and chunked[2] != pytest.approx(ref[2], rel=1e-3)


def test_the_backend_is_chosen_or_refused_before_any_work(monkeypatch):
    model = small_llama()

    def recipe(**kw):
        return load_recipe("binaryllm", kw)

    assert resolve_backend(recipe(), model, "cpu") == "chunked"  # auto: liger only on CUDA
    assert resolve_backend(recipe(), model, "cuda") == "liger"
    assert resolve_backend(recipe(loss_backend="chunked"), model, "cuda") == "chunked"
    assert resolve_backend(recipe(distill_alpha=1.0, distill_topk=8), model, "cuda") == "chunked"
    assert resolve_backend(recipe(loss_backend="liger", distill_alpha=1.0), model, "cpu") == "liger"
    for kw, needle in [(dict(loss_chunk=0), "loss_chunk 0"), (dict(distill_alpha=1.0, distill_topk=8), "top-k")]:
        with pytest.raises(BinarizeError, match=needle):
            resolve_backend(recipe(loss_backend="liger", **kw), model, "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BinarizeError, match="CUDA"):
        resolve_backend(recipe(loss_backend="liger"), model, "cpu")
    with pytest.raises(BinarizeError, match="loss_backend"):
        recipe(loss_backend="fast")
    topk = Distill(small_llama(1).requires_grad_(False), alpha=1.0, temperature=1.0, topk=4)
    with pytest.raises(BinarizeError, match="top-k"):  # a loss module built by hand does not drop the KL
        TrainLoss(model, topk, 16, "liger")(torch.randint(0, 300, (1, 8)))
    gemma = copy.deepcopy(model)
    gemma.config.final_logit_softcapping = 30.0
    gemma.config.model_type = "gemma2"
    with pytest.raises(BinarizeError, match="soft-capping"):
        resolve_backend(recipe(loss_backend="liger", distill_alpha=1.0), gemma, "cuda")


def test_convert_refuses_a_liger_loss_it_cannot_run_before_writing_anything(tiny_model_dir, small_text, tmp_path,
                                                                            capsys):
    from test_cli_errors import assert_one_line_error, run_cli

    out = tmp_path / "out"
    args = ["convert", str(tiny_model_dir), "--data", str(small_text), "--out", str(out), "--seq-len", "64",
            "--batch-tokens", "256", "--tokens", "1k", "--no-progress", "--set", "loss_backend=liger"]
    assert_one_line_error(*run_cli(capsys, *args, "--set", "loss_chunk=0"), "loss_chunk 0")
    assert_one_line_error(*run_cli(capsys, *args, "--distill", "1", "--set", "distill_topk=4"), "top-k")
    assert not out.exists() and not any(tmp_path.glob("out*"))


def test_a_distilling_conversion_runs_on_liger_and_records_it(trained_tiny_dir, small_text, tmp_path):
    """Same seed and data: the first step's CE (before any update) is the chunked run's; the KL differs
    by the positions without a target, and run.json says which backend ran."""
    import json

    from binarize.train import ConvertJob, convert

    runs = {}
    for backend in ("chunked", "liger"):
        # the hard sign from step 0 (ste): at t = 0 the student is the teacher and both KLs are ~0 of either sign
        recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=256, bai=False, chunks=2, data=str(small_text),
                                               distill_alpha=1.0, loss_backend=backend, quantizer="ste"))
        out = convert(ConvertJob(model=str(trained_tiny_dir), tokens=768, out=tmp_path / backend, recipe=recipe,
                                 progress=False, export="none"))
        runs[backend] = json.loads((out / "run.json").read_text())
    a, b = runs["chunked"], runs["liger"]
    assert (a["loss_backend"], b["loss_backend"]) == ("chunked", "liger") and len(b["steps"]) == 3
    assert b["tokens"] == a["tokens"]
    first_a, first_b = a["steps"][0], b["steps"][0]
    assert first_b["kd"] > 0 and first_b["kd"] != pytest.approx(first_a["kd"], rel=1e-4)
    assert first_b["loss"] == pytest.approx(first_a["loss"], rel=1e-5)  # the steps' "loss" is the CE
