"""``binarize convert --time``: measure the stages on the loaded model (``probe.py``), plan them
(``timeplan.py``) and turn the plan into the recipe and token budget the run then follows.

Runs after the model is loaded and before anything is written, so a plan that cannot fit is one
line with nothing on disk. A resumed run does not come here: it keeps the recipe and budget its
checkpoint recorded, and run.json keeps the plan (``plan``) with the time actually taken.
"""

from __future__ import annotations

import dataclasses
import time

from ..errors import BinarizeError
from ..recipe import Recipe, load_recipe, parse_mix
from .data import _self_tokens, resolve_auto, self_gen_config
from .plan import Budget, check_job, fit_chunks, held_out_tokens
from .timeplan import (BW_MAX_READS, QAT_MIN_STEPS, SEQUENCES_KEEP_STEPS, TimePlan, deadline_block_steps,
                       format_duration, plan_time, revise_blockwise_steps, revise_qat_steps, sequences_for_steps)

PTQ_RECIPES = {"binary": "binary-ptq", "ternary": "ternary-ptq"}  # the short path of each method
PTQ_KEYS = ("seq_len", "batch_tokens", "micro_batch", "calib_sequences", "seed", "bai_batch_tokens",
            "self_batch")  # kept from the job


def ptq_recipe(recipe: Recipe, cpu: bool = False, fixed: frozenset[str] = frozenset(),
               self_text: bool = True) -> Recipe | None:
    """The method's PTQ-only recipe at the job's sizes, or None where the method has none (its
    binarized layers train from the sign). ``cpu``: the calibration set is
    ``profiles.CPU_PTQ_PROFILE``'s unless the command line fixed it (``fixed``). ``self_text``:
    calibrate on the model's own text as the PTQ recipes do (the plan counts its generation),
    else on ``auto`` (PTB train where it is local): a job whose text is not self-generated has
    no generation speed measured."""
    from ..profiles import CPU_PTQ_PROFILE

    name = PTQ_RECIPES.get(recipe.method)
    if name is None:
        return None
    keep = {k: getattr(recipe, k) for k in PTQ_KEYS}
    if cpu and "calib_sequences" not in fixed:
        keep.update(CPU_PTQ_PROFILE)
    return load_recipe(name, {**keep, **({} if self_text else {"calib": "auto"})})


def _ptq_generation_s(ptq: Recipe, src, gen_token_s: float) -> float:
    """Seconds to generate a PTQ recipe's self-generated calibration text (0 where it is cached or
    the recipe calibrates on other text)."""
    from binarize.calibration.selfgen import is_cached

    n = _self_tokens(resolve_auto(ptq.calib), ptq.calib_sequences * ptq.seq_len, ptq.seq_len)  # as prepare_data asks
    return 0.0 if n == 0 or is_cached(src, self_gen_config(ptq, n)) else n * gen_token_s


def plan_for_time(seconds: float, recipe: Recipe, model, tokenizer, src, *, tokens: int | None, spent_s: float,
                  log=None, fixed: frozenset[str] = frozenset()) -> tuple[Recipe, int, TimePlan]:
    """(recipe, token budget, plan) for ``seconds`` of wall time on this machine. ``tokens``: the
    end-to-end budget the user fixed beside the time, or None. ``fixed``: recipe keys the command
    line set (the plan does not change them; today only the calibration sequences,
    ``timeplan.sequences_for_steps``, are planned). BinarizeError (one line) when the time cannot
    hold even the shortest conversion, or the fixed tokens with it."""
    from binarize.calibration.datasets import DATASETS, local_file
    from binarize.calibration.selfgen import is_cached

    from .preflight import check_probe_fits
    from .probe import init_seconds, measure_speeds, probe_ids

    t0 = time.perf_counter()
    data = resolve_auto(recipe.data)
    real, frac = parse_mix(data)  # self+SOURCE:F: F of the text self-generated, the rest (and the fallback) SOURCE
    held_out = held_out_tokens(recipe)
    corpus = recipe.self_tokens or (held_out + max(recipe.qat_floor_steps, 1) * recipe.batch_tokens)
    if frac > 0:
        recipe = dataclasses.replace(recipe, self_tokens=corpus)  # a fixed corpus the cache can share
    cached = corpus if frac > 0 and is_cached(src, self_gen_config(recipe, corpus)) else 0
    cpu = next(model.parameters()).device.type == "cpu"
    check_probe_fits(model)
    # generation is timed even where the corpus is cached: a long plan may need a larger one
    speeds, passes = measure_speeds(model, tokenizer, recipe, spent_s=spent_s, generate=frac > 0, log=log)
    ptb_local = local_file(DATASETS["ptb"].splits["train"]) is not None
    ptq = ptq_recipe(recipe, cpu, fixed, self_text=speeds.gen_token_s > 0)

    def planned(sp, corpus=corpus, cached=cached, held_out=held_out):
        return plan_time(seconds, sp, data=data, corpus_tokens=corpus, cached_tokens=cached, held_out=held_out,
                         max_epochs=recipe.max_epochs, tokens=tokens, ptb_local=ptb_local,
                         blockwise=recipe.blockwise_steps > 0, self_frac=frac, fallback=real or "ptb",
                         qat_floor=recipe.qat_floor_steps)

    try:
        plan = planned(speeds)
    except BinarizeError:  # the full path does not fit: time the PTQ path's initialisation, plan again
        if ptq is None or tokens is not None:
            raise
        t_ptq = time.perf_counter()
        ptq_s = (init_seconds(model, ptq, passes, probe_ids(model, ptq))
                 + _ptq_generation_s(ptq, src, speeds.gen_token_s))
        speeds = dataclasses.replace(speeds, ptq_init_s=ptq_s, spent_s=speeds.spent_s + time.perf_counter() - t_ptq)
        plan = planned(speeds)
    if plan.path == "full" and held_out and data == "self" and not fixed & {"calib_sequences", "blockwise_sequences"}:
        recipe, plan = _more_sequences(plan, recipe, src, speeds, planned)
    if plan.path == "ptq":
        if ptq is None:
            raise BinarizeError(f"--time {format_duration(seconds)} is too short for recipe {recipe.name}")
        out = ptq
    else:
        out = dataclasses.replace(recipe, blockwise_steps=plan.blockwise_steps) if plan.blockwise_steps else recipe
        if plan.data != data:  # self-generation would not pay for itself: PTB train for both
            out = dataclasses.replace(out, data=plan.data, calib=plan.data)
        elif frac > 0:
            out = dataclasses.replace(out, self_tokens=plan.corpus_tokens)
    if log:
        log(f"planned in {time.perf_counter() - t0:.0f} s")
    return out.validate(), plan.tokens, plan


def _more_sequences(plan: TimePlan, recipe: Recipe, src, speeds, planned) -> tuple[Recipe, TimePlan]:
    """(recipe, plan) with more calibration sequences where the plan's block-wise steps would read
    each more than ``BW_MAX_READS`` times (``sequences_for_steps``): the corpus grows by the extra
    sequences' tokens (their generation counted), the per-block passes over the cached sequences
    scale with their number, and the larger plan is kept only where it is still a full path on the
    model's own text that keeps ``SEQUENCES_KEEP_STEPS`` of the block-wise steps (on the default
    model, one hour: 256 sequences at 427 steps, 71 %, WikiText-2 171 against 128 at 600 steps
    161, ``benchmarks/results/quality_cpu.md``); else the plan as it was."""
    from binarize.calibration.selfgen import is_cached

    have = recipe.blockwise_sequences
    n = sequences_for_steps(plan.blockwise_steps, recipe.blockwise_batch, have)
    if n <= have:
        return recipe, plan
    n_calib = max(n, recipe.calib_sequences)
    grown = dataclasses.replace(recipe, calib_sequences=n_calib, blockwise_sequences=n,
                                self_tokens=recipe.self_tokens + (n_calib - recipe.calib_sequences) * recipe.seq_len)
    held = held_out_tokens(grown)
    cached = grown.self_tokens if is_cached(src, self_gen_config(grown, grown.self_tokens)) else 0
    sp = dataclasses.replace(speeds, block_fixed_s=speeds.block_fixed_s * n / have)
    trial = planned(sp, corpus=grown.self_tokens, cached=cached, held_out=held)
    if trial.path != "full" or trial.data != plan.data or trial.blockwise_steps < SEQUENCES_KEEP_STEPS * plan.blockwise_steps:
        return recipe, plan
    trial.notes.append(f"calibration sequences {have} -> {n}: {trial.blockwise_steps} block-wise steps of "
                       f"{recipe.blockwise_batch} read each at most {BW_MAX_READS} times")
    return grown, trial


def revise_for_time(plan: TimePlan, recipe: Recipe, tokens: int, *, chunks: int, elapsed_s: float,
                    train_blocks: int) -> tuple[Recipe, int, Budget | None, str | None]:
    """The end-to-end stage re-planned as it starts (``timeplan.revise_qat_steps``), ``elapsed_s``
    into the job: (recipe, tokens, its Budget, the line to print), or (recipe, tokens, None, None)
    where nothing changes. ``chunks``: the recipe's progressive chunks before any fitting (a budget
    that grows gets them back); ``train_blocks``: sequences the prepared training text holds (the
    stage may grow to ``max_epochs`` over them, or to the planned steps where those read more).
    Records the revision in ``plan.revised``."""
    per_step = recipe.batch_tokens // recipe.seq_len
    planned = tokens // recipe.batch_tokens
    cap = int(recipe.max_epochs * train_blocks) // per_step if recipe.max_epochs > 0 else 0
    steps = revise_qat_steps(plan, elapsed_s, max(cap, planned) if cap else 0)
    new = steps * recipe.batch_tokens
    if new == tokens:
        return recipe, tokens, None, None
    fitted, notice = fit_chunks(dataclasses.replace(recipe, chunks=chunks), new) \
        if recipe.quantizer == "progressive" and new else (recipe, None)
    try:
        budget = check_job(fitted, new)
    except BinarizeError:  # a budget the recipe cannot schedule (a continual switch, too few steps): keep the plan's
        return recipe, tokens, None, None
    plan.revised = {**(plan.revised or {}), "at_s": round(elapsed_s, 1), "tokens": new, "steps": steps,
                    "expected_s": round(steps * plan.speeds.qat_step_s, 1), "chunks": fitted.chunks}
    if not new:
        return fitted, 0, budget, (f"end-to-end QAT dropped {format_duration(elapsed_s)} into the job: the time left "
                                   f"holds fewer than {QAT_MIN_STEPS} steps; planned {tokens:,} tokens")
    line = (f"end-to-end QAT re-planned {format_duration(elapsed_s)} into the job: {new:,} tokens ({steps} steps, "
            f"about {format_duration(steps * plan.speeds.qat_step_s)}) for the time left; planned {tokens:,}")
    if cap and steps == cap and steps > planned:
        line += f" (at most {recipe.max_epochs:g} epochs of the training text)"
    return fitted, new, budget, line + (f"; {notice}" if notice else "")


def revise_blockwise(plan: TimePlan, recipe: Recipe, elapsed_s: float, log=None) -> Recipe:
    """The recipe with its block-wise steps re-planned once the text is ready
    (``timeplan.revise_blockwise_steps``), recorded in ``plan.revised`` and logged where they change."""
    steps = revise_blockwise_steps(plan, elapsed_s)
    if steps == recipe.blockwise_steps or not recipe.blockwise_steps:
        return recipe
    plan.revised = {**(plan.revised or {}), "blockwise_at_s": round(elapsed_s, 1), "blockwise_steps": steps}
    if log:
        log(f"block-wise re-planned {format_duration(elapsed_s)} into the job, the text ready: {steps} steps per "
            f"block for the time left; planned {recipe.blockwise_steps}")
    return dataclasses.replace(recipe, blockwise_steps=steps)


DEADLINE_LOG_CHANGE = 0.02  # a deadline re-plan is printed where the steps moved this much since the last line


def block_deadline(plan: TimePlan, t_job: float, log=None, clock=time.perf_counter):
    """``steps_for(blocks_left, blocks)`` for ``blockwise.blockwise_reconstruct``: the steps per
    block for the blocks still to train (``timeplan.deadline_block_steps``) from the blocks this
    process trained (those with ``block_s``; one resumed from a checkpoint has none): seconds per
    step ``sum(wall_s) / sum(steps)``, the rest of each block's ``block_s`` its fixed cost.
    ``t_job``: the job's start on ``clock`` (seconds). Each change is kept in
    ``plan.revised["blockwise_deadline"]`` as [block, steps] (block counted from 1), and printed
    where it moved ``DEADLINE_LOG_CHANGE`` or more from the last printed line (the first: from the
    first block's steps)."""
    shown = [None]

    def steps_for(blocks_left: int, blocks: list[dict]) -> int:
        done = [b for b in blocks if "block_s" in b and b.get("steps")]
        if not done:
            return blocks[-1]["steps"] if blocks and blocks[-1].get("steps") else plan.blockwise_steps
        step_s = sum(b["wall_s"] for b in done) / sum(b["steps"] for b in done)
        fixed_s = sum(max(0.0, b["block_s"] - b["wall_s"]) for b in done) / len(done)
        elapsed = clock() - t_job
        steps = deadline_block_steps(plan, elapsed, blocks_left, fixed_s, step_s)
        if steps != done[-1]["steps"]:
            revised = plan.revised = plan.revised or {}
            revised.setdefault("blockwise_deadline", []).append([len(blocks) + 1, steps])
        last = shown[0] if shown[0] is not None else done[0]["steps"]  # the last printed, else the first trained
        if log and abs(steps - last) >= DEADLINE_LOG_CHANGE * last:
            shown[0] = steps
            log(f"block-wise re-planned {format_duration(elapsed)} into the job, {len(blocks)} "
                f"block{'s' if len(blocks) != 1 else ''} done at "
                f"{step_s:.3f} s per step (probe {plan.speeds.block_step_s:.3f}): {steps} steps per block for the "
                f"{blocks_left} left")
        return steps

    return steps_for
