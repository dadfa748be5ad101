"""This machine's speed for each stage of a conversion, on the actual model, before any work
(``binarize convert --time``): a few timed units of every stage the plan may use, run by the
stages' own functions on throw-away copies (the model that is then converted is not touched, nor
the global RNG). Seconds, not minutes: on the default model on 2 CPU cores about 30-60 s.

What is timed and how it is scaled (``timeplan.StageSpeeds``):

* end-to-end step: one micro-batch of ``micro_batch x seq_len`` random token ids through the
  recipe's ``TrainLoss`` (teacher included) forward and backward, after one untimed warm-up, times
  the micro-batches of a step, plus one AdamW step over the trainable parameters;
* BaI / the scale search: the same without the teacher, per step, plus the two evaluations;
* Hessian-aware initialisation: the stage itself on a one-block copy of the model (the recipe's
  calibration size), times the number of blocks;
* block-wise: ``train_block`` on the one-block copy, per step from two short runs' difference
  (``PROBE_BLOCK_STEPS``; what is left is the block's setup), the last block's head-KL loss on
  top the same way (``PROBE_LAST_BLOCK_STEPS``), plus four passes of the cached sequences per block;
* self-generation: one batch of ``self_batch`` sequences after a shorter untimed one, scaled to
  ``seq_len`` by the attention's FLOPs (``generation_token_s``; skipped when the text is not
  self-generated);
* writing: a ``torch.save`` of the model's weights, three times over (run, export, check), + 5 s.

Random token ids stand in for the text: the time of these stages does not depend on it.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import time
from dataclasses import dataclass

import torch

from ..models import decoder_layers
from ..qlinear import finish_init, prepare
from ..recipe import Recipe
from .timeplan import StageSpeeds

PROBE_BLOCK_STEPS = (3, 15)  # block-wise steps are timed as the difference of two short runs (warm-up cancels;
# 4 steps apart, the default model's 0.13 s step once read as 0.203 s and planned 211 steps where 600 fit)
PROBE_LAST_BLOCK_STEPS = (2, 6)  # the last block's head-KL steps, the same way: at (1, 3) one probe read 3.73 s
# per step where a run took ~1.6 (and 1.95 in another), two steps apart and one of them the optimizer's first
GEN_PROBE_LENS = (32, 96)  # self-generation: an untimed warm-up batch, then the timed one (generation_token_s)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_block_copy(model) -> torch.nn.Module:
    """A deep copy of ``model`` with only its first decoder block (the probe's unit of a stage).
    The other blocks are never copied (the model holds them again when this returns)."""
    layers = decoder_layers(model)
    rest = list(layers[1:])
    del layers[1:]
    try:
        m = copy.deepcopy(model)
    finally:
        layers.extend(rest)
    cfg = m.config
    if getattr(cfg, "num_hidden_layers", None):
        cfg.num_hidden_layers = 1
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:1]
    return m


@dataclass(frozen=True)
class PassTimes:
    """Seconds of one micro-batch through the full model: forward and backward without the
    teacher, forward alone; the unit of BaI and the scale search (``init_seconds``)."""

    student_mb: float
    forward_mb: float


def init_seconds(model, r: Recipe, passes: PassTimes, ids: torch.Tensor) -> float:
    """Seconds of recipe ``r``'s initialisation stages on ``model``: BaI and the scale search by
    their steps of ``passes``, the Hessian-aware initialisation timed on a one-block copy (calibration
    token ids ``ids``, (n, seq_len)) times the number of blocks."""
    from .bai import BAI_EVAL_SEQUENCES
    from .hessian_init import hessian_init

    mb = max(1, r.micro_batch)

    def search_s(steps: int) -> float:
        per = math.ceil(max(1, r.bai_batch_tokens // r.seq_len) / mb) * passes.student_mb
        return steps * per + 2 * math.ceil(BAI_EVAL_SEQUENCES / mb) * passes.forward_mb if steps else 0.0

    s = search_s(r.bai_steps) if r.bai else 0.0
    if r.init == "hessian":
        m1 = one_block_copy(model)
        prepare(m1, r)
        finish_init(m1, r)
        rng = torch.get_rng_state()
        s += len(decoder_layers(model)) * _timed(lambda: hessian_init(m1, ids[: r.calib_sequences], r))
        torch.set_rng_state(rng)
        s += search_s(r.hessian_scale_steps)
    return s


def probe_ids(model, recipe: Recipe) -> torch.Tensor:
    """Random token ids (max(micro_batch, calib_sequences, blockwise_batch), seq_len), seeded."""
    g = torch.Generator().manual_seed(0)
    n = max(recipe.micro_batch, recipe.calib_sequences, recipe.blockwise_batch)
    ids = torch.randint(int(model.config.vocab_size), (n, recipe.seq_len), generator=g)
    return ids.to(next(model.parameters()).device)


def attention_per_position(model) -> float:
    """Extra decode cost per KV-cache position, as a fraction of a decode step's weight matmuls
    (FLOPs): attention reads 4 * hidden FLOPs per cached position per layer (q.k and the weighted
    sum of v over all heads) against 2 FLOPs per weight of every linear (blocks and head). 0 where
    the config names no hidden size or layer count. The default model: 2.6e-4 (a 128-token mean
    position adds 3 % to the step)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if not hidden or not layers or not weights:
        return 0.0
    return 4 * hidden * layers / (2 * weights)


def generation_token_s(model, tokenizer, recipe: Recipe) -> float:
    """Seconds per self-generated token of ``recipe``'s corpus (sequences of ``seq_len`` in
    batches of ``self_batch``): one batch at ``GEN_PROBE_LENS[1]`` tokens timed after an untimed
    batch at ``GEN_PROBE_LENS[0]`` (the first decode steps of a process, and of each new cache
    length, run slower), scaled to the corpus's mean position ``seq_len / 2`` by the attention's
    share of a step (``attention_per_position``, from the FLOPs). On the default model (2-core
    CPU, batch 64, 256-token sequences) per-token times at 96 and 256 tokens agree within the
    noise of one batch (6.1-6.7 ms, 6.6 ms): the position term is small. The former fit of a
    line through two timed lengths read that noise as slope and planned 9.1 ms where 6.0 were
    taken (12.4 minutes for 8.2, ``benchmarks/results/timeplan_cpu.md``)."""
    from binarize.calibration.selfgen import SelfGenConfig, generate_sequences

    L = recipe.seq_len
    warm_n, n = max(2, min(GEN_PROBE_LENS[0], L // 2)), max(3, min(GEN_PROBE_LENS[1], L))  # never past the corpus's own
    generate_sequences(model, tokenizer, SelfGenConfig(tokens=recipe.self_batch * warm_n, seq_len=warm_n,
                                                       batch_size=recipe.self_batch, seed=recipe.seed))
    cfg = SelfGenConfig(tokens=recipe.self_batch * n, seq_len=n, batch_size=recipe.self_batch, seed=recipe.seed)
    t0 = time.perf_counter()
    seqs = generate_sequences(model, tokenizer, cfg)
    per_token = (time.perf_counter() - t0) / max(1, sum(map(len, seqs)))
    c = attention_per_position(model)
    return per_token * (1 + c * L / 2) / (1 + c * n / 2)


def measure_speeds(model, tokenizer, recipe: Recipe, *, spent_s: float, generate: bool,
                   log=None) -> tuple[StageSpeeds, PassTimes]:
    """StageSpeeds of ``recipe`` for ``model`` (a loaded, unprepared causal LM, left unchanged)
    with ``ptq_init_s`` 0 (the PTQ path is timed by ``init_seconds`` only where the plan needs it),
    and the PassTimes that timing uses. ``spent_s``: seconds the job spent before the probe (added
    to the probe's own). ``generate``: time self-generation too."""
    from .blockwise import block_inputs, head_kl_loss, train_block
    from .liger_loss import resolve_backend
    from .loop import trainable_groups
    from .losses import Distill, TrainLoss

    t_probe = time.perf_counter()
    rng = torch.get_rng_state()
    n_blocks = len(decoder_layers(model))
    L, mb = recipe.seq_len, max(1, recipe.micro_batch)
    ids = probe_ids(model, recipe)
    # first, before any copy: timed after the training copy, decoding said 9.5 ms per token where
    # the corpus then took 5.9 (and 6.5 timed alone)
    gen_token_s = generation_token_s(model, tokenizer, recipe) if generate else 0.0

    full = copy.deepcopy(model)
    prepare(full, recipe)
    finish_init(full, recipe)
    full.train()
    distill = None
    if recipe.distill_alpha > 0:
        distill = Distill.from_recipe(model, recipe)
    student = TrainLoss(full, None, recipe.loss_chunk, resolve_backend(recipe, full))
    qat = TrainLoss(full, distill, recipe.loss_chunk, resolve_backend(recipe, full)) if distill else student
    x = ids[:mb]
    qat(x)[0].backward()  # warm-up
    student_mb = _timed(lambda: student(x)[0].backward()) if distill else None  # BaI's unit, every gradient as before
    # the end-to-end step with the stage's own gradients: E2E-QP (qat_latent false) computes none for
    # the latent weights (ternary-distill's scales-only step ran 10.4 s, with the latent weights 11.8)
    opt = torch.optim.AdamW(trainable_groups(full, recipe, recipe.qat_latent), lr=1e-12)
    qat_mb = _timed(lambda: qat(x)[0].backward())
    student_mb = qat_mb if student_mb is None else student_mb
    opt_s = _timed(opt.step)
    with torch.no_grad():
        fwd_mb = _timed(lambda: student(x))
    micro = math.ceil(recipe.batch_tokens // L / mb)
    qat_step_s = micro * qat_mb + opt_s
    passes = PassTimes(student_mb, fwd_mb)
    del full, student, qat, opt, distill  # the training copy goes before the one-block copies come
    recipe_init = init_seconds(model, recipe, passes, ids)

    m1 = one_block_copy(model)
    prepare(m1, recipe)
    finish_init(m1, recipe)
    for p in m1.parameters():
        p.requires_grad_(False)
    block = decoder_layers(m1)[0]
    bx, kwargs = block_inputs(m1, ids[: recipe.blockwise_batch], mb)
    target = bx.detach().clone()
    k1, k2 = PROBE_BLOCK_STEPS
    w1, w2 = (train_block(block, bx, target, kwargs, dataclasses.replace(recipe, blockwise_steps=k), 0)["wall_s"]
              for k in (k1, k2))
    block_step_s = max(w2 - w1, 1e-6) / (k2 - k1)  # 3 steps with their warm-up said 0.31 s; the stage ran ~0.18
    block_setup_s = max(0.0, w1 - k1 * block_step_s)  # once per block: the optimizer, the first step's allocations
    with torch.no_grad():
        fwd_block = _timed(lambda: block(bx[:mb], **kwargs))
    block_fixed_s = 4 * math.ceil(recipe.blockwise_sequences / mb) * fwd_block + block_setup_s
    last_extra = 0.0
    if recipe.blockwise_last_loss == "kl" and recipe.blockwise_steps:
        # on the hidden states entering the model's last block: on block 0's inputs (the embeddings,
        # which the tied head reads back) the head's distributions were so peaked (KL 52) that exp's
        # underflow path made the step 2.2 s where real ones take 1.5 (default model, one block-wise
        # step of 4 x 256 tokens), and the binary hour's probe read 3.37 s on the last block where it ran 1.14
        x_last, _ = block_inputs(model, ids[: recipe.blockwise_batch], mb, layer=-1)
        kl = head_kl_loss(m1, recipe)
        k1, k2 = PROBE_LAST_BLOCK_STEPS
        w1, w2 = (train_block(block, x_last, x_last.clone(), kwargs, dataclasses.replace(recipe, blockwise_steps=k),
                              0, loss_fn=kl)["wall_s"] for k in (k1, k2))
        last_extra = max(0.0, (w2 - w1) / (k2 - k1) - block_step_s)

    buf = io.BytesIO()
    save_s = 3 * _timed(lambda: torch.save(model.state_dict(), buf)) + 5.0
    torch.set_rng_state(rng)
    speeds = StageSpeeds(n_blocks=n_blocks, batch_tokens=(recipe.batch_tokens // L) * L,
                         spent_s=spent_s + time.perf_counter() - t_probe, init_s=recipe_init, ptq_init_s=0.0,
                         block_fixed_s=block_fixed_s, block_step_s=block_step_s, last_block_extra_s=last_extra,
                         qat_step_s=qat_step_s, gen_token_s=gen_token_s, save_s=save_s)
    if log:
        log(f"stage speeds measured in {time.perf_counter() - t_probe:.0f} s: end-to-end step {qat_step_s:.2f} s, "
            f"block-wise step {block_step_s:.3f} s per block (+{last_extra:.3f} s on the last), initialisation "
            f"{recipe_init:.0f} s, self-generation {gen_token_s * 1000:.1f} ms per token")
    return speeds, passes
