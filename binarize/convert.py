"""``binarize convert``: binary-aware initialization, then consistent progressive QAT.

The run lives in ``OUT.partial/`` (checkpoints, partial record) and becomes ``OUT/`` by a
rename once everything is written, so OUT is either absent or complete.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_model

from binarize.calibration.datasets import DATASETS, local_file
from binarize.calibration.streams import TokenBlocks, TrainStream, load_documents, tokenize_documents

from . import __version__
from .checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint_state, save_checkpoint, write_json
from .errors import BinarizeError
from .evaluate import mean_loss
from .models import (SCRATCH_CONFIGS, check_supported, load_config, load_model, max_positions, resolve_model,
                     scratch_model)
from .qlinear import LayerSpec, QuantLinear, quant_layers, quantize_, set_t, share_st_
from .recipe import Recipe, parse_mix
from .schedules import chunk_t, phase_lambda, resolve_steps

FORMAT_VERSION = 1
WEIGHT_FORMULAS = {
    "binary": "W_eff = Sl * Sa * sign(W~/Sa) * St (Sa = per-row mean|W~|; sign(0) = +1)",
    "ternary": "W_eff = Sl * gamma * RoundClip(W~/gamma, -1, 1) * St (gamma = mean or median |W~|, per tensor "
               "or per row: recipe ternary_scale, per_row)",
}
BAI_EVAL_SEQUENCES = 8


@dataclass
class ConvertJob:
    model: str | None  # the model to convert; with from_scratch, only its tokenizer is used
    tokens: int
    out: Path
    recipe: Recipe
    resume: bool = False
    overwrite: bool = False
    bai_only: bool = False
    progress: bool = True
    from_scratch: str | None = None  # a SCRATCH_CONFIGS name: train a new random model of that shape
    export: str | None = None  # packed format the caller will export to (checked before training)
    on_step: Callable[[int], None] | None = field(default=None, repr=False)  # test hook


@dataclass
class Budget:
    """How a token budget maps onto optimizer steps, and where the continual switch falls."""

    n_sequences: int
    steps: int
    seqs_per_step: int
    switch: int  # first quantized step
    phase_len: int  # linear/sigmoid phase-in length in steps


def plan_budget(recipe: Recipe, tokens: int) -> Budget:
    """Steps, switch and phase-in of a budget; an impossible combination is one error line."""
    L = recipe.seq_len
    n_seq = tokens // L
    if n_seq == 0:
        raise BinarizeError(f"token budget {tokens} is less than one sequence of {L} tokens")
    per_step = recipe.batch_tokens // L
    steps = math.ceil(n_seq / per_step)
    switch = resolve_steps(recipe.switch_at, steps)
    if switch >= steps:
        raise BinarizeError(f"switch_at {recipe.switch_at:g} is step {switch}, but the budget has only {steps} "
                            "optimizer steps: nothing would be trained quantized")
    if recipe.quantizer == "progressive" and steps - switch < recipe.chunks:
        after = f" after the switch at step {switch}" if switch else ""
        raise BinarizeError(
            f"{tokens} tokens make {steps - switch} optimizer steps{after}, fewer than the {recipe.chunks} chunks: "
            "raise --tokens or lower --batch-tokens / --chunks"
        )
    return Budget(n_seq, steps, per_step, switch, max(1, resolve_steps(recipe.phase_in_len, steps)))


def check_job(recipe: Recipe, tokens: int, from_scratch: str | None = None, export: str | None = None) -> Budget:
    """Every check that needs no model or data, so bad combinations fail before any work."""
    budget = plan_budget(recipe, tokens)
    if from_scratch is not None:
        if from_scratch not in SCRATCH_CONFIGS:
            raise BinarizeError(f"unknown --config {from_scratch!r} (known: {', '.join(SCRATCH_CONFIGS)})")
        if recipe.bai:
            raise BinarizeError("--from-scratch starts from random weights, so BaI has nothing to initialise: "
                                "use a recipe with bai: false (e.g. continual-16to158) or --set bai=false")
        if recipe.distill_alpha > 0:
            raise BinarizeError("distillation needs a pretrained teacher: it cannot be combined with --from-scratch")
    if export is not None and export != "none":
        from .packing import check_format, check_method_format

        check_format(export)
        check_method_format(recipe.method, export, f"recipe {recipe.name}")
    return budget


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was written and the run can be resumed."""


# ----------------------------------------------------------------------------- data


@dataclass
class RunData:
    train: TrainStream
    calib: torch.Tensor  # (n_calib, seq_len)
    n_sequences: int  # training sequences in the budget
    steps: int
    seqs_per_step: int
    info: dict
    switch: int = 0
    phase_len: int = 1


def resolve_auto(spec: str) -> str:
    """``auto``: PTB train when its local file exists (the offline default), else ``self``."""
    if spec != "auto":
        return spec
    return "ptb" if local_file(DATASETS["ptb"].splits["train"]) is not None else "self"


def _n_self_blocks(spec: str, n_tokens: int, L: int) -> int:
    """Blocks of self-generated text in ``n_tokens`` of a data spec (its fraction of them)."""
    real, frac = parse_mix(spec)
    if frac == 0:
        return 0
    return round(n_tokens * frac / L) if real else math.ceil(n_tokens / L)


def _self_tokens(spec: str, n_tokens: int, L: int) -> int:
    n = _n_self_blocks(spec, n_tokens, L)
    return 0 if n == 0 else n * L + L  # one spare block: documents end mid-block


def _blocks_from(spec: str, n_tokens: int, L: int, tokenizer, self_text) -> tuple[TokenBlocks, str]:
    """Blocks of L tokens for a data spec; ``self+SPEC:F`` mixes F self-generated tokens with SPEC."""
    real, frac = parse_mix(spec)
    parts, wheres = [], []
    n_self = _n_self_blocks(spec, n_tokens, L)
    if frac > 0:
        if self_text is None:
            raise BinarizeError("self-generated data needs the model (convert builds it)")
        docs, where = self_text.take(_self_tokens(spec, n_tokens, L))
        blocks = TokenBlocks.from_stream(tokenize_documents(tokenizer, docs), L)
        parts.append(blocks.blocks[:n_self])
        wheres.append(f"{where} ({parts[-1].shape[0]} blocks)")
    if real:
        n_real = math.ceil(n_tokens / L) - n_self if frac > 0 else None
        docs, where = load_documents(real, max_chars=n_tokens * 8)
        blocks = TokenBlocks.from_stream(tokenize_documents(tokenizer, docs), L)
        parts.append(blocks.blocks[:n_real] if n_real is not None else blocks.blocks)
        wheres.append(f"{where} ({parts[-1].shape[0]} blocks)" if frac > 0 else where)
    return TokenBlocks(torch.cat(parts)), " + ".join(wheres)


def prepare_data(tokenizer, recipe: Recipe, tokens: int, self_text: "SelfText | None" = None) -> RunData:
    """Training stream and calibration set; ``self_text`` supplies text for ``self`` specs."""
    L = recipe.seq_len
    budget = plan_budget(recipe, tokens)
    n_seq, per_step, steps = budget.n_sequences, budget.seqs_per_step, budget.steps
    data_spec, calib_spec = resolve_auto(recipe.data), resolve_auto(recipe.calib)
    n_calib = recipe.calib_sequences if recipe.bai else 0
    same = calib_spec == data_spec
    if self_text is not None:
        self_text.reserve(_self_tokens(data_spec, n_seq * L + (n_calib * L if same else 0), L))
        if not same:
            self_text.reserve(_self_tokens(calib_spec, n_calib * L, L))
    train_blocks, where = _blocks_from(data_spec, n_seq * L + (n_calib * L if same else 0), L, tokenizer, self_text)
    if same:
        # Same source: hold the tail out of training so calibration text is never trained on.
        if len(train_blocks) <= n_calib:
            raise BinarizeError(f"{where} has {len(train_blocks)} blocks of {L} tokens, too few to hold out "
                                f"{n_calib} for calibration and train on the rest")
        calib = train_blocks.blocks[len(train_blocks) - n_calib :]
        train_blocks = TokenBlocks(train_blocks.blocks[: len(train_blocks) - n_calib])
        calib_where = f"{where} (last {n_calib} blocks, held out of training)"
    else:
        cblocks, calib_where = _blocks_from(calib_spec, n_calib * L, L, tokenizer, self_text)
        if n_calib and len(cblocks) == 0:
            raise BinarizeError(f"calibration data {calib_where} is shorter than one sequence of {L} tokens")
        g = torch.Generator().manual_seed(recipe.seed + 17)
        calib = cblocks.blocks[torch.randperm(len(cblocks), generator=g)[:n_calib]]
    info = {
        "train_source": where, "calib_source": calib_where,
        "train_blocks_available": len(train_blocks), "calib_sequences": int(calib.shape[0]),
        "epochs_over_train_data": n_seq / len(train_blocks) if len(train_blocks) else None,
    }
    return RunData(TrainStream(train_blocks, recipe.seed), calib, n_seq, steps, per_step, info,
                   budget.switch, budget.phase_len)


class SelfText:
    """Self-generated documents for prepare_data: generated (or found in the cache) once for
    everything reserved, then handed out in order, so training and calibration never share text."""

    def __init__(self, model, tokenizer, src, recipe: Recipe, progress: bool = False, log=None):
        self.model, self.tokenizer, self.src, self.recipe = model, tokenizer, src, recipe
        self.progress, self.log = progress, log
        self.reserved, self.docs, self.cursor, self.path, self.meta = 0, None, 0, None, None

    def reserve(self, n_tokens: int) -> None:
        self.reserved += n_tokens

    def take(self, n_tokens: int) -> tuple[list[str], str]:
        import gzip
        import json

        from binarize.calibration.selfgen import SelfGenConfig, cached_self_data

        if self.docs is None:
            r = self.recipe
            cfg = SelfGenConfig(tokens=max(self.reserved, n_tokens), seq_len=r.seq_len, batch_size=r.self_batch,
                                temperature=r.self_temperature, top_p=r.self_top_p,
                                greedy_prefix=r.self_greedy_prefix, seed=r.seed)
            self.path, self.meta = cached_self_data(self.model, self.tokenizer, self.src, cfg, self.progress, self.log)
            with gzip.open(self.path, "rt", encoding="utf-8") as f:
                self.docs = [json.loads(line) for line in f]
        out, got, first = [], 0, self.cursor
        while got < n_tokens and self.cursor < len(self.docs):
            rec = self.docs[self.cursor]
            out.append(rec["text"])
            got += len(rec["ids"]) + 1  # + the EOS the loader puts between documents
            self.cursor += 1
        return out, f"self-generated {self.path} [docs {first}:{self.cursor}]"


# ----------------------------------------------------------------------------- BaI


def binary_aware_init(model, calib: torch.Tensor, recipe: Recipe, progress=None, log=None) -> dict:
    """Search per-input-channel St by next-token loss under hard-sign weights, weights frozen."""
    layers = quant_layers(model)
    set_t(model, math.inf)
    for p in model.parameters():
        p.requires_grad_(False)
    st = list({id(q.st): q.st for q in layers.values()}.values())  # tied St (share_st) once
    for p in st:
        p.requires_grad_(True)
    eval_set = calib[:BAI_EVAL_SEQUENCES]
    before = mean_loss(model, eval_set, recipe.micro_batch)
    opt = torch.optim.Adam(st, lr=recipe.bai_lr)
    per_step = max(1, recipe.bai_batch_tokens // recipe.seq_len)
    losses = []
    task = progress.add_task("BaI", total=recipe.bai_steps, info="") if progress else None
    model.train()
    for step in range(recipe.bai_steps):
        idx = [(step * per_step + i) % calib.shape[0] for i in range(per_step)]
        loss, _ = _accumulate(model, calib[idx], recipe.micro_batch, lambda l: l.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        if progress:
            progress.update(task, advance=1, info=f"loss {loss:.3f}")
        if log and _log_now(step, recipe.bai_steps):
            log(f"BaI step {step + 1}/{recipe.bai_steps}  loss {loss:.3f}")
    model.eval()
    after = mean_loss(model, eval_set, recipe.micro_batch)
    if log:
        log(f"BaI loss on {eval_set.shape[0]} calibration sequences: {before:.3f} -> {after:.3f}")
    for q in layers.values():
        q.st.requires_grad_(False)
        q.fold_st()
    if progress:
        progress.remove_task(task)
    return {"loss_before": before, "loss_after": after, "losses": losses, "steps": recipe.bai_steps,
            "lr": recipe.bai_lr, "eval_sequences": int(eval_set.shape[0]),
            "tokens": recipe.bai_steps * per_step * recipe.seq_len}


def _log_now(step: int, steps: int, lines: int = 25) -> bool:
    """About ``lines`` evenly spaced log lines per phase (plus the last step)."""
    return (step + 1) % max(1, steps // lines) == 0 or step + 1 == steps


@dataclass
class Distill:
    """Knowledge distillation from the frozen original: loss = CE + alpha * tau^2 * KL(p_T || p_S).

    KL is taken per position over the full vocabulary at temperature tau (Hinton et al.; the
    tau^2 keeps its gradient scale independent of tau) and averaged over positions like CE.
    Memory cost: a second full-precision copy of the model plus the teacher's logits and two
    log-softmaxes per micro-batch (3 x micro_batch x seq_len x vocab floats).
    """

    teacher: torch.nn.Module
    alpha: float
    temperature: float

    def kl(self, x: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        tau = self.temperature
        with torch.no_grad():
            t_logp = torch.log_softmax(self.teacher(input_ids=x).logits.float() / tau, dim=-1)
        s_logp = torch.log_softmax(student_logits.float() / tau, dim=-1)
        kl = torch.nn.functional.kl_div(s_logp.flatten(0, -2), t_logp.flatten(0, -2), log_target=True,
                                        reduction="batchmean")
        return kl * tau * tau


def _accumulate(model, batch: torch.Tensor, micro_batch: int, backward, distill: Distill | None = None):
    """Mean next-token loss over ``batch`` (and the mean KD term, or None), gradients
    accumulated over micro-batches as one batch."""
    device = next(model.parameters()).device
    total = kd_total = 0.0
    for i in range(0, batch.shape[0], micro_batch):
        x = batch[i : i + micro_batch].to(device)
        out = model(input_ids=x, labels=x)
        ce = loss = out.loss
        if distill is not None:
            kd = distill.kl(x, out.logits)
            kd_total += float(kd.detach()) * x.shape[0]
            loss = ce + distill.alpha * kd
        del out
        backward(loss * (x.shape[0] / batch.shape[0]))
        total += float(ce.detach()) * x.shape[0]
    n = batch.shape[0]
    return total / n, (kd_total / n if distill is not None else None)


# ----------------------------------------------------------------------------- QAT


def trainable_groups(model, recipe: Recipe) -> list[dict]:
    """Latent weights (with weight decay), scales and the chosen FP params (without)."""
    for p in model.parameters():
        p.requires_grad_(False)
    decay, no_decay = [], []
    for q in quant_layers(model).values():
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


def lr_at(step: int, steps: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine from lr down to min_lr at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, steps - recipe.warmup_steps - 1)
    p = min(1.0, (step - recipe.warmup_steps) / span)
    return recipe.min_lr + (recipe.lr - recipe.min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def step_t(step: int, steps: int, recipe: Recipe, switch: int = 0) -> tuple[int, float]:
    """(chunk, t) for a step; the straight-through recipe is hard throughout. The progressive
    schedule's chunks span the quantized steps (from the switch on); before it chunk is -1."""
    if step < switch:
        return -1, math.inf
    chunk = (step - switch) * recipe.chunks // (steps - switch)
    if recipe.quantizer == "ste":
        return chunk, math.inf
    return chunk, chunk_t(recipe.scheduler, chunk, recipe.chunks, recipe.schedule_span)


def train_qat(model, data: RunData, recipe: Recipe, workdir: Path, record: dict, *, start_step: int,
              optimizer, accelerator, progress=None, on_step=None, log=None, distill: Distill | None = None) -> None:
    steps = data.steps
    rank, world = accelerator.process_index, accelerator.num_processes
    task = progress.add_task("QAT", total=steps, completed=start_step, info="") if progress else None
    try:
        with _StopOnInterrupt() as stop:
            for step in range(start_step, steps):
                if step == data.switch and step > 0 and not recipe.retain_optimizer:
                    getattr(optimizer, "optimizer", optimizer).state.clear()  # fresh AdamW moments
                    if log:
                        log(f"switch to quantized training at step {step + 1}: fresh optimizer state")
                _train_step(model, data, recipe, record, optimizer, accelerator, step, rank, world, progress, task,
                            distill)
                if log and _log_now(step, steps):
                    r = record["steps"][-1]
                    t = r["t"] if isinstance(r["t"], str) else f"{r['t']:.3g}"
                    kd = f"  kd {r['kd']:.3f}" if r.get("kd") is not None else ""
                    log(f"QAT step {step + 1}/{steps}  chunk {r['chunk'] + 1}/{recipe.chunks}  t {t}  "
                        f"lam {r['lambda']:.3g}  loss {r['loss']:.3f}{kd}  lr {r['lr']:.2e}  "
                        f"{r['tokens_per_s']:,.0f} tok/s")
                if on_step:
                    on_step(step)
                if stop.requested:
                    _save(workdir, model, optimizer, accelerator, record, recipe, "qat", step + 1)
                    raise Interrupted(f"interrupted after step {step + 1}/{steps}; checkpoint written")
                if recipe.save_every and (step + 1) % recipe.save_every == 0 and step + 1 < steps:
                    _save(workdir, model, optimizer, accelerator, record, recipe, "qat", step + 1)
    finally:
        if progress and task is not None:
            progress.remove_task(task)


def _train_step(model, data, recipe, record, optimizer, accelerator, step, rank, world, progress, task,
                distill=None):
    t0 = time.perf_counter()
    L = recipe.seq_len
    chunk, t = step_t(step, data.steps, recipe, data.switch)
    lam = phase_lambda(step, data.switch, recipe.phase_in, data.phase_len, recipe.phase_in_steepness)
    set_t(model, t, lam)
    lr = lr_at(step, data.steps, recipe)
    for g in optimizer.param_groups:
        g["lr"] = lr
    first = step * data.seqs_per_step
    count = min(data.seqs_per_step, data.n_sequences - first)
    batch = data.train.get(first, count)[rank::world]
    model.train()
    loss, kd = _accumulate(model, batch, recipe.micro_batch, accelerator.backward, distill)
    if recipe.grad_clip > 0:
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], recipe.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    done_tokens = (first + count) * L
    record["steps"].append({
        "step": step, "chunk": chunk, "t": t if math.isfinite(t) else "inf", "lambda": lam, "lr": lr, "loss": loss,
        "kd": kd, "tokens": done_tokens, "tokens_per_s": count * L / dt, "wall_s": dt,
    })
    record["tokens"]["trained"] = done_tokens
    if progress:
        progress.update(task, completed=step + 1,
                        info=f"chunk {chunk + 1}/{recipe.chunks}  t {t:.3g}  lam {lam:.2g}  loss {loss:.3f}  "
                             f"{count * L / dt:,.0f} tok/s")


class _StopOnInterrupt:
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


def _save(workdir, model, optimizer, accelerator, record, recipe, phase, step):
    if accelerator is None or accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model) if accelerator else model
        save_checkpoint(workdir, unwrapped, optimizer,
                        {"phase": phase, "step": step, "recipe": recipe.to_dict(), "record": record})


# ----------------------------------------------------------------------------- outputs


def save_converted(model, tokenizer, recipe: Recipe, record: dict, workdir: Path, layer_names: list[str]) -> None:
    """Latent weights + St, Sa, Sl (safetensors), HF config, tokenizer, binarize.json."""
    from .quantizers import analytic_scale

    set_t(model, math.inf)
    save_model(model, str(workdir / "model.safetensors"))
    if recipe.method == "binary":
        from safetensors.torch import save_file

        extra = {f"{name}.sa": analytic_scale(q.weight.detach().float()).view(-1).contiguous()
                 for name, q in quant_layers(model).items()}
        save_file(extra, str(workdir / "scales_sa.safetensors"))
    model.config.save_pretrained(workdir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    write_json(workdir / "binarize.json", {
        "format": "binarize-latent", "format_version": FORMAT_VERSION, "binarize_version": __version__,
        "method": recipe.method, "quantized_layers": layer_names,
        "weight_formula": WEIGHT_FORMULAS[recipe.method], "act_bits": recipe.act_bits,
        "scaling": recipe.scaling, "recipe": recipe.to_dict(),
    })
    write_json(workdir / "run.json", record)
    plot_loss(record, workdir / "loss.png")


def plot_loss(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = record["steps"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if steps:
        tok = [s["tokens"] for s in steps]
        ax.plot(tok, [s["loss"] for s in steps], label="QAT loss", color="tab:blue")
        ax2 = ax.twinx()
        ax2.step(tok, [float(s["t"]) if s["t"] != "inf" else float("nan") for s in steps], where="post",
                 color="tab:orange", alpha=0.6, label="t")
        ax2.set_ylabel("t (progressive sharpness)")
    bai = record.get("bai")
    if bai:
        ax.axhline(bai["loss_before"], ls=":", color="gray", label=f"before BaI {bai['loss_before']:.2f}")
        ax.axhline(bai["loss_after"], ls="--", color="gray", label=f"after BaI {bai['loss_after']:.2f}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("next-token loss")
    ax.set_title(f"binarize convert: {record['recipe']['name']}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver


def peak_memory_mib() -> dict:
    """Peak resident memory of this process (and peak CUDA allocation), for the run record."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    out = {"cpu_rss": round(rss, 1)}
    if torch.cuda.is_available():
        out["cuda_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _plain_log(msg: str) -> None:
    """--no-progress: timestamped lines for log files instead of a live bar."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _check_out(job: ConvertJob, work: Path) -> None:
    out = job.out
    if job.resume:
        if out.exists() and any(out.iterdir()) and not work.exists():
            raise BinarizeError(f"{out} is a finished run; nothing to resume")
        if not (work / CHECKPOINT / "state.json").exists():
            raise BinarizeError(f"nothing to resume: no checkpoint in {work}")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not job.overwrite:
        raise BinarizeError(f"output {out} exists and is not empty (use --overwrite, or --resume)")
    if work.exists() and not job.overwrite:
        raise BinarizeError(f"an interrupted run is in {work} (use --resume to continue it, or --overwrite)")


def convert(job: ConvertJob) -> Path:
    from accelerate import Accelerator
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    work = job.out.with_name(job.out.name + ".partial")
    _check_out(job, work)
    state = read_checkpoint_state(work) if job.resume else None
    recipe = Recipe(**state["recipe"]).validate() if state else job.recipe
    tokens = state["record"]["tokens"]["requested"] if state else job.tokens

    from_scratch = state["record"].get("from_scratch") if state else job.from_scratch
    if from_scratch and recipe.train_fp != "all":
        recipe = dataclasses.replace(recipe, train_fp="all")  # random embeddings, norms and head must learn too
    if not from_scratch:  # a missing model or unsupported architecture is reported first
        check_supported(load_config(resolve_model(job.model)))
    check_job(recipe, tokens, from_scratch, None if state else job.export)
    if from_scratch:
        model, tokenizer, src = scratch_model(job.model, from_scratch, recipe.seed)
    else:
        model, tokenizer, src = load_model(job.model)
    limit = max_positions(model.config)
    if limit and recipe.seq_len > limit:
        raise BinarizeError(f"seq_len {recipe.seq_len} exceeds the model's maximum of {limit} positions")
    if torch.cuda.is_available():
        model.to("cuda")  # self-generation, if any, runs where training will
    self_text = SelfText(model, tokenizer, src, recipe, job.progress, None if job.progress else _plain_log)
    data = prepare_data(tokenizer, recipe, tokens, self_text)
    if self_text.meta is not None:
        data.info["self_generation"] = {"file": str(self_text.path), **self_text.meta}

    if not job.resume:
        for d in (job.out, work):
            if d.exists():
                shutil.rmtree(d) if d.is_dir() else d.unlink()
        work.mkdir(parents=True)
    torch.manual_seed(recipe.seed)
    distill = None
    if recipe.distill_alpha > 0:
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
        distill = Distill(teacher, recipe.distill_alpha, recipe.distill_temperature)
    names = quantize_(model, LayerSpec.from_recipe(recipe))
    if recipe.share_st:
        share_st_(model)
    record = state["record"] if state else {
        "binarize_version": __version__, "model": src.spec, "from_scratch": from_scratch, "recipe": recipe.to_dict(),
        "quantized_layers": len(names), "data": data.info, "steps": [], "bai": None,
        "tokens": {"requested": tokens, "seq_len": recipe.seq_len, "sequences": data.n_sequences,
                   "budget_used": data.n_sequences * recipe.seq_len, "dropped_remainder": tokens % recipe.seq_len,
                   "per_step": data.seqs_per_step * recipe.seq_len, "optimizer_steps": data.steps, "trained": 0},
        "wall_s": 0.0,
    }
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if torch.cuda.is_available() else "no")
    model.to(accelerator.device)
    if distill is not None:
        distill.teacher.to(accelerator.device)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    t_start = time.perf_counter()
    log = None if job.progress or not accelerator.is_main_process else _plain_log
    with Progress(*columns, disable=not job.progress or not accelerator.is_main_process, transient=False) as progress:
        if state is None or state["phase"] == "bai":
            if recipe.bai:
                record["bai"] = binary_aware_init(model, data.calib.to(accelerator.device), recipe, progress, log)
            else:
                for q in quant_layers(model).values():
                    q.fold_st()
        else:
            for q in quant_layers(model).values():
                q.folded = True
        if recipe.scaling == "learnable":
            for q in quant_layers(model).values():
                q.use_learnable_scale()
        start_step = 0
        if not job.bai_only:
            optimizer = torch.optim.AdamW(trainable_groups(model, recipe), lr=recipe.lr, betas=tuple(recipe.betas))
            if state is not None and state["phase"] == "qat":
                load_checkpoint(work, model, optimizer)
                start_step = state["step"]
                del record["steps"][start_step:]
            model, optimizer = accelerator.prepare(model, optimizer)
            if state is None:
                _save(work, model, optimizer, accelerator, record, recipe, "qat", 0)
            train_qat(model, data, recipe, work, record, start_step=start_step, optimizer=optimizer,
                      accelerator=accelerator, progress=progress, on_step=job.on_step, log=log, distill=distill)
            model = accelerator.unwrap_model(model)
    record["wall_s"] += time.perf_counter() - t_start
    record["peak_memory_mib"] = peak_memory_mib()
    if accelerator.is_main_process:
        save_converted(model.float().cpu(), tokenizer, recipe, record, work, names)
        shutil.rmtree(work / CHECKPOINT, ignore_errors=True)
        work.rename(job.out)
    return job.out
