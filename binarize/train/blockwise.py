"""Block-wise reconstruction: after BaI and before end-to-end QAT, each decoder block is trained
on its own so that the quantized block reproduces the full-precision block's output.

Sources: EfficientQAT's Block-AP (arXiv 2407.11062) and BRECQ (arXiv 2102.05426). Per block i:

    y_i = FP block_i(x_i^fp)                      (the target, computed once with the layers at lam = 0)
    min  loss(Q-block_i(x_i), y_i)                 over the block's latent weights, Sl, (St) and norms

* ``x_i`` (recipe ``blockwise_inputs``): ``"quantized"`` (default) feeds block i the outputs of
  the already-converted blocks 0..i-1 at the hard quantizer, as BRECQ and EfficientQAT do, so each
  block learns to undo the error its inputs already carry (the error the converted model will
  see); ``"fp"`` feeds the FP model's own hidden states (every block solves an independent problem).
* ``loss`` (``blockwise_loss``): ``"relative"`` (default) is the per-token squared error divided
  by the per-token squared norm of the target, averaged over tokens. Pretrained LLMs carry massive
  activations in a few residual channels at a few positions (SmolLM2-135M: ~25000 at the first
  token), which dominate a plain MSE; the per-token normalisation weighs every position alike.
  ``"mse"`` is the plain mean squared error (EfficientQAT).
* The sharpness schedule (``blockwise_quantizer``): ``"progressive"`` runs the recipe's scheduler
  over ``min(chunks, blockwise_steps)`` chunks inside every block (t from ~0 to the last chunk's
  value), then the block is used at the hard quantizer (t = inf) downstream and afterwards;
  ``"ste"`` trains at the hard sign with the straight-through estimator throughout.
* The last block (``blockwise_last_loss``): ``"same"`` trains it like the others; ``"kl"``
  trains it on KL(p_FP || p_Q) of the next-token distributions that the final norm and the frozen
  output head give the FP block's output and the quantized block's (mean over positions; chunked
  through ``losses.ChunkedLinearLoss``, so no full-vocabulary logits are held). The last block's
  output is the only one the head reads directly, and a relative hidden-state error weighs
  every direction alike where the head does not: on the default model's binaryllm-distill
  initialisation, 60 more steps on the last block took the WikiText-2 loss (first 512 tokens,
  hard sign) from 7.11 to 6.90 with the relative loss and to 6.43 with the KL; trained with the KL
  from the start, the whole conversion ends 3.6 / 6.1 / 30 % lower on WikiText-2 / C4 / PTB at 32k
  QAT tokens (``benchmarks/results/quality_cpu.md``). Cost: the head's forward twice and backward
  once per step of that block (~400 s of a 2-core CPU at 100 steps on the default model).
* Trainable: what end-to-end QAT trains in that block (``loop.trainable_groups``: latent weights
  with weight decay; Sl, St when ``train_st``, biases, and norms per ``train_fp``); AdamW, fresh
  for each block, with a cosine learning rate to a tenth of its start: ``blockwise_lr`` for the
  latent weights and ``blockwise_scale_lr`` for the rest. The scales and norms start at O(1)
  (Sl = 1) while the latent weights are O(1e-2), so one learning rate would leave either the
  scales frozen or the weights thrashing within the few hundred steps a block gets.

* Precision: float32, or on a CPU with ``cpu_bf16`` the training forward's matmuls under bfloat16
  autocast (``train_autocast``; weights, scales and AdamW stay float32): 1.34x faster for the same
  perplexity within one seed's noise on the default model (``quality2``'s ``bw300-seq128-bf16``).

Memory: one block's activations for a batch plus the cache of block inputs and targets, three
(``fp`` inputs: two) float32 tensors of (blockwise_sequences, seq_len, hidden) on the training
device; the size is reported in run.json (``blockwise.activation_mib``).

Resume: Ctrl-C stops after the block in flight; the checkpoint holds the model and the cached
activations for the next block, and ``--resume`` continues at that block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import BinarizeError
from ..models import decoder_layers, final_norm
from ..qlinear import quant_layers, set_t
from ..recipe import Recipe
from ..schedules import chunk_t
from .losses import IGNORE, ChunkedLinearLoss, logit_softcap, reconstruction_loss
from .loop import Interrupted, StopOnInterrupt, trainable_groups
from .record import BlockwiseRecord

ACTIVATIONS = "blockwise_activations.pt"
# The last block's KL to the FP logits is reported (run.json head_kl_before / _after) on its first
# 32 cached sequences: over 128 the two passes through the 49k-word head cost ~85 s of a 2-core CPU
# on the default model, 6 % of a 30-minute conversion, for a diagnostic
KL_REPORT_SEQUENCES = 32


class _Captured(Exception):
    """Raised by the pre-hook on a block to stop the forward once its inputs are known."""


def _block_call(block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_inputs(model, ids: torch.Tensor, micro_batch: int = 1, layer: int = 0) -> tuple[torch.Tensor, dict]:
    """(x, kwargs): the hidden states entering decoder block ``layer`` (0: the first, -1: the last)
    for token ids (n, seq_len) as float32 (n, seq_len, hidden), and the keyword arguments the model
    passes every block (position embeddings, causal mask) captured for one sequence; they broadcast
    over a batch.
    """
    layers = decoder_layers(model)
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["kw"] = kwargs
        raise _Captured

    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    xs, kw = [], None
    try:
        for i in range(0, ids.shape[0], micro_batch):
            try:
                model(input_ids=ids[i : i + micro_batch], use_cache=False)
            except _Captured:
                xs.append(seen["x"].float())
            if kw is None:
                try:
                    model(input_ids=ids[:1], use_cache=False)
                except _Captured:
                    kw = {k: v for k, v in seen["kw"].items()
                          if k not in ("cache", "past_key_values", "past_key_value", "use_cache", "hidden_states")}
    finally:
        handle.remove()
    return torch.cat(xs), kw


def head_kl_loss(model, recipe: Recipe):
    """loss(out, target) for the last block: mean over positions of KL(p_FP || p_Q), p = softmax of
    the frozen output head on the final norm of target (FP block output) and of out (quantized),
    both (batch, seq, hidden); ``recipe.loss_chunk`` positions' logits at a time (1024 when 0)."""
    norm, head = final_norm(model), model.get_output_embeddings()
    cap = logit_softcap(model) or 0.0
    chunk = recipe.loss_chunk or 1024

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = norm(out).flatten(0, 1)
        with torch.no_grad():
            t = norm(target.to(out.dtype)).flatten(0, 1)
        no_targets = torch.full((h.shape[0],), IGNORE, dtype=torch.long, device=h.device)
        kl, _, _ = ChunkedLinearLoss.apply(h, head.weight, head.bias, no_targets, t, head.weight, head.bias, None,
                                           (0.0, 1.0, 1.0, cap, cap), chunk)
        return kl

    return loss


def block_t(step: int, steps: int, recipe: Recipe) -> float:
    """t of a block step: the recipe's scheduler over min(chunks, steps) chunks, or inf (``ste``)."""
    if recipe.blockwise_quantizer == "ste":
        return math.inf
    chunks = max(2, min(recipe.chunks, steps))
    return chunk_t(recipe.scheduler, min(step * chunks // steps, chunks - 1), chunks, recipe.schedule_span)


@torch.no_grad()
def _run(block, x: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    return torch.cat([_block_call(block, x[i : i + batch], kwargs).float() for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def _mean_loss(loss_fn, block, x: torch.Tensor, target: torch.Tensor, kwargs: dict, batch: int) -> float:
    """loss_fn over the cached sequences, ``batch`` at a time, weighted by batch size (hard quantizer)."""
    total = 0.0
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        total += float(loss_fn(_block_call(block, xb, kwargs), target[i : i + batch])) * xb.shape[0]
    return total / x.shape[0]


def _set_fp(block, fp: bool) -> None:
    """lam = 0 runs every layer of the block at its full-precision weight (W~ St = W)."""
    set_t(block, math.inf, 0.0 if fp else 1.0)


def train_autocast(device: torch.device, recipe: Recipe):
    """The autocast context of the block-wise stage's training forward: bfloat16 on a CPU where the
    recipe says ``cpu_bf16``, else none (float32; on CUDA the block-wise stage runs float32 too).
    The latent weights, scales and optimizer state stay float32; autocast rounds the matmuls'
    inputs to bf16 and accumulates in float32. 1.49x per block-wise step of the default model on a
    2-core AVX-512-BF16 CPU (``benchmarks/blockwise_step_speed.py``). The end-to-end stage stays
    float32 on a CPU (its bf16 logits and KL were not measured)."""
    on = device.type == "cpu" and recipe.cpu_bf16
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def train_block(block, x: torch.Tensor, target: torch.Tensor, kwargs: dict, recipe: Recipe, index: int,
                progress=None, loss_fn=None) -> dict:
    """AdamW on one block's trainable parameters; returns its losses and wall time. The block is left
    at the hard quantizer. ``loss_fn(out, target)``: the objective (default: ``reconstruction_loss``
    of the recipe's ``blockwise_loss``)."""
    if loss_fn is None:
        loss_fn = lambda out, tgt: reconstruction_loss(out, tgt, recipe.blockwise_loss)  # noqa: E731
    t0 = time.perf_counter()
    steps, batch = recipe.blockwise_steps, recipe.blockwise_batch
    groups = trainable_groups(block, recipe)  # [latent weights, scales / norms / biases]
    base_lr = (recipe.blockwise_lr, recipe.blockwise_scale_lr)
    for grp, lr0 in zip(groups, base_lr):
        grp["base_lr"] = lr0
    opt = torch.optim.AdamW(groups, lr=recipe.blockwise_lr, betas=tuple(recipe.betas))
    params = [p for g in opt.param_groups for p in g["params"]]
    g = torch.Generator().manual_seed(recipe.seed * 1000 + index)
    order = torch.cat([torch.randperm(x.shape[0], generator=g) for _ in range(math.ceil(steps * batch / x.shape[0]))])
    task = progress.add_task(f"block {index + 1}", total=steps, info="") if progress else None
    quant = list(quant_layers(block).values())
    for q in quant:  # the block's own schedule, whatever the end-to-end stage uses (recipe quantizer)
        q.ste = recipe.blockwise_quantizer == "ste"
    block.train()
    losses = []
    autocast = train_autocast(x.device, recipe)
    for step in range(steps):
        t = block_t(step, steps, recipe)
        set_t(block, t)
        decay = 0.55 + 0.45 * math.cos(math.pi * step / max(1, steps - 1))  # cosine to a tenth
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * decay
        idx = order[step * batch : (step + 1) * batch]
        with autocast:
            loss = loss_fn(_block_call(block, x[idx], kwargs), target[idx])
        if not torch.isfinite(loss):  # one scalar per step; the block's weights are not yet touched
            raise BinarizeError(f"block-wise stage, block {index + 1}, step {step + 1}: the reconstruction loss is "
                                f"{float(loss)} (not finite); the blocks before it are checkpointed (--resume), "
                                "or lower blockwise_lr / blockwise_scale_lr and start again with --overwrite")
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            progress.update(task, advance=1, info=f"t {t:.3g} loss {losses[-1]:.4f}")
    block.eval()
    for q in quant:
        q.ste = q.spec.ste
    for p in params:
        p.requires_grad_(False)
    set_t(block, math.inf)
    if progress:
        progress.remove_task(task)
    return {"block": index, "loss_first": losses[0], "loss_last": losses[-1], "wall_s": time.perf_counter() - t0}


def blockwise_reconstruct(model, calib: torch.Tensor, recipe: Recipe, workdir: Path, record: BlockwiseRecord | None,
                          progress=None, log=None, save=None, write: bool = True,
                          fp_layers: torch.nn.ModuleList | None = None,
                          steps_for: Callable[[int, list[dict]], int] | None = None) -> BlockwiseRecord:
    """The block-wise stage over ``calib[:blockwise_sequences]`` (token ids, (n, seq_len)).

    ``fp_layers``: the original model's decoder blocks, which give the targets y_i where a stage
    before this one replaced the latent weights (``init: hessian`` writes its codes into them,
    so lam = 0 no longer runs the original block); None: the block itself at lam = 0.

    Continues a stage a checkpoint interrupted when ``record`` holds finished blocks (the cached
    activations are then read from ``workdir``). ``save(record)`` writes a checkpoint; Ctrl-C
    stops after the block in flight, saves and raises ``Interrupted``. ``write=False`` (every
    process but the main one of a multi-process run, each of which runs this stage on its own)
    leaves ``workdir`` to the main process.

    ``steps_for(blocks_left, blocks)``: the steps per block for the blocks still to train, asked
    before each block once this call has trained one (``blocks``: the record's, each with its
    ``steps``, ``wall_s`` in its steps and ``block_s`` in all); a timed run's deadline
    (``timed.block_deadline``). None: ``recipe.blockwise_steps`` for every block.
    """
    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    ids = calib[: recipe.blockwise_sequences].to(next(model.parameters()).device)
    mb = max(1, recipe.micro_batch)
    if record is not None and record.blocks:
        saved = torch.load(workdir / ACTIVATIONS, weights_only=True)
        x_fp, x_q = saved["x_fp"], saved.get("x_q")
        _, kwargs = block_inputs(model, ids[:1])
        start = len(record.blocks)
    else:
        x_fp, kwargs = block_inputs(model, ids, mb)  # block 0's inputs: no quantized layer runs yet
        x_q = x_fp.clone() if recipe.blockwise_inputs == "quantized" else None
        n_cached = 3 if x_q is not None else 2
        record = BlockwiseRecord(recipe.blockwise_inputs, recipe.blockwise_loss, recipe.blockwise_steps,
                                 recipe.blockwise_batch, int(ids.shape[0]), recipe.blockwise_lr,
                                 recipe.blockwise_steps * recipe.blockwise_batch * int(ids.shape[1]),
                                 round(n_cached * x_fp.numel() * 4 / 2**20, 1))
        start = 0
    if log:
        log(f"block-wise reconstruction: {len(layers)} blocks x {recipe.blockwise_steps} steps of "
            f"{recipe.blockwise_batch} x {ids.shape[1]} tokens, {record.activation_mib} MiB of cached activations")
    with StopOnInterrupt() as stop:
        block_recipe = recipe
        for i in range(start, len(layers)):
            t_block = time.perf_counter()
            if steps_for is not None and i > start:
                steps = steps_for(len(layers) - i, record.blocks)
                if steps != block_recipe.blockwise_steps:
                    block_recipe = dataclasses.replace(recipe, blockwise_steps=steps)
            block = layers[i]
            _set_fp(block, True)
            target = _run(fp_layers[i] if fp_layers is not None else block, x_fp, kwargs, mb)
            x_in = x_q if x_q is not None else x_fp
            set_t(block, math.inf)
            with torch.no_grad():
                before = float(reconstruction_loss(_run(block, x_in, kwargs, mb), target, recipe.blockwise_loss))
            last_kl = i == len(layers) - 1 and recipe.blockwise_last_loss == "kl"
            head_kl = head_kl_loss(model, recipe) if last_kl else None
            n_kl = min(KL_REPORT_SEQUENCES, x_in.shape[0])  # the report's sample: the head is costly
            if head_kl is not None:
                kl_before = _mean_loss(head_kl, block, x_in[:n_kl], target[:n_kl], kwargs, mb)
            res = train_block(block, x_in, target, kwargs, block_recipe, i, progress, head_kl)
            if head_kl is not None:
                res.update(head_kl_before=kl_before,
                           head_kl_after=_mean_loss(head_kl, block, x_in[:n_kl], target[:n_kl], kwargs, mb))
                if log:
                    log(f"block {i + 1}/{len(layers)}: KL to the FP logits {kl_before:.4f} -> "
                        f"{res['head_kl_after']:.4f}")
            if x_q is not None:
                x_q = _run(block, x_q, kwargs, mb)
            after = float(reconstruction_loss(x_q if x_q is not None else _run(block, x_fp, kwargs, mb), target,
                                              recipe.blockwise_loss))
            x_fp = target
            record.blocks.append({**res, "steps": block_recipe.blockwise_steps, "loss_hard_before": before,
                                  "loss_hard_after": after, "block_s": time.perf_counter() - t_block})
            if log:
                hard = "hard-ternary" if recipe.method == "ternary" else "hard-sign"
                log(f"block {i + 1}/{len(layers)}: {hard} loss {before:.4f} -> {after:.4f} "
                    f"({res['wall_s']:.1f} s)")
            if stop.requested:  # after the last block too: a resume then goes straight to QAT
                record.wall_s += time.perf_counter() - t0
                if write:
                    _save_activations(workdir, x_fp, x_q)
                if save and write:
                    save(record)
                raise Interrupted(f"interrupted after block {i + 1}/{len(layers)}; checkpoint written")
    set_t(model, math.inf)
    if write:
        (workdir / ACTIVATIONS).unlink(missing_ok=True)
    record.wall_s += time.perf_counter() - t0
    return record


def _save_activations(workdir: Path, x_fp: torch.Tensor, x_q: torch.Tensor | None) -> None:
    tmp = workdir / (ACTIVATIONS + ".tmp")
    torch.save({"x_fp": x_fp, **({"x_q": x_q} if x_q is not None else {})}, tmp)
    tmp.replace(workdir / ACTIVATIONS)
