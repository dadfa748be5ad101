"""Plan a conversion by the time a user has (``binarize convert --time 1h``): pure arithmetic on
the stage speeds that ``probe.measure_speeds`` measures on the actual model before any work.

The allocation follows the ``quality`` measurements on the default model on a 2-core CPU
(``benchmarks/results/quality_cpu.md``), per wall-clock second:

* **Block-wise steps are the cheapest quality.** 60 -> 120 -> 200 steps per block took
  WikiText-2 from 1,955 to 1,118 to 847 for ~650 s each step up, where 32k -> 200k end-to-end
  tokens bought 1,118 -> 1,049 for ~1,900 s; 100 -> 300 steps (no end-to-end stage, 128
  calibration sequences) 1,017 -> 567 for 1,460 s more (``quality2``'s ``bw300-seq128``; on
  32 sequences 300 steps gave 817); the ternary recipe 300 -> 600 steps 213 -> 156 for 1,170 s
  more (``tern300-seq128-bf16``, ``tern600-seq128-bf16``, bf16 block-wise matmuls). So after a floor of end-to-end steps
  (``QAT_SHARE`` of the time, at most the recipe's ``qat_floor_steps``, default ``QAT_FLOOR_STEPS``)
  the block-wise stage gets the time up to ``BW_MAX_STEPS`` per block (the most measured), and only
  then does the end-to-end stage get the rest. ``ternary-distill`` has no floor: after 600
  block-wise steps its end-to-end stage buys per second what more block-wise steps buy (scales
  only, lr 1e-3: 134.4 -> 130.1 on WikiText-2 in 167 s; the latent weights at lr 1e-4 bought
  nothing, 161.4 with 32 steps and 155.9 without; ``timeplan_cpu.md``).
* **A long block-wise stage reads more calibration text.** At 600 steps of 4 sequences, 128
  calibration sequences are each read ~19 times and 256 (WikiText-2 155.9 -> 134.4, ternary,
  ``tern600-seq256-bf16``) ~9 times; where the planned steps would read a sequence more than
  ``BW_MAX_READS`` times and the command line did not fix the sequences, ``timed.py`` plans again
  with more (``sequences_for_steps``), the larger corpus's generation counted, and keeps that plan
  only where it keeps ``SEQUENCES_KEEP_STEPS`` (80 %) of the block-wise steps (in one hour 256 sequences
  at 427 steps, 71 %, scored 171 against 128 at 600 steps' 161).
* **Self-generated text is worth its time only when it is cheap.** The model's own text beat PTB
  train on WikiText-2 (1,955 vs 2,950 at 32k tokens) but 41k tokens took 2,110 s to generate,
  the time of 140 more block-wise steps per block. It is generated only when that costs at most
  ``GEN_SHARE`` of the time (or is cached); otherwise PTB train is read instead, with a note.
* **Too little time for a block-wise stage of ``BW_MIN_STEPS``**: the PTQ-only path (the
  method's ``binary-ptq`` / ``ternary-ptq``: Hessian-aware initialisation, no training; 6-8 min
  for the default model), and below that one line with the minimum.

``MARGIN`` of the time is kept back for the estimates' error (the job must end within +10%), and
the stages are re-planned as the job goes for the time actually left: the block-wise steps once
the text is ready (``revise_blockwise_steps``) and again before each block from the blocks already
trained (``deadline_block_steps``), the end-to-end steps when that stage starts
(``revise_qat_steps``).
A resumed run keeps the plan it recorded (run.json ``plan``); nothing here runs again.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

from ..errors import BinarizeError

MARGIN = 0.08  # of the time asked, kept back for estimate error
QAT_SHARE = 0.25  # at most this share of the planned time for the end-to-end floor
QAT_FLOOR_STEPS = 32  # the end-to-end floor: 32 steps of 1024 tokens = quality's 32k members
QAT_MIN_STEPS = 4  # fewer end-to-end steps than this: none are planned beside a block-wise stage
BW_MIN_STEPS = 20  # a block-wise stage shorter than this is not worth its fixed costs
BW_MAX_STEPS = 600  # the most block-wise steps measured (60 -> 120 -> 200 -> 300 -> 600 each bought quality)
GEN_SHARE = 0.25  # self-generated text only where generating it takes at most this share
BW_MAX_READS = 10  # block-wise reads of one calibration sequence beyond which a plan adds sequences
CALIB_MAX_SEQUENCES = 256  # the most calibration sequences measured (quality2's tern600-seq256-bf16)
# more calibration sequences are kept where they keep this share of the block-wise steps. Steps
# buy WikiText-2 about as steps^-0.45 (300 -> 600: 213 -> 156, ternary, 128 sequences); 256
# sequences were worth 0.86x at 600 steps and ~0.95x at 427 (the one-hour run's 171 against 128 at
# 600's 161 and the curve's 181): break-even at 72-88 % of the steps, measured lost at 71 %. The
# middle of that range: the share is on the probe's speeds, which read the default model's step
# at 0.151-0.154 s in two runs where the stage ran 0.134 (256 sequences then planned at 84 %), and
# the deadline inside the stage (``deadline_block_steps``) gives the steps the true speed allows
SEQUENCES_KEEP_STEPS = 0.80

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``20m``, ``1h``, ``1h30m``, ``90s``, ``2.5h`` or a number of seconds -> seconds (> 0).

    Raises BinarizeError for anything else, zero or a negative time."""
    s = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise BinarizeError(f"--time {text!r} is not a duration (examples: 20m, 1h, 1h30m, 90s)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise BinarizeError(f"--time {text!r} must be a positive duration (examples: 20m, 1h, 8h)")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


@dataclass(frozen=True)
class StageSpeeds:
    """Seconds of each stage's unit on this machine for this model and recipe (``probe.py``).

    ``spent_s``: already spent before the plan (loading, fingerprinting, the probe itself);
    ``init_s``: the recipe's initialisation (BaI, Hessian-aware initialisation, scale search);
    ``ptq_init_s``: the PTQ path's initialisation (0: no PTQ path for this method);
    ``block_fixed_s``: per block outside its steps (targets and inputs over the cached sequences);
    ``block_step_s``: one block-wise step of one block; ``last_block_extra_s``: per step of the
    last block on top (its head-KL loss); ``qat_step_s``: one end-to-end optimizer step of
    ``batch_tokens`` tokens, teacher included; ``gen_token_s``: one self-generated token;
    ``save_s``: writing the run and its export."""

    n_blocks: int
    batch_tokens: int
    spent_s: float
    init_s: float
    ptq_init_s: float
    block_fixed_s: float
    block_step_s: float
    last_block_extra_s: float
    qat_step_s: float
    gen_token_s: float
    save_s: float

    def blockwise_s(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        return self.n_blocks * (self.block_fixed_s + steps * self.block_step_s) + steps * self.last_block_extra_s


@dataclass
class TimePlan:
    """What the time buys: ``path`` ``full`` (the recipe's stages) or ``ptq`` (initialisation
    alone), the block-wise steps per block, the end-to-end token budget, where the training text
    comes from and how many tokens of it are generated, and each stage's expected seconds."""

    seconds: float  # asked
    path: str
    blockwise_steps: int
    tokens: int
    data: str
    generate_tokens: int
    corpus_tokens: int = 0  # the self-generated corpus (0: the text is not self-generated)
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tokens_fixed: bool = False  # --tokens beside --time: the end-to-end budget is the user's, never revised
    qat_floor: int = QAT_FLOOR_STEPS  # the recipe's qat_floor_steps the plan was made with (the re-plans use it again)
    revised: dict | None = None  # the stages as re-planned when they started (revise_blockwise_steps, revise_qat_steps)
    speeds: StageSpeeds | None = None  # what the full path was planned with (the re-plans use it again)

    @property
    def expected_s(self) -> float:
        return sum(self.stages.values())

    def lines(self) -> list[str]:
        out = [f"plan for --time {format_duration(self.seconds)}: {self.path} path, expected "
               f"{format_duration(self.expected_s)} in all"]
        what = {"spent": "loading and measuring (done)",
                "generate": f"self-generated text: {self.generate_tokens:,} tokens",
                "init": "initialisation", "blockwise": f"block-wise: {self.blockwise_steps} steps per block",
                "qat": f"end-to-end QAT: {self.tokens:,} tokens", "save": "writing the run and its export"}
        out += [f"  {what[k]:<46} {format_duration(v):>10}" for k, v in self.stages.items() if v > 0 or k == "qat"]
        out += [f"  note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "expected_s": round(self.expected_s, 1),
                "stages": {k: round(v, 1) for k, v in self.stages.items()}}


def sequences_for_steps(steps: int, batch: int, have: int) -> int:
    """Calibration sequences for ``steps`` block-wise steps of ``batch`` sequences each (per block)
    such that no sequence is read more than ``BW_MAX_READS`` times: ``have`` where that already
    holds, else the need rounded up to a multiple of 64, at most ``CALIB_MAX_SEQUENCES`` and never
    fewer than ``have``. Measured on the default model (ternary-distill, 600 steps of 4): 128
    sequences, each read ~19 times, WikiText-2 155.9; 256, ~9 times, 134.4; at 300 steps 32
    sequences read 37 times gave 817 where 128 read 9 times gave 567 (binary)."""
    need = math.ceil(max(0, steps) * max(1, batch) / BW_MAX_READS)
    if need <= have:
        return have
    return max(have, min(CALIB_MAX_SEQUENCES, 64 * math.ceil(need / 64)))


def _gen_s(sp: StageSpeeds, tokens: int) -> float:
    return max(0, tokens) * sp.gen_token_s


def plan_time(seconds: float, sp: StageSpeeds, *, data: str, corpus_tokens: int, cached_tokens: int,
              held_out: int, max_epochs: float, tokens: int | None = None, ptb_local: bool = True,
              blockwise: bool = True, self_frac: float | None = None, fallback: str = "ptb",
              qat_floor: int = QAT_FLOOR_STEPS) -> TimePlan:
    """The plan for ``seconds`` of wall time (module docstring for the rules).

    ``data``: the resolved training text (``self``, ``ptb``, a file, a ``self+SOURCE:F`` mix);
    ``self_frac``: the self-generated share of it (None: 1 for ``self``, else 0); where it is
    above 0, ``corpus_tokens`` is the corpus the recipe would generate for a short run,
    ``cached_tokens`` what the cache already holds for these settings (generated for free),
    ``held_out`` the calibration tokens taken from it, ``max_epochs`` how often a token may be
    read (0: no limit); ``fallback`` the text read instead where generating would not pay (a
    mix's own SOURCE; PTB train for plain self text, where ``ptb_local``).
    ``tokens``: end-to-end tokens the user fixed (``--tokens`` beside ``--time``); the rest is
    planned around them, and a budget that cannot fit is a BinarizeError naming the time it needs.
    ``blockwise``: the recipe has a block-wise stage (else all the time after the initialisation
    goes to end-to-end tokens). ``qat_floor``: the end-to-end steps planned before the block-wise
    stage (the recipe's ``qat_floor_steps``); with 0 and a block-wise stage, end-to-end steps are
    planned only from the time left once it has ``BW_MAX_STEPS`` (none where that is under
    ``QAT_MIN_STEPS``), and self-generated text beyond the calibration set only for those.
    Raises BinarizeError when even the shortest path does not fit, naming its minimum."""
    usable = seconds * (1 - MARGIN) - sp.spent_s - sp.save_s
    notes: list[str] = []
    gen_tokens = 0
    frac = (1.0 if data == "self" else 0.0) if self_frac is None else self_frac
    if frac > 0 and blockwise and tokens is None and not qat_floor and cached_tokens < corpus_tokens:
        corpus_tokens = min(corpus_tokens, held_out)  # no floor: the calibration set, more only for end-to-end steps
    if frac > 0:
        gen_tokens = max(0, corpus_tokens - cached_tokens)
        if gen_tokens and _gen_s(sp, gen_tokens) > GEN_SHARE * seconds:
            if ptb_local or frac < 1:
                notes.append(f"generating {gen_tokens:,} tokens of the model's own text would take "
                             f"{format_duration(_gen_s(sp, gen_tokens))}, over {GEN_SHARE:.0%} of the time: "
                             f"training and calibrating on {'PTB train' if fallback == 'ptb' else fallback} instead")
                data, gen_tokens, frac = fallback, 0, 0.0
            else:
                notes.append("the self-generated text takes a large share of the time (PTB train is not local)")
    base = usable - _gen_s(sp, gen_tokens) - sp.init_s
    per_step = sp.qat_step_s
    bw_min = BW_MIN_STEPS if blockwise else 0
    floor = qat_floor if blockwise else max(1, qat_floor)  # without a block-wise stage the end-to-end one is all
    qat_min = QAT_MIN_STEPS if tokens is None and floor else 0
    min_full = sp.blockwise_s(bw_min) + qat_min * per_step
    if tokens is not None:
        need = math.ceil(tokens / sp.batch_tokens) * per_step
        if need + sp.blockwise_s(bw_min) > base:
            total = seconds * (1 - MARGIN) - base + need + sp.blockwise_s(bw_min)
            raise BinarizeError(f"--tokens {tokens:,} beside --time {format_duration(seconds)}: the end-to-end stage "
                                f"alone needs about {format_duration(need)} on this machine and the whole job about "
                                f"{format_duration(total / (1 - MARGIN))}; give more time or fewer tokens")
    if base < min_full:
        return _ptq_plan(seconds, sp, notes, tokens, bw_min, qat_min)
    if tokens is None and not floor:
        qat_steps = 0
    elif tokens is None:  # the end-to-end floor, never so large that the shortest block-wise stage cannot fit
        qat_steps = max(QAT_MIN_STEPS, min(floor, int(QAT_SHARE * base / per_step),
                                           int((base - sp.blockwise_s(bw_min)) / per_step)))
    else:
        qat_steps = math.ceil(tokens / sp.batch_tokens)
    left = base - qat_steps * per_step
    bw = 0
    if blockwise:
        per_bw_step = sp.n_blocks * sp.block_step_s + sp.last_block_extra_s
        bw = max(BW_MIN_STEPS, min(BW_MAX_STEPS, int((left - sp.n_blocks * sp.block_fixed_s) / per_bw_step)))
        left -= sp.blockwise_s(bw)
    corpus = max(corpus_tokens, cached_tokens) if frac > 0 else 0
    if tokens is None and left > per_step:  # block-wise is full: the rest goes to end-to-end tokens
        extra = int(left / per_step)
        if frac > 0 and max_epochs > 0:  # beyond what the corpus allows, a larger one is generated
            if sp.gen_token_s <= 0:
                raise BinarizeError("internal error: a plan on self-generated text needs the generation speed")
            read = frac * sp.batch_tokens  # self-generated tokens an end-to-end step reads
            free = max(0, int(max_epochs * max(0, corpus - held_out) / read) - qat_steps)
            if extra > free:
                # the cache is keyed by the corpus size: a larger corpus is generated whole
                regen = 0.0 if gen_tokens else _gen_s(sp, corpus)
                cost = per_step + read * sp.gen_token_s / max_epochs
                grow = int((left - free * per_step - regen) / cost)
                if grow > 0 and qat_steps + free + grow >= QAT_MIN_STEPS:
                    extra = free + grow
                    corpus = math.ceil((qat_steps + extra) * read / max_epochs) + held_out
                    gen_tokens = corpus
                else:
                    extra = free
        if qat_steps + extra >= QAT_MIN_STEPS:  # a stage of fewer steps is not worth its fixed costs (nor its text)
            qat_steps += extra
    plan = TimePlan(seconds, "full", bw, tokens if tokens is not None else qat_steps * sp.batch_tokens, data,
                    gen_tokens, corpus, notes=notes, tokens_fixed=tokens is not None, speeds=sp, qat_floor=qat_floor)
    plan.stages = {"spent": sp.spent_s, "generate": _gen_s(sp, gen_tokens), "init": sp.init_s,
                   "blockwise": sp.blockwise_s(bw), "qat": qat_steps * per_step, "save": sp.save_s}
    if tokens is not None and plan.expected_s < seconds * (1 - 2 * MARGIN):
        notes.append(f"--tokens {tokens:,} and {bw} block-wise steps per block (at most {BW_MAX_STEPS}, the most "
                     f"measured) end in about {format_duration(plan.expected_s)}, before the time asked")
    return plan


def revise_blockwise_steps(plan: TimePlan, elapsed_s: float) -> int:
    """Block-wise steps per block re-planned once the training text is ready, ``elapsed_s``
    seconds into the job: the plan's own rules on its measured speeds (``plan.speeds``) for the
    time actually left, the text now costing nothing (a probe of seconds stands for minutes of
    decoding, which the block-wise steps, bought first, should not pay for or lose). The
    planned steps where the plan is not a full path with a block-wise stage; ``BW_MIN_STEPS``
    where even those no longer fit (the end-to-end stage then shrinks to its minimum)."""
    if plan.path != "full" or not plan.blockwise_steps or not plan.speeds:
        return plan.blockwise_steps
    sp = replace(plan.speeds, spent_s=elapsed_s)
    try:
        again = plan_time(plan.seconds, sp, data=plan.data, corpus_tokens=0, cached_tokens=0, held_out=0,
                          max_epochs=0, tokens=plan.tokens if plan.tokens_fixed else None, self_frac=0.0,
                          qat_floor=plan.qat_floor)
    except BinarizeError:  # fixed tokens that no longer fit beside the shortest block-wise stage
        return BW_MIN_STEPS
    return again.blockwise_steps if again.path == "full" else BW_MIN_STEPS


def deadline_block_steps(plan: TimePlan, elapsed_s: float, blocks_left: int, fixed_s: float, step_s: float) -> int:
    """Block-wise steps per block for the ``blocks_left`` blocks still to train, ``elapsed_s``
    seconds into the job, from the stage's own measured speeds: ``fixed_s`` seconds per block
    outside its steps and ``step_s`` per step (the blocks trained so far); the last block's
    head-KL cost on top is the probe's. The stage ends where the plan left the end-to-end floor
    (its ``qat_floor`` steps, at most the planned ones; all of them where the user fixed the
    tokens) and ``save_s`` before ``seconds * (1 - MARGIN)``: the probe's few steps misread the
    stage's speed by up to 20 % either way from one process to the next (0.151 and 0.154 s per
    step read where runs took 0.134; 0.109 and 0.112 where they took 0.13 and 0.135; the faster
    of two timings in one probe changed nothing), and with no end-to-end stage after it nothing
    else takes that error up (the ternary hour ended 12.5 minutes early). Between ``BW_MIN_STEPS`` and
    ``BW_MAX_STEPS``; the planned steps where the plan is not a timed full path with a
    block-wise stage or nothing is left to train."""
    sp = plan.speeds
    if plan.path != "full" or not plan.blockwise_steps or not sp or blocks_left <= 0 or step_s <= 0:
        return plan.blockwise_steps
    planned_qat = plan.tokens // sp.batch_tokens
    reserve = planned_qat if plan.tokens_fixed else min(plan.qat_floor, planned_qat)
    left = plan.seconds * (1 - MARGIN) - elapsed_s - sp.save_s - reserve * sp.qat_step_s - blocks_left * fixed_s
    steps = int(left / (blocks_left * step_s + sp.last_block_extra_s))
    return max(BW_MIN_STEPS, min(BW_MAX_STEPS, steps))


def revise_qat_steps(plan: TimePlan, elapsed_s: float, max_steps: int) -> int:
    """End-to-end optimizer steps that end the job within the time asked, re-planned when the
    stage starts, ``elapsed_s`` seconds into the job: the last stage takes up what the earlier
    stages' estimates got wrong (the self-generated text's most of all: a probe of seconds stands
    for minutes of decoding), so the job ends within the time, and time the estimates kept back
    goes to training. The stage's own speed is the probe's (``plan.speeds.qat_step_s``).

    At least ``QAT_MIN_STEPS`` (or the planned steps, where fewer), at most ``max_steps`` (the
    steps the prepared training text holds within ``max_epochs``; 0: no limit); 0 where the plan
    has no end-to-end floor (``qat_floor`` 0: the stage is a left-over) and the time left holds
    fewer than ``QAT_MIN_STEPS`` (a one-hour ternary run was given 4 steps 54.8 minutes in, for
    53 s past its time: its end-to-end loss rose from 4.80 to 5.63 over them, WikiText-2 149.4
    where the same stages had reached 134-147 without). The planned steps where the plan is not
    a timed full path or the user fixed the tokens."""
    sp = plan.speeds
    planned = plan.tokens // sp.batch_tokens if sp else 0
    if plan.path != "full" or plan.tokens_fixed or planned == 0 or sp.qat_step_s <= 0:
        return planned
    left = plan.seconds * (1 - MARGIN) - elapsed_s - sp.save_s
    steps = int(left / sp.qat_step_s)
    if max_steps > 0:
        steps = min(steps, max_steps)
    if not plan.qat_floor and steps < QAT_MIN_STEPS:
        return 0
    return max(min(QAT_MIN_STEPS, planned), steps)


def _ptq_plan(seconds: float, sp: StageSpeeds, notes: list[str], tokens: int | None, bw_min: int,
              qat_min: int) -> TimePlan:
    """The PTQ-only path: initialisation alone, or one line with the minimum the machine needs."""
    full_min = sp.spent_s + sp.save_s + sp.init_s + sp.blockwise_s(bw_min) + qat_min * sp.qat_step_s
    ptq_min = sp.spent_s + sp.save_s + sp.ptq_init_s
    if tokens is None and sp.ptq_init_s > 0 and ptq_min <= seconds * (1 - MARGIN):
        notes.append(f"the training stages need about {format_duration(full_min / (1 - MARGIN))}: post-training "
                     "quantization alone (Hessian-aware initialisation, no training)")
        plan = TimePlan(seconds, "ptq", 0, 0, "auto", 0, notes=notes)
        plan.stages = {"spent": sp.spent_s, "init": sp.ptq_init_s, "save": sp.save_s}
        return plan
    shortest = min(x for x in (full_min, ptq_min if sp.ptq_init_s > 0 and tokens is None else math.inf))
    raise BinarizeError(f"--time {format_duration(seconds)} is too short: the shortest conversion of this model "
                        f"needs about {format_duration(shortest / (1 - MARGIN))} on this machine")
