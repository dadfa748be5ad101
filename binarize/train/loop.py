"""The QAT training loop, read top to bottom as nanoGPT's train.py: for each optimizer step, set
the step's sharpness t, quantization strength lambda and learning rate, run the step's sequences
through the model in micro-batches (next-token loss, plus the distillation KL when asked),
clip, step, record. All of the loop's state is one ``TrainState``.

A training change (a new loss term, another optimizer rule, a logging field) lives here; the
per-step schedules are in ``plan.py`` and the record's schema in ``record.py``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import save_checkpoint
from ..errors import BinarizeError
from ..qlinear import QuantLinear, quant_layers, set_t
from ..recipe import Recipe
from ..schedules import phase_lambda
from .data import RunData
from .losses import Distill, TrainLoss
from .plan import Budget, lr_at, step_t
from .sharding import full_model_state, full_optimizer_state, is_sharded, no_gradient_sync
from .record import RunRecord, StepRecord


class Interrupted(Exception):
    """Ctrl-C during a conversion. ``resumable``: a checkpoint was written and ``--resume``
    continues from it; otherwise nothing was kept and the same command starts afresh."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


@dataclass
class TrainState:
    """Everything the loop reads or changes. ``record`` is appended to once per step;
    ``workdir`` receives checkpoints; ``progress`` (a rich Progress) and ``log`` (a line
    printer) are optional; ``on_step(step)`` is a hook tests use to interrupt a run."""

    model: torch.nn.Module  # the TrainLoss the loop runs, as the accelerator prepared it (DDP-wrapped)
    optimizer: torch.optim.Optimizer
    accelerator: object
    recipe: Recipe
    budget: Budget
    data: RunData
    record: RunRecord
    workdir: Path
    progress: object = None
    log: Callable[[str], None] | None = None
    on_step: Callable[[int], None] | None = None
    session_start: float = field(default_factory=time.perf_counter)  # this session's start (perf_counter)


class NonFiniteLoss(Exception):
    """A step's loss (or KD term) came out NaN or infinite; raised before the optimizer step."""

    def __init__(self, step: int, value: float):
        super().__init__(step, value)
        self.step, self.value = step, value


def train_qat(s: TrainState, start_step: int = 0) -> None:
    """Steps ``start_step .. budget.steps - 1``; Ctrl-C checkpoints after the step in flight and
    raises Interrupted, ``recipe.save_every`` checkpoints periodically."""
    steps, recipe = s.budget.steps, s.recipe
    task = s.progress.add_task("QAT", total=steps, completed=start_step, done_before=start_step, info="") \
        if s.progress else None
    try:
        with StopOnInterrupt() as stop:
            for step in range(start_step, steps):
                if step == s.budget.switch and step > 0 and not recipe.retain_optimizer:
                    getattr(s.optimizer, "optimizer", s.optimizer).state.clear()  # fresh AdamW moments
                    if s.log:
                        s.log(f"switch to quantized training at step {step + 1}: fresh optimizer state")
                try:
                    r = train_step(s, step)
                except NonFiniteLoss as e:  # the model is still the last good step's: keep it for --resume
                    save(s, "qat", step)
                    raise BinarizeError(f"end-to-end QAT step {e.step + 1}/{steps}: the loss is {e.value} (not finite); "
                                        f"the model after step {step} is checkpointed in {s.workdir} (--resume continues from "
                                        "it); to start again with a lower lr: --set lr=... --overwrite") from None
                if s.progress:
                    lam = f" lam {r.lam:.2g}" if r.lam < 1 else ""  # 80 columns: chunk, lr, kd go to the log
                    s.progress.update(task, completed=step + 1, info=f"t {r.t:.3g}{lam} loss {r.loss:.4g} "
                                      f"{r.tokens_per_s:,.0f} tok/s")
                if s.log and log_now(step, steps):
                    kd = f"  kd {r.kd:.3f}" if r.kd is not None else ""
                    s.log(f"QAT step {step + 1}/{steps}  chunk {r.chunk + 1}/{recipe.chunks}  t {r.t:.3g}  "
                          f"lam {r.lam:.3g}  loss {r.loss:.3f}{kd}  lr {r.lr:.2e}  {r.tokens_per_s:,.0f} tok/s")
                if s.on_step:
                    s.on_step(step)
                if any_process(s.accelerator, stop.requested):
                    save(s, "qat", step + 1)
                    raise Interrupted(f"interrupted after step {step + 1}/{steps}; checkpoint written")
                if recipe.save_every and (step + 1) % recipe.save_every == 0 and step + 1 < steps:
                    save(s, "qat", step + 1)
    finally:
        if s.progress and task is not None:
            s.progress.remove_task(task)


def train_step(s: TrainState, step: int) -> StepRecord:
    """One optimizer step over this process's share of the step's sequences."""
    t0 = time.perf_counter()
    recipe, budget, acc = s.recipe, s.budget, s.accelerator
    chunk, t = step_t(step, budget.steps, recipe, budget.switch)
    lam = phase_lambda(step, budget.switch, recipe.phase_in, budget.phase_len, recipe.phase_in_steepness)
    set_t(s.model, t, lam)
    lr = lr_at(step, budget.steps, recipe)
    for g in s.optimizer.param_groups:
        g["lr"] = lr
    first = step * budget.seqs_per_step
    count = min(budget.seqs_per_step, budget.n_sequences - first)
    s.model.train()
    loss, kd = step_gradients(s, s.data.train.get(first, count))
    if not (math.isfinite(loss) and (kd is None or math.isfinite(kd))):  # before the optimizer touches anything
        s.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(step, loss if not math.isfinite(loss) else kd)
    if recipe.grad_clip > 0:
        acc.clip_grad_norm_([p for g in s.optimizer.param_groups for p in g["params"]], recipe.grad_clip)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    done_tokens = (first + count) * recipe.seq_len
    r = StepRecord(step, chunk, t, lam, lr, loss, kd, done_tokens, count * recipe.seq_len / dt, dt)
    s.record.steps.append(r)
    s.record.tokens.trained = done_tokens
    return r


def step_gradients(s: TrainState, batch: torch.Tensor) -> tuple[float, float | None]:
    """Gradients of one optimizer step over ``batch`` (count, seq_len), the step's sequences on all
    processes together; returns the global mean CE and KD (None without distillation).

    Process r takes sequences r, r + P, r + 2P, ... (P processes). Its loss is weighted by
    P x (its sequences) / count, so that DDP's gradient average over processes is the mean over the
    step's sequences however unevenly they split; a process with no sequence of its own (a last
    step shorter than P) runs one zero-weighted sequence, because every process must join each
    gradient all-reduce (FSDP: each all-gather and reduce-scatter). All micro-batches but the last
    run under ``no_sync`` (FSDP: ``set_requires_gradient_sync(False)``): one gradient reduction per
    step whatever each process's number of micro-batches.
    """
    acc, count = s.accelerator, batch.shape[0]
    world, rank = getattr(acc, "num_processes", 1), getattr(acc, "process_index", 0)
    if world == 1:
        return accumulate(s.model, batch, s.recipe.micro_batch, acc.backward)
    share = batch[rank::world]
    n = share.shape[0]
    mb = s.recipe.micro_batch
    if is_sharded(s.model):  # FSDP gathers and scatters in every pass: all processes run the same passes
        no_sync, passes = (lambda: no_gradient_sync(s.model)), math.ceil(math.ceil(count / world) / mb)
    else:
        no_sync, passes = (lambda: acc.no_sync(s.model)), None
    with acc.autocast():  # DDP's forward is autocast by accelerator.prepare; an FSDP model is not prepared
        ce, kd = accumulate(s.model, share if n else batch[:1], mb, acc.backward, weight=world * n / count,
                            no_sync=no_sync, passes=passes)
    sums = torch.tensor([ce * n, (kd or 0.0) * n], dtype=torch.float64, device=acc.device)
    sums = acc.reduce(sums, reduction="sum")
    return float(sums[0]) / count, (float(sums[1]) / count if kd is not None else None)


def accumulate(model, batch: torch.Tensor, micro_batch: int, backward, distill: Distill | None = None,
               weight: float = 1.0, no_sync: Callable[[], object] | None = None, passes: int | None = None):
    """Mean next-token loss over ``batch`` (n, seq_len) and the mean KD term (or None), gradients
    accumulated over micro-batches of ``micro_batch`` sequences as one batch, times ``weight``.

    ``model`` is a ``TrainLoss`` (possibly DDP / FSDP wrapped), or a causal LM that is then run
    with its full logits and ``distill``. ``no_sync()``, when given, is the context (DDP's) under
    which all micro-batches but the last run. ``passes``: run that many forward and backward passes
    (FSDP: the same number on every process), those beyond the batch's micro-batches on its first
    sequence with weight 0."""
    loss_fn = model if isinstance(getattr(model, "module", model), TrainLoss) else TrainLoss(model, distill)
    total = kd_total = 0.0
    n = batch.shape[0]
    kd = None
    starts = range(0, n, micro_batch)
    count = max(len(starts), passes or 0)
    for j in range(count):
        real = j < len(starts)
        x = (batch[starts[j] : starts[j] + micro_batch] if real else batch[:1]).to(batch_device(loss_fn))
        with no_sync() if no_sync is not None and j < count - 1 else contextlib.nullcontext():
            loss, ce, kd = loss_fn(x)
            backward(loss * (x.shape[0] / n * weight if real else 0.0))
        if real:
            total += float(ce.detach()) * x.shape[0]
            if kd is not None:
                kd_total += float(kd.detach()) * x.shape[0]
    return total / n, (kd_total / n if kd is not None else None)


def batch_device(model) -> torch.device:
    return next(model.parameters()).device


def trainable_groups(model, recipe: Recipe, latent: bool = True) -> list[dict]:
    """AdamW parameter groups: latent weights (with weight decay), scales and the chosen FP params
    (without). ``latent=False`` (end-to-end with recipe ``qat_latent: false``, EfficientQAT's
    E2E-QP, arXiv 2407.11062) freezes the latent weights: the first group is then empty."""
    for p in model.parameters():
        p.requires_grad_(False)
    decay, no_decay = [], []
    for q in quant_layers(model).values():
        if latent:
            decay.append(q.weight)
        if recipe.scaling != "analytic":
            no_decay.append(q.sl)
        if recipe.train_st:
            no_decay.append(q.st)
        if q.bias is not None:
            no_decay.append(q.bias)
    qparams = {id(p) for p in decay + no_decay}
    if recipe.train_fp != "none":
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                continue  # its scales train only as the recipe says (above)
            if recipe.train_fp == "all" or "norm" in type(mod).__name__.lower():
                no_decay.extend(p for p in mod.parameters(recurse=False) if id(p) not in qparams)
    seen, groups = set(), []
    for params, wd in ((decay, recipe.weight_decay), (no_decay, 0.0)):
        uniq = [p for p in params if id(p) not in seen and not seen.add(id(p))]
        for p in uniq:
            p.requires_grad_(True)
        groups.append({"params": uniq, "weight_decay": wd})
    return groups


def save(s: TrainState, phase: str, step: int) -> None:
    """A resumable checkpoint (main process only; the others wait for it): model, optimizer, RNG,
    recipe and record."""
    acc = s.accelerator
    unwrapped = acc.unwrap_model(s.model) if acc else s.model
    if isinstance(unwrapped, TrainLoss):
        unwrapped = unwrapped.model
    tensors = optimizer_state = None
    sharded = is_sharded(s.model)
    if sharded:  # gathering the full state is a collective: every process takes part
        tensors = full_model_state(s.model, unwrapped)
        if s.optimizer.state:  # (torch's getter would first take a zero step to create the moments)
            optimizer_state = full_optimizer_state(s.model, s.optimizer)
    if acc is None or acc.is_main_process:
        record = s.record.to_dict()
        record["wall_s"] = s.record.wall_s + time.perf_counter() - s.session_start  # earlier sessions + this one
        save_checkpoint(s.workdir, unwrapped, s.optimizer, {"phase": phase, "step": step, "fsdp": sharded,
                                                            "recipe": s.recipe.to_dict(), "record": record},
                        tensors, optimizer_state)
    if acc is not None and acc.num_processes > 1:
        acc.wait_for_everyone()


def any_process(acc, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a Ctrl-C seen by one rank stops all
    after the same step, so none waits forever in the next all-reduce)."""
    if acc is None or acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum") > 0)


def log_now(step: int, steps: int, lines: int = 25) -> bool:
    """About ``lines`` evenly spaced log lines per phase (plus the last step)."""
    return (step + 1) % max(1, steps // lines) == 0 or step + 1 == steps


class StopOnInterrupt:
    """Ctrl-C asks the loop to stop after the step in flight (a second Ctrl-C aborts)."""

    def __enter__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
