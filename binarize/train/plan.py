"""The plan of a conversion before any work: the token budget as optimizer steps (computed once,
in ``check_job``, and passed down), and the per-step schedules (learning rate, sharpness t).

A training change that alters how many steps a budget makes, or what lr / t a step gets, lives here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import BinarizeError
from ..recipe import Recipe
from ..schedules import chunk_t, resolve_steps


@dataclass(frozen=True)
class Budget:
    """How a token budget maps onto optimizer steps, and where the continual switch falls.

    ``n_sequences`` sequences of ``recipe.seq_len`` tokens are trained, ``seqs_per_step`` per
    optimizer step (the last step may hold fewer) over ``steps`` steps; ``switch`` is the first
    quantized step and ``phase_len`` the phase-in length in steps.
    """

    tokens: int  # requested
    seq_len: int
    n_sequences: int
    steps: int
    seqs_per_step: int
    switch: int
    phase_len: int

    @property
    def tokens_used(self) -> int:
        return self.n_sequences * self.seq_len


def _steps_and_switch(recipe: Recipe, tokens: int) -> tuple[int, int]:
    """Optimizer steps of a budget (the last may hold fewer sequences) and the first quantized step."""
    steps = math.ceil((tokens // recipe.seq_len) / (recipe.batch_tokens // recipe.seq_len))
    return steps, resolve_steps(recipe.switch_at, steps)


def plan_budget(recipe: Recipe, tokens: int) -> Budget:
    """Steps, switch and phase-in of a budget; an impossible combination is one BinarizeError."""
    L = recipe.seq_len
    n_seq = tokens // L
    per_step = recipe.batch_tokens // L
    if tokens == 0:  # post-training quantization: the initialisation stages alone, no end-to-end step
        return Budget(0, L, 0, 0, per_step, 0, 1)
    if n_seq == 0:
        raise BinarizeError(f"token budget {tokens} is less than one sequence of {L} tokens")
    steps, switch = _steps_and_switch(recipe, tokens)
    if switch >= steps:
        raise BinarizeError(f"switch_at {recipe.switch_at:g} is step {switch}, but the budget has only {steps} "
                            "optimizer steps: nothing would be trained quantized")
    if recipe.quantizer == "progressive" and steps - switch < recipe.chunks:
        after = f" after the switch at step {switch}" if switch else ""
        n = steps - switch
        raise BinarizeError(
            f"{tokens} tokens make {n} optimizer step{'' if n == 1 else 's'}{after}, fewer than the "
            f"{recipe.chunks} chunks: raise --tokens or lower --batch-tokens / --chunks"
        )  # fit_chunks lowers the chunks first where two or more quantized steps allow a schedule
    return Budget(tokens, L, n_seq, steps, per_step, switch, max(1, resolve_steps(recipe.phase_in_len, steps)))


def fit_chunks(recipe: Recipe, tokens: int) -> tuple[Recipe, str | None]:
    """A progressive recipe whose budget makes fewer optimizer steps (after any switch) than its
    chunks runs one chunk per step instead: (recipe with ``chunks`` lowered, a notice), else
    (recipe, None). The scheduler keeps its span (``schedules.chunk_t``): t starts at 0 and
    follows the same curve in fewer, larger steps, so its last chunk ends lower (2 chunks: t = 0,
    then 10.4; 20 chunks end at 83.7); the exported model uses the hard sign as always. Fewer than
    two quantized steps cannot hold a schedule; ``plan_budget`` then refuses the budget."""
    if recipe.quantizer != "progressive" or tokens // recipe.seq_len == 0:
        return recipe, None
    steps, switch = _steps_and_switch(recipe, tokens)
    quantized = steps - switch
    if not 2 <= quantized < recipe.chunks:
        return recipe, None
    return dataclasses.replace(recipe, chunks=quantized), (
        f"{tokens:,} tokens make {quantized} quantized optimizer steps, fewer than the recipe's {recipe.chunks} "
        f"chunks: the progressive schedule runs {quantized} chunks, one per step (t along the same curve)")


def fit_self_text(recipe: Recipe, tokens: int, data_spec: str, held_out: int = 0) -> tuple[Recipe, str | None]:
    """Training text that does not run out (issue 41 item 3): a fixed self-generated corpus
    (``self_tokens``) that the budget would read more than ``max_epochs`` times is enlarged to
    ``ceil(tokens / max_epochs)`` so that no token is seen more often; returns (recipe, notice).
    ``data_spec`` is the resolved ``data`` (``auto`` already chosen); in a ``self+SOURCE:F`` mix only
    the self-generated fraction counts; ``held_out`` tokens of the corpus are calibration blocks held out
    of training (calibration from the same source). Measured reason: at a 41k-token corpus read 6 times,
    ternary-distill's training loss fell 5.57 -> 4.19 from 32k to 200k QAT tokens while WikiText-2
    stayed at 492 -> 462 (benchmarks/results/quality_cpu.md): the corpus was memorised."""
    from ..recipe import parse_mix

    real, frac = parse_mix(data_spec)
    if not recipe.self_tokens or frac == 0 or tokens == 0 or recipe.max_epochs <= 0:
        return recipe, None
    need = math.ceil(tokens // recipe.seq_len * recipe.seq_len * frac)  # the whole sequences trained on
    have = recipe.self_tokens - held_out
    if have > 0 and need <= recipe.max_epochs * have:
        return recipe, None
    grown = math.ceil(need / recipe.max_epochs) + held_out
    times = f"{need / have:.1f} times" if have > 0 else "more than once (calibration takes all of it)"
    return dataclasses.replace(recipe, self_tokens=grown), (
        f"self_tokens {recipe.self_tokens:,} would be read {times} by {need:,} training "
        f"tokens; generating {grown:,} instead so no token is seen more than {recipe.max_epochs:g} times "
        "(--set max_epochs=0 keeps the smaller corpus)")


def held_out_tokens(recipe: Recipe) -> int:
    """Calibration tokens taken from the head of the training source and held out of training
    (an initialisation stage calibrates on the same source it trains on), else 0."""
    return recipe.calib_sequences * recipe.seq_len if recipe.calibrates and recipe.calib == recipe.data else 0


def fit_recipe(recipe: Recipe, tokens: int, data_spec: str, fsdp_opts: dict | None = None) -> tuple[Recipe, str | None]:
    """The recipe fitted to a budget (``fit_chunks``, ``fit_self_text`` with the resolved ``data``
    spec, an accelerate config's activation checkpointing) and the notices to print, or None."""
    recipe, notice = fit_chunks(recipe, tokens)
    recipe, text_notice = fit_self_text(recipe, tokens, data_spec, held_out_tokens(recipe))
    if (fsdp_opts or {}).get("activation_checkpointing"):  # the accelerate config's fsdp_activation_checkpointing
        recipe = dataclasses.replace(recipe, grad_checkpointing=True)
    return recipe, "; ".join(n for n in (notice, text_notice) if n) or None


def check_job(recipe: Recipe, tokens: int, from_scratch: str | None = None, export: str | None = None) -> Budget:
    """Every check that needs no model or data, so bad combinations fail before any work.

    Returns the Budget the run then uses. ``export`` is a format name of ``binarize.formats``
    (or None / "none"); the recipe's method must fit it.
    """
    from ..models import SCRATCH_CONFIGS

    budget = plan_budget(recipe, tokens)
    if tokens == 0:
        if from_scratch is not None:
            raise BinarizeError("--tokens 0 converts a pretrained model without training; --from-scratch has nothing "
                                "to convert (give a token budget)")
        if not recipe.calibrates:
            raise BinarizeError(f"--tokens 0 runs only the initialisation, and recipe {recipe.name} has none (bai, "
                                "init: hessian, blockwise_steps): it would write the plain rounding; use a PTQ "
                                "recipe (binary-ptq, ternary-ptq) or --set init=hessian")
    if from_scratch is not None:
        if from_scratch not in SCRATCH_CONFIGS:
            raise BinarizeError(f"unknown --config {from_scratch!r} (known: {', '.join(SCRATCH_CONFIGS)})")
        if recipe.bai:
            raise BinarizeError("--from-scratch starts from random weights, so BaI has nothing to initialise: "
                                "use a recipe with bai: false (e.g. continual-16to158) or --set bai=false")
        if recipe.blockwise_steps:
            raise BinarizeError("--from-scratch has no pretrained blocks to reconstruct: block-wise training needs "
                                "a pretrained model (--set blockwise_steps=0)")
        if recipe.distill_alpha > 0:
            raise BinarizeError("distillation needs a pretrained teacher: it cannot be combined with --from-scratch")
    if export is not None and export != "none":
        from ..formats.registry import check_fit

        check_fit(recipe.method, export, f"recipe {recipe.name}")
    return budget


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


def stage_summary(recipe: Recipe, budget: Budget, n_blocks: int, bai_only: bool = False,
                  timed: bool = False) -> list[str]:
    """What each stage of the run will train, in tokens, for the start-up lines of ``convert``.

    ``--tokens`` is the end-to-end QAT budget; BaI and block-wise reconstruction come on top.
    ``timed``: the budget is ``--time``'s plan (its zero tokens are the plan's, not ``--tokens 0``)."""
    L = recipe.seq_len
    lines = [f"recipe {recipe.name} ({recipe.method}, {recipe.quantizer}), sequences of {L} tokens"]
    if recipe.bai:
        per_step = max(1, recipe.bai_batch_tokens // L) * L
        lines.append(f"BaI: {recipe.bai_steps} steps x {per_step:,} tokens = {recipe.bai_steps * per_step:,} tokens "
                     f"(St only, on {recipe.calib_sequences} calibration sequences)")
    if recipe.init == "hessian" and not bai_only:
        lines.append(f"Hessian-aware initialisation: every linear, GPTQ error feedback "
                     f"{'on' if recipe.hessian_feedback else 'off'}, {recipe.hessian_refine} scale refits "
                     f"(forward passes only, {recipe.calib_sequences} calibration sequences)")
    if recipe.blockwise_steps and not bai_only:
        per_block = recipe.blockwise_steps * recipe.blockwise_batch * L
        lines.append(f"block-wise: {n_blocks} blocks x {recipe.blockwise_steps} steps x {recipe.blockwise_batch} "
                     f"sequences = {per_block:,} tokens per block through one block "
                     f"({recipe.blockwise_sequences} cached calibration sequences)")
    if not bai_only and budget.tokens == 0:
        lines.append("QAT: none (--time gives the time to the stages above)" if timed else
                     "QAT: none (--tokens 0: post-training quantization, the stages above alone)")
    elif not bai_only:
        kd = f", distillation alpha {recipe.distill_alpha:g}" if recipe.distill_alpha else ""
        lines.append(f"QAT: {budget.tokens_used:,} tokens in {budget.steps} steps of {budget.seqs_per_step * L:,} "
                     f"(--tokens {budget.tokens:,}){kd}")
    return lines
