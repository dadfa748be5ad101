"""Block-wise reconstruction (train/blockwise.py) on a tiny trained LLaMA with real text."""

import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from binarize.errors import BinarizeError
from binarize.models import decoder_layers
from binarize.qlinear import finish_init, prepare, quant_layers
from binarize.recipe import load_recipe
from binarize.train import ConvertJob, Interrupted, convert
from binarize.train.blockwise import block_inputs, blockwise_reconstruct, reconstruction_loss


def bw_recipe(small_text, **kw):
    base = dict(seq_len=64, batch_tokens=256, bai=False, calib_sequences=8, chunks=4, data=str(small_text),
                calib=str(small_text), lr=1e-3, min_lr=1e-5, blockwise_steps=12, blockwise_sequences=8,
                blockwise_batch=4, blockwise_lr=3e-3)
    base.update(kw)
    return load_recipe("binaryllm", base)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _calib(path, small_text, n=8, L=64):
    from transformers import AutoTokenizer

    from binarize.calibration.streams import TokenBlocks, tokenize_documents

    tok = AutoTokenizer.from_pretrained(path)
    return TokenBlocks.from_stream(tokenize_documents(tok, [small_text.read_text()[:200_000]]), L).blocks[-n:]


def test_captured_inputs_replay_the_full_precision_model(trained_tiny_dir, small_text):
    model = _model(trained_tiny_dir).eval()
    ids = _calib(trained_tiny_dir, small_text, n=3)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    x, kw = block_inputs(model, ids, micro_batch=2)
    assert x.shape == (3, 64, model.config.hidden_size)
    assert torch.allclose(x, hidden[0], atol=1e-6)
    with torch.no_grad():  # the captured kwargs (one sequence) drive every block over a batch of three
        for i, block in enumerate(decoder_layers(model)[:-1]):
            out = block(x, **kw)
            x = out[0] if isinstance(out, tuple) else out
            assert torch.allclose(x, hidden[i + 1], atol=1e-4), i


def test_relative_loss_weighs_tokens_alike():
    y = torch.ones(1, 2, 4)
    y[0, 0] *= 1000.0  # a massive activation at the first token
    out = y.clone()
    out[0, 1] += 0.5
    assert reconstruction_loss(out, y, "relative") == pytest.approx(0.5 * (0.25 * 4 / 4))
    assert reconstruction_loss(out, y, "mse") == pytest.approx(0.25 * 4 / 8)


@pytest.mark.parametrize("inputs", ["quantized", "fp"])
def test_reconstruction_lowers_every_blocks_hard_sign_error(trained_tiny_dir, small_text, tmp_path, inputs):
    recipe = bw_recipe(small_text, blockwise_inputs=inputs, blockwise_steps=30)
    model = _model(trained_tiny_dir)
    prepare(model, recipe)
    finish_init(model, recipe)
    ids = _calib(trained_tiny_dir, small_text)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss  # hard sign, before
    rec = blockwise_reconstruct(model, ids, recipe, tmp_path, None)
    assert len(rec.blocks) == 2 and rec.tokens == 30 * 4 * 64
    for b in rec.blocks:
        assert b["loss_hard_after"] < 0.8 * b["loss_hard_before"], b
    assert all(q.t == math.inf and q.lam == 1.0 for q in quant_layers(model).values())
    assert not any(p.requires_grad for p in model.parameters())
    if inputs == "quantized":  # each block corrects the error its inputs carry: the model's loss improves too
        with torch.no_grad():
            assert model(input_ids=ids, labels=ids).loss < ref


def test_a_deadline_sets_each_later_blocks_steps_from_the_blocks_before_it(trained_tiny_dir, small_text, tmp_path,
                                                                          monkeypatch):
    import binarize.train.blockwise as bw

    recipe = bw_recipe(small_text, blockwise_steps=12)
    model = _model(trained_tiny_dir)
    prepare(model, recipe)
    finish_init(model, recipe)
    trained, asked = [], []
    real = bw.train_block
    monkeypatch.setattr(bw, "train_block", lambda block, x, t, kw, r, i, *a: trained.append(r.blockwise_steps)
                        or real(block, x, t, kw, r, i, *a))

    def steps_for(blocks_left, blocks):
        asked.append((blocks_left, [dict(b) for b in blocks]))
        return 5

    rec = blockwise_reconstruct(model, _calib(trained_tiny_dir, small_text), recipe, tmp_path, None,
                                steps_for=steps_for)
    assert trained == [12, 5] and [b["steps"] for b in rec.blocks] == [12, 5]
    assert len(asked) == 1 and asked[0][0] == 1 and len(asked[0][1]) == 1  # asked once, before the last block
    first = asked[0][1][0]
    assert first["steps"] == 12 and first["block_s"] > first["wall_s"] > 0  # its time in all: targets and checks too
    assert rec.steps == 12 and rec.blocks[1]["loss_hard_after"] < rec.blocks[1]["loss_hard_before"]


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_bf16_trains_blocks_in_bf16_matmuls_as_well_as_float32(trained_tiny_dir, small_text, tmp_path, bf16):
    """``cpu_bf16``: the training forward's linears run in bfloat16 (their outputs are bf16), the
    evaluation passes and every parameter stay float32, and the error falls as it does in float32."""
    recipe = bw_recipe(small_text, blockwise_steps=30, cpu_bf16=bf16)
    model = _model(trained_tiny_dir)
    prepare(model, recipe)
    finish_init(model, recipe)
    seen = set()
    layer = next(iter(quant_layers(model).values()))
    layer.register_forward_hook(lambda mod, args, out: seen.add((torch.is_grad_enabled(), out.dtype)))
    rec = blockwise_reconstruct(model, _calib(trained_tiny_dir, small_text), recipe, tmp_path, None)
    train = {dtype for grad, dtype in seen if grad}
    assert train == ({torch.bfloat16} if bf16 else {torch.float32})
    assert {dtype for grad, dtype in seen if not grad} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for b in rec.blocks:
        assert b["loss_hard_after"] < 0.8 * b["loss_hard_before"], b


def test_convert_with_blockwise_resumes_at_a_block(trained_tiny_dir, small_text, tmp_path):
    recipe = bw_recipe(small_text)
    full = tmp_path / "full"
    convert(ConvertJob(str(trained_tiny_dir), 4_000, full, recipe, progress=False))
    rec = json.loads((full / "run.json").read_text())
    assert len(rec["blockwise"]["blocks"]) == 2 and rec["blockwise"]["activation_mib"] > 0

    import binarize.train.blockwise as bw

    real = bw.train_block

    def interrupting(*a, **kw):  # Ctrl-C while block 1 trains: it finishes, then the run stops
        out = real(*a, **kw)
        if a[5] == 0:
            signal.raise_signal(signal.SIGINT)
        return out

    part = tmp_path / "part"
    bw.train_block = interrupting
    try:
        with pytest.raises(Interrupted, match="after block 1/2"):
            convert(ConvertJob(str(trained_tiny_dir), 4_000, part, recipe, progress=False))
    finally:
        bw.train_block = real
    assert (tmp_path / "part.partial" / bw.ACTIVATIONS).exists()
    convert(ConvertJob(str(trained_tiny_dir), 4_000, part, recipe, resume=True, progress=False))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rb = json.loads((part / "run.json").read_text())
    assert [s["loss"] for s in rec["steps"]] == [s["loss"] for s in rb["steps"]]
    assert [x["loss_last"] for x in rec["blockwise"]["blocks"]] == [x["loss_last"] for x in rb["blockwise"]["blocks"]]


def test_bad_blockwise_budgets_are_one_line(small_text):
    with pytest.raises(BinarizeError, match="larger than the calibration set"):
        bw_recipe(small_text, blockwise_sequences=16, calib_sequences=8)
    with pytest.raises(BinarizeError, match="blockwise_batch 9 is larger"):
        bw_recipe(small_text, blockwise_batch=9)
    from binarize.train.plan import check_job

    with pytest.raises(BinarizeError, match="no pretrained blocks"):
        check_job(bw_recipe(small_text), 4_000, from_scratch="tiny")


def test_a_teacher_that_does_not_fit_is_refused_before_training(trained_tiny_dir, small_text, tmp_path, monkeypatch):
    import collections

    import psutil

    fake = collections.namedtuple("mem", "available")(1024)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    out = tmp_path / "kd"
    with pytest.raises(BinarizeError, match="distillation needs a frozen copy of the model .* GiB of RAM is free"):
        convert(ConvertJob(str(trained_tiny_dir), 4_000, out, bw_recipe(small_text, distill_alpha=1.0),
                           progress=False))
    assert not out.exists() and not (tmp_path / "kd.partial").exists()


def test_blocks_follow_their_own_schedule_then_the_recipes(trained_tiny_dir, small_text, tmp_path, monkeypatch):
    import binarize.train.blockwise as bw

    recipe = bw_recipe(small_text, quantizer="ste", blockwise_steps=8, chunks=4)
    model = _model(trained_tiny_dir)
    prepare(model, recipe)
    finish_init(model, recipe)
    seen, real = [], bw.reconstruction_loss

    def spy(out, target, kind):
        if torch.is_grad_enabled():  # a training step, not the before/after measurement
            seen.append({(q.ste, q.t) for q in quant_layers(decoder_layers(model)[0]).values()})
        return real(out, target, kind)

    monkeypatch.setattr(bw, "reconstruction_loss", spy)
    blockwise_reconstruct(model, _calib(trained_tiny_dir, small_text), recipe, tmp_path, None)
    # block 0's layers: progressive (ste off) with t rising over 4 chunks, although the recipe's QAT is straight-through
    ts = [next(iter(s)) for s in seen[:8]]
    assert all(len(s) == 1 for s in seen[:8]) and not any(ste for ste, _ in ts)
    assert [t for _, t in ts] == sorted(t for _, t in ts) and ts[0][1] < 1 < ts[-1][1] < math.inf
    assert all(q.ste and q.t == math.inf for q in quant_layers(model).values())  # back to the recipe's STE


@pytest.mark.parametrize("name", ["binaryllm-distill", "ternary-distill"])
def test_distill_recipes_convert_and_export(trained_tiny_dir, small_text, tmp_path, name):
    from binarize.formats.packed_reader import load_packed
    from binarize.train.run import ConvertJob as Job, convert_run

    recipe = load_recipe(name, dict(seq_len=64, batch_tokens=256, bai_steps=2, bai_batch_tokens=128,
                                    calib_sequences=8, blockwise_sequences=8, blockwise_steps=4, data=str(small_text),
                                    calib=str(small_text)))
    fmt = "ternary2" if recipe.method == "ternary" else "binary"
    res = convert_run(Job(str(trained_tiny_dir), 1_024, tmp_path / "run", recipe, progress=False, export=fmt))
    rec = res.record
    assert len(rec.blockwise.blocks) == 2 and (rec.bai is not None) == recipe.bai
    assert all(s.kd is not None and math.isfinite(s.loss) and s.t == math.inf for s in rec.steps)  # STE + teacher KL
    model, _, _ = load_packed(res.exported.path)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 1000, (1, 16))).logits).all()


def test_head_kl_loss_is_the_kl_of_the_full_logits(trained_tiny_dir):
    """The last block's KL objective: value and gradient equal to KL(softmax(head(norm(target))) ||
    softmax(head(norm(out)))) from full logits, mean over positions (chunked: 24 positions at a time)."""
    from binarize.models import final_norm
    from binarize.train.blockwise import head_kl_loss

    model = _model(trained_tiny_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = model.config.hidden_size
    target = torch.randn(2, 20, hidden)
    out = (target + 0.3 * torch.randn(2, 20, hidden)).requires_grad_(True)
    loss = head_kl_loss(model, bw_recipe_plain(loss_chunk=24))(out, target)
    loss.backward()
    norm, head = final_norm(model), model.get_output_embeddings()
    out2 = out.detach().clone().requires_grad_(True)
    t_logp = torch.log_softmax(head(norm(target)), -1)
    s_logp = torch.log_softmax(head(norm(out2)), -1)
    want = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-4)
    assert torch.allclose(out.grad, out2.grad, rtol=1e-3, atol=1e-7)
    same = target.clone().requires_grad_(True)
    assert float(head_kl_loss(model, bw_recipe_plain())(same, target)) == pytest.approx(0.0, abs=1e-5)


def bw_recipe_plain(**kw):
    return load_recipe("binaryllm", dict(bai=False, blockwise_steps=4, blockwise_sequences=8, calib_sequences=8,
                                         blockwise_batch=4, **kw))


def test_last_block_trains_on_the_heads_kl(trained_tiny_dir, small_text, tmp_path):
    """blockwise_last_loss=kl: the last block's KL to the FP logits falls, the other blocks train as before."""
    recipe = bw_recipe(small_text, blockwise_steps=30, blockwise_last_loss="kl")
    model = _model(trained_tiny_dir)
    prepare(model, recipe)
    finish_init(model, recipe)
    ids = _calib(trained_tiny_dir, small_text)
    rec = blockwise_reconstruct(model, ids, recipe, tmp_path, None)
    first, last = rec.blocks
    assert "head_kl_before" not in first and first["loss_hard_after"] < 0.8 * first["loss_hard_before"]
    assert last["head_kl_after"] < 0.8 * last["head_kl_before"], last
    with pytest.raises(BinarizeError, match="blockwise_last_loss"):
        bw_recipe(small_text, blockwise_last_loss="logits")


def test_final_norm_is_found_in_every_family_or_refused():
    from binarize.models import final_norm

    class NoNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()

    with pytest.raises(BinarizeError, match="no final norm"):
        final_norm(NoNorm())
    for attr in ("norm", "final_layer_norm", "final_layernorm"):
        m = torch.nn.Module()
        m.model = torch.nn.Module()
        setattr(m.model, attr, torch.nn.LayerNorm(4))
        assert final_norm(m) is getattr(m.model, attr)


def test_block_inputs_of_the_last_block_are_the_earlier_blocks_outputs(trained_tiny_dir):
    """block_inputs(layer=-1) (the probe's head-KL inputs) equals block 0's inputs run through every
    block before the last with the captured keyword arguments."""
    from binarize.train.blockwise import _block_call, block_inputs

    model = _model(trained_tiny_dir)
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    first, kwargs = block_inputs(model, ids, 2)
    last, _ = block_inputs(model, ids, 2, layer=-1)
    layers = decoder_layers(model)
    assert len(layers) > 1 and last.shape == first.shape
    x = first
    with torch.no_grad():
        for block in layers[:-1]:
            x = _block_call(block, x, kwargs).float()
    assert torch.allclose(last, x, atol=1e-5), float((last - x).abs().max())
    assert not torch.allclose(last, first, atol=1e-3)
