"""``convert(job)``: one conversion from a model and a recipe to a finished run directory (and, as
``binarize convert`` does, its export), in the order the work happens:

check the job (``plan.py``, ``preflight.py``) -> load the model -> data -> ``qlinear.prepare`` -> BaI
(``bai.py``) -> Hessian-aware initialisation (``hessian_init.py``) -> block-wise (``blockwise.py``) -> QAT
(``loop.py``; none at ``--tokens 0``) -> save the run (``formats/latent.py`` + ``record.py``) -> export (``formats``).

The run lives in ``OUT.partial/`` (checkpoints, partial record) and becomes ``OUT/`` by a rename
once everything is written, so OUT is either absent or complete. ``job.resume`` continues from
the checkpoint in ``OUT.partial/`` with the same data position, optimizer, schedule and RNG.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .._version import __version__
from ..checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from ..errors import BinarizeError
from ..experts import has_moe_experts
from ..formats.latent import save_converted
from ..formats.registry import Exported
from ..models import (check_supported, decoder_layers, load_config, load_model, max_positions,
                      resolve_model, scratch_model)
from ..qlinear import finish_init, prepare
from ..recipe import Recipe
from .blockwise import blockwise_reconstruct
from .hessian_init import check_calibration
from .init_stages import initialise
from .identity import check_resume, model_fingerprint, read_identity, tokens_sha256, write_identity
from .data import SelfText, prepare_data, resolve_auto
from .init_state import check_init, init_key, load_init, read_init, save_init
from .loop import Interrupted, StopOnInterrupt, TrainState, save, train_qat, trainable_groups
from .sharding import (fsdp_options, fsdp_requested, full_model_state, load_optimizer_state, shard,
                       unsharded_model)
from .liger_loss import resolve_backend
from .preflight import check_launch, check_model_options, check_teacher_fits
from .losses import Distill, TrainLoss
from .plan import check_job, fit_recipe, stage_summary
from .timed import block_deadline, plan_for_time, revise_blockwise, revise_for_time
from .timeplan import QAT_FLOOR_STEPS
from .record import BaiRecord, BlockwiseRecord, RunRecord, TokenRecord, plot_loss
from .resume_state import check_out, interrupted, read_checkpoint_state

__all__ = ["ConvertJob", "ConvertResult", "Interrupted", "check_launch", "check_model_options", "convert"]


@dataclass
class ConvertJob:
    """What ``binarize convert`` was asked: the model (hub id, directory, .gguf or None for the
    default; with ``from_scratch`` only its tokenizer is used), the token budget, the output
    directory and the recipe. ``export`` is a format name of ``binarize.formats`` written to
    ``OUT/packed`` at the end (None or "none": no export); it is checked before any work."""

    model: str | None
    tokens: int | None
    out: Path
    recipe: Recipe
    resume: bool = False
    overwrite: bool = False
    bai_only: bool = False
    progress: bool = True
    from_scratch: str | None = None  # a SCRATCH_CONFIGS name: train a new random model of that shape
    export: str | None = None
    save_init: bool = False  # keep the state entering end-to-end QAT in OUT/init/ (train/init_state.py)
    init_from: Path | None = None  # start from RUN/init/ instead of running BaI and block-wise
    fsdp: bool = False  # shard end-to-end QAT over the processes (also: an accelerate FSDP launch)
    time_s: float | None = None  # --time: plan the stages for this many seconds (train/timed.py); tokens fixed
    # beside it (``tokens`` >= 0) or planned (``tokens`` None)
    fixed: frozenset[str] = frozenset()  # recipe keys the command line set: a --time plan leaves them as they are
    on_step: Callable[[int], None] | None = field(default=None, repr=False)  # test hook


@dataclass
class ConvertResult:
    """The finished run directory, its record and, when exported, the export's path and summary."""

    path: Path
    record: RunRecord
    exported: Exported | None = None
    main: bool = True  # False on every process but the main one of a multi-process run


def convert(job: ConvertJob) -> Path:
    """Run the job; returns the run directory (see ``convert_run`` for the record and export)."""
    return convert_run(job).path


def convert_run(job: ConvertJob) -> ConvertResult:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    t_job = time.perf_counter()
    work = job.out.with_name(job.out.name + ".partial")
    check_out(job.out, work, job.resume, job.overwrite)
    check_launch()
    fsdp = fsdp_requested(job.fsdp)
    fsdp_opts = fsdp_options() if fsdp else {}
    state = read_checkpoint_state(work) if job.resume else None
    # the run's identity (identity.py): checked against OUT.partial's on --resume as each part is known
    saved_identity = read_identity(work) if state else None
    identity = {"tokens": job.tokens, "from_scratch": job.from_scratch, "recipe": job.recipe.to_dict()}
    if job.time_s is not None:
        identity["time_s"] = job.time_s
    check_resume(work, saved_identity, identity)
    init = None
    if job.init_from is not None and not state:  # a resumed run started from it already
        if job.from_scratch or job.bai_only:
            raise BinarizeError("--init-from starts end-to-end QAT from a saved initialisation; "
                                f"it does not go with {'--from-scratch' if job.from_scratch else '--bai-only'}")
        init = read_init(job.init_from)
    recipe = Recipe(**state["recipe"]).validate() if state else job.recipe
    tokens = state["record"]["tokens"]["requested"] if state else job.tokens
    export = job.export if job.export not in (None, "none") else None
    timed = job.time_s is not None and not state  # a resumed run keeps the plan it recorded
    if timed and (job.from_scratch or job.bai_only or job.init_from is not None):
        raise BinarizeError("--time plans a whole conversion of a pretrained model; "
                            f"{'--from-scratch' if job.from_scratch else '--bai-only' if job.bai_only else '--init-from'}"
                            " takes --tokens instead")

    from_scratch = state["record"].get("from_scratch") if state else job.from_scratch
    if from_scratch and recipe.train_fp != "all":
        recipe = dataclasses.replace(recipe, train_fp="all")  # random embeddings, norms and head must learn too
    if not from_scratch:  # a missing model or unsupported architecture is reported first
        check_supported(load_config(resolve_model(job.model)))
    notice = None
    if timed:  # every check that needs no model, on a nominal budget; the plan comes once it is loaded
        nominal = tokens if tokens is not None else QAT_FLOOR_STEPS * recipe.batch_tokens
        check_job(fit_recipe(recipe, nominal, resolve_auto(recipe.data), fsdp_opts)[0], nominal, from_scratch, export)
    elif not state:  # a resumed run's recipe was fitted when it started
        recipe, notice = fit_recipe(recipe, tokens, resolve_auto(recipe.data), fsdp_opts)
    budget = None if timed else check_job(recipe, tokens, from_scratch, None if state else export)
    if export and not state:
        from ..formats import check_recipe

        check_recipe(recipe, export)
    if from_scratch:
        model, tokenizer, src = scratch_model(job.model, from_scratch, recipe.seed)
    else:
        model, tokenizer, src = load_model(job.model)
    identity.update(model=src.spec, model_sha256=model_fingerprint(src))
    check_resume(work, saved_identity, identity)
    limit = max_positions(model.config)
    if limit and recipe.seq_len > limit:
        raise BinarizeError(f"seq_len {recipe.seq_len} exceeds the model's maximum of {limit} positions")
    if recipe.distill_alpha > 0:
        check_teacher_fits(model)
    check_model_options(model, recipe, export)
    if fsdp and has_moe_experts(model):
        raise BinarizeError("FSDP with mixture-of-experts layers is not supported (a process whose tokens skip an "
                            "expert leaves it without a gradient): launch without --fsdp (DDP)")
    # MoE: a step in which no token routes to some expert leaves that expert without a gradient
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if has_moe_experts(model) else None
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if torch.cuda.is_available() else "no", kwargs_handlers=ddp)
    main = accelerator.is_main_process
    plan = None
    if timed:  # measured where training runs, before anything is written
        if accelerator.num_processes > 1:  # each process would measure, and plan, on its own
            raise BinarizeError("--time plans a conversion in one process; under several processes give --tokens")
        model.to(accelerator.device)
        recipe, tokens, plan = plan_for_time(job.time_s, recipe, model, tokenizer, src, tokens=tokens,
                                             spent_s=time.perf_counter() - t_job, log=plain_log if main else None,
                                             fixed=job.fixed)
        recipe, notice = fit_recipe(recipe, tokens, resolve_auto(recipe.data), fsdp_opts)
        budget = check_job(recipe, tokens, from_scratch, export)
        if export:  # the plan may have chosen another recipe (the PTQ path)
            from ..formats import check_recipe

            check_recipe(recipe, export)
    sharded = fsdp and accelerator.num_processes > 1
    if state and bool(state.get("fsdp")) != sharded:
        raise BinarizeError(f"{work} was checkpointed by {'an FSDP' if state.get('fsdp') else 'an unsharded'} run: "
                            f"resume it {'with --fsdp under several processes' if state.get('fsdp') else 'without --fsdp'}")
    if main:
        procs = f", {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
        procs += " (FSDP)" if sharded else (" (--fsdp: one process, nothing to shard)" if fsdp else "")
        print(f"{src.spec} on {accelerator.device}{procs}", flush=True)
        for line in stage_summary(recipe, budget, len(decoder_layers(model)), job.bai_only, timed=plan is not None):
            print("  " + line, flush=True)
        for line in plan.lines() if plan else []:
            print("  " + line, flush=True)
        if notice:
            print(f"  note: {notice}", flush=True)
    model.to(accelerator.device)  # self-generation, if any, runs where training will
    log = None if job.progress or not main else plain_log  # --no-progress: timestamped lines instead of bars
    planned_path = plan.path if plan else ((state["record"].get("plan") or {}).get("path") if state else None)
    self_text = SelfText(model, tokenizer, src, recipe, job.progress and main, log,
                         whole=planned_path == "full")  # a timed run's re-plan may use all of it (also resumed)
    t_data = time.perf_counter()
    with accelerator.main_process_first():  # self-generated text is written once, then read by the others
        data = prepare_data(tokenizer, recipe, budget, self_text)
    data.info["prepare_s"] = round(time.perf_counter() - t_data, 1)  # reading (and generating) the text
    if self_text.meta is not None:
        data.info["self_generation"] = {"file": str(self_text.path), **self_text.meta,
                                        **{f"{k}_read": v for k, v in self_text.read.items()}}
    if timed and plan.path == "full":  # the text is ready: the block-wise steps for the time actually left
        recipe = revise_blockwise(plan, recipe, time.perf_counter() - t_job, (log or print) if main else None)
    identity.update(calib_sha256=tokens_sha256(data.calib), calib_source=data.info["calib_source"],
                    train_sha256=tokens_sha256(data.train.blocks.blocks), train_source=data.info["train_source"])
    check_resume(work, saved_identity, identity)
    key = (init_key(recipe, src.spec, data.calib, identity["model_sha256"]) if (init is not None or job.save_init)
           else None)
    if init is not None:
        check_init(job.init_from, init, key)
    elif recipe.init == "hessian" and not state:  # before anything is written
        check_calibration([m.in_features for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]
                          + [getattr(model.config, "intermediate_size", 0) or 0], data.calib)

    if not job.resume and main:
        for d in (job.out, work):
            if d.exists():
                shutil.rmtree(d) if d.is_dir() else d.unlink()
        work.mkdir(parents=True)
        write_identity(work, identity)
    accelerator.wait_for_everyone()
    torch.manual_seed(recipe.seed)
    distill = None
    if recipe.distill_alpha > 0:
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
        distill = Distill.from_recipe(teacher, recipe)
    fp_layers = None  # the Hessian stage writes its codes into the latent weights: block-wise targets need the original
    if recipe.init == "hessian" and recipe.blockwise_steps and not job.bai_only:
        fp_layers = (decoder_layers(distill.teacher) if distill is not None
                     else copy.deepcopy(decoder_layers(model)).requires_grad_(False).eval())
    names = prepare(model, recipe)
    record = RunRecord.from_dict(state["record"]) if state else RunRecord(
        binarize_version=__version__, model=src.spec, from_scratch=from_scratch, recipe=recipe.to_dict(),
        quantized_layers=len(names), data=data.info,
        tokens=TokenRecord.of(tokens, budget), plan=plan.to_dict() if plan else None)
    record.processes, record.fsdp = accelerator.num_processes, sharded
    if distill is not None:
        distill.teacher.to(accelerator.device)
    if init is not None:
        record.init_from = {"run": str(job.init_from), "wall_s": init["wall_s"]}
        record.bai = BaiRecord(**init["bai"]) if init.get("bai") else None
        record.blockwise = BlockwiseRecord(**init["blockwise"]) if init.get("blockwise") else None
        record.hessian = init.get("hessian")
        state = {"phase": "qat", "step": 0, "init": True}  # straight to end-to-end QAT
    t_start = time.perf_counter()
    try:
        with _progress(job.progress and main) as progress:
            if state is None or state["phase"] == "bai":
                record.bai, record.hessian = initialise(model, data.calib.to(accelerator.device), recipe, progress,
                                                        log, main)
            else:
                finish_init(model, recipe, from_file=True)
                if state.get("init"):
                    load_init(job.init_from, model)  # restores the RNG too: nothing random may come before QAT
            if recipe.blockwise_steps and not job.bai_only and (state is None or state["phase"] == "blockwise"):
                if state is not None:
                    load_checkpoint(work, model, None)

                def save_blockwise(rec):
                    record.blockwise = rec
                    if main:
                        saved = {**record.to_dict(), "wall_s": record.wall_s + time.perf_counter() - t_start}
                        save_checkpoint(work, model, None, {"phase": "blockwise", "step": len(rec.blocks),
                                                            "recipe": recipe.to_dict(), "record": saved})

                deadline = (block_deadline(plan, t_job, (log or print) if main else None)
                            if timed and plan.path == "full" else None)  # the steps follow the stage's own speed
                record.blockwise = blockwise_reconstruct(model, data.calib, recipe, work, record.blockwise, progress, log,
                                                         save_blockwise, write=main, fp_layers=fp_layers,
                                                         steps_for=deadline)
                if deadline is not None:
                    record.plan = plan.to_dict()
            if job.save_init and main and not job.bai_only and (state is None or state["phase"] != "qat"):
                saved = record.to_dict()
                save_init(work, model, key, {"bai": saved["bai"], "blockwise": saved.get("blockwise"),
                                             "hessian": saved.get("hessian")},
                          record.wall_s + time.perf_counter() - t_start)
            if timed and plan.path == "full" and not job.bai_only:  # the last stage takes up the estimates' error
                recipe, tokens, revised, line = revise_for_time(plan, recipe, tokens, chunks=job.recipe.chunks,
                                                                elapsed_s=time.perf_counter() - t_job,
                                                                train_blocks=len(data.train.blocks))
                if revised is not None:
                    budget = revised
                    record.recipe, record.plan = recipe.to_dict(), plan.to_dict()
                    record.tokens = TokenRecord.of(tokens, budget)
                    data.info["epochs_over_train_data"] = budget.n_sequences / len(data.train.blocks)
                    if main:
                        (log or print)(line)
            if not job.bai_only and tokens > 0:  # --tokens 0: the initialisation alone (PTQ)
                # FSDP: the optimizer is built on the shards below
                groups = trainable_groups(model, recipe, recipe.qat_latent)
                optimizer = None if sharded else torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas))
                start_step, saved_optimizer = 0, None
                if state is not None and state["phase"] == "qat" and not state.get("init"):
                    saved_optimizer = load_checkpoint(work, model, optimizer)
                    start_step = state["step"]
                    del record.steps[start_step:]
                if recipe.grad_checkpointing:
                    set_grad_checkpointing(model, True)
                record.loss_backend = resolve_backend(recipe, model)
                loss_fn = TrainLoss(model, distill, recipe.loss_chunk, record.loss_backend)
                if sharded:
                    shard(loss_fn, decoder_layers(model), fsdp_opts["reshard_after_forward"])
                    optimizer = torch.optim.AdamW(trainable_groups(model, recipe, recipe.qat_latent), lr=recipe.lr,
                                                  betas=tuple(recipe.betas))
                    if saved_optimizer is not None:
                        load_optimizer_state(loss_fn, optimizer, saved_optimizer)
                else:
                    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
                s = TrainState(loss_fn, optimizer, accelerator, recipe, budget, data, record, work, progress, log,
                               job.on_step, t_start)
                if state is None or state.get("init"):
                    save(s, "qat", 0)
                train_qat(s, start_step)
                model = accelerator.unwrap_model(loss_fn).model
                if distill is not None and distill.topk:
                    record.data["teacher_topk_cache"] = distill.cache_info()
                if recipe.grad_checkpointing:
                    set_grad_checkpointing(model, False)
                if sharded:  # the main process writes the run from a full, unsharded copy
                    tensors = full_model_state(loss_fn, model)
                    model = unsharded_model(job.model, from_scratch, recipe, tensors) if main else None
    except KeyboardInterrupt:  # outside the phases that checkpoint on Ctrl-C themselves (BaI, set-up)
        raise interrupted(work, main) from None
    record.wall_s += time.perf_counter() - t_start
    record.peak_memory_mib = peak_memory_mib()
    exported = None
    if main:
        with StopOnInterrupt() as stop:  # writing the run takes seconds: a Ctrl-C then waits for it
            t_save = time.perf_counter()
            save_converted(model.float().cpu(), tokenizer, recipe, work, names)
            if record.plan is not None:  # loading and measuring, the text, the stages, writing; the export follows
                record.plan["actual_s"] = round(record.plan["stages"].get("spent", 0.0) + record.wall_s
                                                + record.data.get("prepare_s", 0.0) + time.perf_counter() - t_save, 1)
            record.write(work / "run.json")
            plot_loss(record, work / "loss.png")
            shutil.rmtree(work / CHECKPOINT, ignore_errors=True)
            work.rename(job.out)
        later = f"export it with `binarize export {job.out} --out {job.out / 'packed'}`"
        if stop.requested:
            raise Interrupted(f"interrupted while the run was written: {job.out} is complete"
                              + (f", {later}" if export else ""), resumable=False)
        if export:
            from ..formats import export_run

            try:
                exported = export_run(job.out, job.out / "packed", export, overwrite=True)
            except KeyboardInterrupt:  # the export writes to a temporary directory, removed on the way out
                raise Interrupted(f"interrupted during the export: the run {job.out} is complete, {later}",
                                  resumable=False) from None
    accelerator.wait_for_everyone()  # the others return once OUT is complete
    return ConvertResult(job.out, record, exported, main)


def _progress(enabled: bool):
    from ..progress import progress_bar

    return progress_bar(enabled)


def set_grad_checkpointing(model, on: bool) -> None:
    """transformers' activation checkpointing of every decoder block (non-reentrant ``torch.utils.checkpoint``)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def peak_memory_mib() -> dict:
    """Peak resident memory of this process (and peak CUDA allocation) in MiB, for the run record."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    out = {"cpu_rss": round(rss, 1)}
    if torch.cuda.is_available():
        out["cuda_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def plain_log(msg: str) -> None:
    """--no-progress: timestamped lines for log files instead of a live bar."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
