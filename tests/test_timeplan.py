"""binarize convert --time (train/timeplan.py, probe.py, timed.py) and the device profiles
(profiles.py): the planner's arithmetic on fake stage speeds, the probe on a tiny model, a timed
conversion that records its plan and keeps it on --resume, and bad input."""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest
import torch

from binarize.cli import main
from binarize.errors import BinarizeError
from binarize.profiles import CPU_PROFILE, CPU_PTQ_PROFILE, profile_overrides, resolve_profile, sized_recipe
from binarize.recipe import load_recipe
from binarize.train import ConvertJob, Interrupted, convert_run
from binarize.train.timeplan import (BW_MAX_READS, BW_MAX_STEPS, BW_MIN_STEPS, CALIB_MAX_SEQUENCES, MARGIN,
                                     QAT_FLOOR_STEPS, QAT_MIN_STEPS, SEQUENCES_KEEP_STEPS, StageSpeeds,
                                     deadline_block_steps, parse_duration, plan_time, revise_blockwise_steps,
                                     revise_qat_steps, sequences_for_steps)
from tests.test_cli_errors import assert_one_line_error, run_cli

# the default model on 2 cores, as the probe measured it (rounded): 30 blocks
CPU = StageSpeeds(n_blocks=30, batch_tokens=1024, spent_s=60.0, init_s=180.0, ptq_init_s=300.0, block_fixed_s=2.0,
                  block_step_s=0.3, last_block_extra_s=5.0, qat_step_s=15.0, gen_token_s=0.05, save_s=10.0)
PTB = dict(data="ptb", corpus_tokens=0, cached_tokens=0, held_out=0, max_epochs=2.0)


@pytest.mark.parametrize("text, seconds", [("20m", 1200), ("1h", 3600), ("1h30m", 5400), ("90s", 90), ("2.5h", 9000),
                                           ("45", 45), (" 8h ", 28800)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0m", "abc", "-5m", "1h30", "m", "1x", "nan", "inf", "", "1h 1h1"])
def test_bad_durations_are_one_error(text):
    with pytest.raises(BinarizeError, match="--time"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [900, 1800, 3600, 4 * 3600, 8 * 3600])
def test_a_plan_fits_the_time_and_says_so_per_stage(seconds):
    plan = plan_time(seconds, CPU, **PTB)
    assert plan.path == "full"
    assert plan.expected_s <= seconds * (1 - MARGIN) + 1e-6
    assert plan.expected_s >= seconds * (1 - MARGIN) - CPU.qat_step_s - CPU.n_blocks * CPU.block_step_s - 1
    assert plan.stages["blockwise"] == pytest.approx(CPU.blockwise_s(plan.blockwise_steps))
    assert plan.stages["qat"] == pytest.approx(plan.tokens / CPU.batch_tokens * CPU.qat_step_s)
    text = "\n".join(plan.lines())
    assert f"block-wise: {plan.blockwise_steps} steps per block" in text and f"{plan.tokens:,} tokens" in text


def test_block_wise_steps_come_before_end_to_end_tokens_up_to_the_measured_most():
    plans = [plan_time(s, CPU, **PTB) for s in (900, 1800, 3600, 4 * 3600, 8 * 3600)]
    steps = [p.blockwise_steps for p in plans]
    assert steps == sorted(steps) and BW_MIN_STEPS <= steps[0] < BW_MAX_STEPS and steps[-1] == BW_MAX_STEPS
    for p in plans:  # until block-wise is full, end-to-end keeps its floor; then it takes the rest
        qat_steps = p.tokens // CPU.batch_tokens
        assert qat_steps <= QAT_FLOOR_STEPS if p.blockwise_steps < BW_MAX_STEPS else qat_steps > QAT_FLOOR_STEPS
    assert plans[-1].tokens > 10 * plans[2].tokens


@pytest.mark.parametrize("seconds", [900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600])
def test_without_an_end_to_end_floor_block_wise_steps_take_the_time_first(seconds):
    plan = plan_time(seconds, CPU, qat_floor=0, **PTB)
    floored = plan_time(seconds, CPU, **PTB)
    assert plan.path == "full" and plan.expected_s <= seconds * (1 - MARGIN) + 1e-6
    assert plan.blockwise_steps >= floored.blockwise_steps
    if plan.blockwise_steps < BW_MAX_STEPS:  # the time is all block-wise steps, none end-to-end
        assert plan.tokens == 0 and plan.blockwise_steps > floored.blockwise_steps
        assert plan.expected_s >= seconds * (1 - MARGIN) - CPU.n_blocks * CPU.block_step_s - CPU.last_block_extra_s
    else:  # block-wise full: the rest goes end-to-end, as with a floor
        assert plan.tokens == floored.tokens > 0
    ready = plan.stages["spent"] + plan.stages["generate"]
    assert revise_blockwise_steps(plan, ready) == plan.blockwise_steps  # the re-plan keeps the recipe's floor


def test_without_a_floor_own_text_is_generated_for_the_calibration_set_and_the_end_to_end_steps_alone():
    sp = dataclasses.replace(CPU, gen_token_s=0.005)
    mine = dict(data="self", corpus_tokens=49_152, held_out=32_768, max_epochs=2.0, qat_floor=0)
    short = plan_time(3600, sp, cached_tokens=0, **mine)
    assert short.tokens == 0 and short.generate_tokens == short.corpus_tokens == 32_768
    assert plan_time(3600, sp, cached_tokens=49_152, **mine).generate_tokens == 0  # a cached larger corpus is free
    long = plan_time(12 * 3600, sp, cached_tokens=0, **mine)  # block-wise full, many end-to-end steps
    assert long.blockwise_steps == BW_MAX_STEPS and long.tokens > 0
    assert long.generate_tokens == long.corpus_tokens >= 32_768 + long.tokens / 2  # read at most twice
    full = sp.spent_s + sp.save_s + sp.init_s + sp.blockwise_s(BW_MAX_STEPS) + 32_768 * sp.gen_token_s
    for left_steps, stage in ((QAT_MIN_STEPS - 1.5, 0), (QAT_MIN_STEPS + 6, QAT_MIN_STEPS)):  # text costs steps too
        edge = plan_time((full + left_steps * sp.qat_step_s) / (1 - MARGIN), sp, cached_tokens=0, **mine)
        assert edge.blockwise_steps == BW_MAX_STEPS and edge.tokens >= stage * sp.batch_tokens
        assert (edge.tokens > 0) == (stage > 0) and edge.corpus_tokens == 32_768 + (edge.tokens // 2 if stage else 0)


def test_without_a_floor_a_left_over_too_short_for_an_end_to_end_stage_is_not_one():
    full = CPU.spent_s + CPU.save_s + CPU.init_s + CPU.blockwise_s(BW_MAX_STEPS)
    for left_steps, stage in ((QAT_MIN_STEPS - 0.5, 0), (QAT_MIN_STEPS + 3.5, QAT_MIN_STEPS + 3)):
        plan = plan_time((full + left_steps * CPU.qat_step_s) / (1 - MARGIN), CPU, qat_floor=0, **PTB)
        assert plan.blockwise_steps == BW_MAX_STEPS and plan.tokens == stage * CPU.batch_tokens


def test_short_times_take_the_ptq_path_and_shorter_ones_are_refused_with_the_minimum():
    full_min = CPU.spent_s + CPU.save_s + CPU.init_s + CPU.blockwise_s(BW_MIN_STEPS) + 4 * CPU.qat_step_s
    plan = plan_time(full_min - 60, CPU, **PTB)
    assert plan.path == "ptq" and plan.tokens == 0 and plan.blockwise_steps == 0
    assert plan.expected_s == pytest.approx(CPU.spent_s + CPU.ptq_init_s + CPU.save_s)
    shortest = (CPU.spent_s + CPU.ptq_init_s + CPU.save_s) / (1 - MARGIN) / 60
    with pytest.raises(BinarizeError, match=rf"too short: the shortest conversion of this model needs about "
                                            rf"{shortest:.1f} min"):
        plan_time(300, CPU, **PTB)
    with pytest.raises(BinarizeError, match="too short"):  # no PTQ path for the method: the full path's minimum
        plan_time(full_min - 60, dataclasses.replace(CPU, ptq_init_s=0.0), **PTB)


def test_tokens_beside_time_are_kept_or_refused_with_the_time_they_need():
    plan = plan_time(3600, CPU, tokens=20_480, **PTB)
    assert plan.tokens == 20_480 and plan.expected_s <= 3600 * (1 - MARGIN)
    assert plan.blockwise_steps > plan_time(3600, CPU, tokens=40_960, **PTB).blockwise_steps
    with pytest.raises(BinarizeError, match=r"--tokens 500,000 beside --time 30.0 min: .* whole job about [0-9.]+ h"):
        plan_time(1800, CPU, tokens=500_000, **PTB)


def test_self_text_is_generated_only_where_it_pays_and_never_read_more_than_max_epochs():
    mine = dict(data="self", corpus_tokens=40_960, held_out=8_192, max_epochs=2.0)
    costly = plan_time(3600, CPU, cached_tokens=0, **mine)  # 40,960 x 0.05 s = 34 min > 25 % of an hour
    assert costly.data == "ptb" and costly.generate_tokens == 0 and "PTB train instead" in costly.notes[0]
    cached = plan_time(3600, CPU, cached_tokens=40_960, **mine)
    assert cached.data == "self" and cached.generate_tokens == 0 and cached.stages["generate"] == 0
    long = plan_time(12 * 3600, CPU, cached_tokens=40_960, **mine)  # more tokens than the corpus allows twice
    assert long.tokens > 2 * (40_960 - 8_192)
    assert long.corpus_tokens >= long.tokens / 2 + 8_192 and long.generate_tokens == long.corpus_tokens
    assert long.stages["generate"] == pytest.approx(long.generate_tokens * CPU.gen_token_s)
    assert long.expected_s <= 12 * 3600 * (1 - MARGIN)
    cheap = plan_time(3600, dataclasses.replace(CPU, gen_token_s=0.001), cached_tokens=0, **mine)
    assert cheap.data == "self" and cheap.generate_tokens == 40_960


@pytest.mark.parametrize("steps, batch, have", [(600, 4, 128), (300, 4, 128), (320, 4, 128), (2000, 4, 128),
                                                (600, 4, 32), (600, 4, 512), (0, 4, 8), (25, 4, 8)])
def test_calibration_sequences_grow_with_the_block_wise_steps_up_to_the_measured_most(steps, batch, have):
    n = sequences_for_steps(steps, batch, have)
    assert n >= have
    if steps * batch <= BW_MAX_READS * have:  # each sequence already read at most BW_MAX_READS times
        assert n == have
    else:
        assert n > have and (n == CALIB_MAX_SEQUENCES or n * BW_MAX_READS >= steps * batch) and n % 64 == 0
        assert n <= max(have, CALIB_MAX_SEQUENCES) and n - 64 < max(have, steps * batch / BW_MAX_READS)


@pytest.mark.parametrize("hours, floor, grows", [(2.0, 32, True), (1.0, 32, True), (1.0, 0, True), (0.5, 0, False)])
def test_a_long_plan_on_own_text_calibrates_on_more_sequences_unless_the_command_line_fixed_them(
        trained_tiny_dir, monkeypatch, hours, floor, grows):
    import binarize.train.probe as probe
    from binarize.models import load_model
    from binarize.train.timed import plan_for_time

    model, tok, src = load_model(str(trained_tiny_dir))
    # the default model's speeds on 2 cores, as the probe of a 1-hour ternary run measured them (rounded)
    sp = dataclasses.replace(CPU, init_s=0.0, block_fixed_s=3.0, block_step_s=0.14, last_block_extra_s=0.0,
                             qat_step_s=13.0, gen_token_s=0.009, save_s=10.0, spent_s=100.0)
    monkeypatch.setattr(probe, "measure_speeds", lambda *a, **k: (sp, probe.PassTimes(0.1, 0.05)))
    recipe = load_recipe("ternary-distill", dict(seq_len=256, batch_tokens=1024, calib_sequences=128, qat_floor_steps=floor,
                                                 blockwise_sequences=128, self_tokens=49_152, data="self", calib="self"))
    out, tokens, plan = plan_for_time(hours * 3600, recipe, model, tok, src, tokens=None, spent_s=1.0)
    assert plan.path == "full" and plan.data == "self" and plan.expected_s <= hours * 3600 * (1 - MARGIN)
    if grows:  # 600 steps of 4 would read 128 sequences ~19 times each, and the time holds them with 256
        assert plan.blockwise_steps * 4 > BW_MAX_READS * 128 and (hours < 2 or plan.blockwise_steps == BW_MAX_STEPS)
        # sized for the smaller set's steps, which the larger set's plan keeps at least 80 % of
        assert 128 < sequences_for_steps(plan.blockwise_steps, 4, 128) <= out.blockwise_sequences == out.calib_sequences
        # the calibration set, and each end-to-end token at most twice (no floor: nothing more)
        assert out.self_tokens == plan.corpus_tokens >= out.calib_sequences * 256 + plan.tokens / 2
        assert floor or plan.corpus_tokens == out.calib_sequences * 256 or plan.tokens
        assert plan.generate_tokens == plan.corpus_tokens and "calibration sequences 128 ->" in plan.notes[-1]
        assert plan.stages["blockwise"] == pytest.approx(
            dataclasses.replace(sp, block_fixed_s=3.0 * out.blockwise_sequences / 128).blockwise_s(plan.blockwise_steps))
    else:  # the steps are few (30 min) and the larger set's text would not pay for itself (PTB train instead)
        assert (out.calib_sequences, out.blockwise_sequences) == (128, 128)
        assert not any("calibration sequences" in n for n in plan.notes)
    kept, _, plan2 = plan_for_time(hours * 3600, recipe, model, tok, src, tokens=None, spent_s=1.0,
                                   fixed=frozenset({"calib_sequences"}))
    assert (kept.calib_sequences, kept.blockwise_sequences) == (128, 128)
    assert not any("calibration sequences" in n for n in plan2.notes)


@pytest.mark.parametrize("share", [1.0, 0.9, SEQUENCES_KEEP_STEPS, 0.75, 0.71])
def test_more_calibration_sequences_are_kept_only_where_they_keep_most_block_wise_steps(monkeypatch, share):
    import binarize.calibration.selfgen as selfgen
    from binarize.train.timed import _more_sequences

    monkeypatch.setattr(selfgen, "is_cached", lambda *a, **k: False)
    recipe = load_recipe("ternary-distill", dict(seq_len=256, batch_tokens=1024, calib_sequences=128,
                                                 blockwise_sequences=128, self_tokens=49_152, data="self", calib="self"))
    mine = dict(data="self", max_epochs=2.0, qat_floor=0)
    plan = plan_time(8 * 3600, CPU, corpus_tokens=49_152, cached_tokens=0, held_out=128 * 256, **mine)
    assert plan.blockwise_steps == BW_MAX_STEPS
    seen = {}

    def planned(sp, corpus, cached, held_out):  # the larger set's plan, at the share of the steps asked
        seen.update(corpus=corpus, held_out=held_out, fixed=sp.block_fixed_s)
        trial = plan_time(8 * 3600, sp, corpus_tokens=corpus, cached_tokens=cached, held_out=held_out, **mine)
        trial.blockwise_steps = round(share * plan.blockwise_steps)
        return trial

    out, kept = _more_sequences(plan, recipe, None, CPU, planned)
    assert seen == dict(corpus=49_152 + 128 * 256, held_out=256 * 256, fixed=2 * CPU.block_fixed_s)
    if share >= SEQUENCES_KEEP_STEPS:
        assert out.blockwise_sequences == out.calib_sequences == 256 and kept is not plan
        assert kept.blockwise_steps == round(share * BW_MAX_STEPS) and "128 -> 256" in kept.notes[-1]
    else:
        assert out is recipe and kept is plan


def test_a_mix_costs_its_self_generated_share_and_falls_back_to_its_own_source():
    mix = dict(data="self+c4:0.5", self_frac=0.5, fallback="c4", corpus_tokens=40_960, held_out=8_192,
               max_epochs=2.0)
    costly = plan_time(3600, CPU, cached_tokens=0, **mix)  # the corpus alone: 34 min of generation
    assert costly.data == "c4" and costly.generate_tokens == 0 and "on c4 instead" in costly.notes[0]
    cheap_sp = dataclasses.replace(CPU, gen_token_s=0.001)
    cheap = plan_time(3600, cheap_sp, cached_tokens=0, **mix)
    assert cheap.data == "self+c4:0.5" and cheap.generate_tokens == 40_960
    assert cheap.stages["generate"] == pytest.approx(40.96)
    long = plan_time(12 * 3600, cheap_sp, cached_tokens=40_960, **mix)
    pure = plan_time(12 * 3600, cheap_sp, cached_tokens=40_960, data="self", corpus_tokens=40_960, held_out=8_192,
                     max_epochs=2.0)
    # half of every step is self-generated: twice the tokens fit a corpus read twice
    assert long.corpus_tokens >= long.tokens * 0.5 / 2 + 8_192 and long.generate_tokens == long.corpus_tokens
    assert pure.corpus_tokens >= pure.tokens / 2 + 8_192 > long.corpus_tokens


def test_a_recipe_without_block_wise_gives_the_time_to_end_to_end_tokens():
    plan = plan_time(3600, CPU, blockwise=False, **PTB)
    assert plan.blockwise_steps == 0 and plan.stages["blockwise"] == 0
    assert plan.tokens // CPU.batch_tokens == int((3600 * (1 - MARGIN) - 60 - 10 - 180) / 15)


def test_profiles_fit_the_device_and_leave_what_the_command_line_sets():
    assert resolve_profile("auto", cuda=False) == "cpu" and resolve_profile("auto", cuda=True) == "recipe"
    used, sized = profile_overrides("auto", {"seq_len": 128}, cuda=False)
    assert used == "cpu" and "seq_len" not in sized and sized["calib_sequences"] == CPU_PROFILE["calib_sequences"]
    assert profile_overrides("auto", {}, cuda=True) == ("recipe", {})
    with pytest.raises(BinarizeError, match="unknown --profile 'gpu'"):
        resolve_profile("gpu")
    # fewer calibration sequences than the profile caches for the block-wise stage: it caches those
    _, fewer = profile_overrides("cpu", {"calib_sequences": 16})
    assert fewer["blockwise_sequences"] == min(16, CPU_PROFILE["blockwise_sequences"]) and "calib_sequences" not in fewer
    _, both = profile_overrides("cpu", {"calib_sequences": 16, "blockwise_sequences": 8})
    assert "blockwise_sequences" not in both
    # a job that trains nothing calibrates on CPU_PTQ_PROFILE's set, its corpus sized to that set alone
    _, ptq = profile_overrides("cpu", {}, ptq=True)
    assert ptq["calib_sequences"] == CPU_PTQ_PROFILE["calib_sequences"] != CPU_PROFILE["calib_sequences"]
    assert ptq["self_tokens"] == 0 and ptq["seq_len"] == CPU_PROFILE["seq_len"]
    _, given = profile_overrides("cpu", {"calib_sequences": 16}, ptq=True)
    assert "calib_sequences" not in given and given["blockwise_sequences"] == 16
    # a recipe that trains nothing at --tokens 0 takes them; --tokens 0 with block-wise steps trains
    assert sized_recipe("ternary-ptq", {}, "cpu", 0)[2].calib_sequences == CPU_PTQ_PROFILE["calib_sequences"]
    for recipe, given, tokens in (("binaryllm-distill", {}, 0), ("ternary-ptq", {"blockwise_steps": 5}, 0),
                                  ("ternary-ptq", {}, 1024)):
        rec = sized_recipe(recipe, given, "cpu", tokens)[2]
        assert (rec.calib_sequences, rec.self_tokens) == (CPU_PROFILE["calib_sequences"], CPU_PROFILE["self_tokens"])
    assert sized_recipe("ternary-ptq", {}, "recipe", 0)[1] == {}


@pytest.mark.parametrize("own_text", [True, False])
def test_the_timed_ptq_path_calibrates_on_own_text_and_counts_its_generation(trained_tiny_dir, monkeypatch, own_text):
    import binarize.calibration.selfgen as selfgen
    import binarize.train.probe as probe
    from binarize.models import load_model
    from binarize.train.timed import plan_for_time

    model, tok, src = load_model(str(trained_tiny_dir))
    # the training stages cannot fit (init_s); gen_token_s 0: the job generates no text
    sp = dataclasses.replace(CPU, init_s=900.0, ptq_init_s=0.0, gen_token_s=0.01 if own_text else 0.0)
    monkeypatch.setattr(probe, "measure_speeds", lambda *a, **k: (sp, probe.PassTimes(0.1, 0.05)))
    monkeypatch.setattr(probe, "init_seconds", lambda *a, **k: 200.0)
    monkeypatch.setattr(selfgen, "is_cached", lambda *a, **k: False)
    recipe = load_recipe("ternary-distill", dict(seq_len=256, batch_tokens=1024, calib_sequences=128,
                                                 blockwise_sequences=128, self_tokens=49_152,
                                                 data="self" if own_text else "ptb", calib="self" if own_text else "ptb"))
    out, tokens, plan = plan_for_time(12 * 60, recipe, model, tok, src, tokens=None, spent_s=1.0)
    assert plan.path == "ptq" and tokens == 0 and out.name == "ternary-ptq"
    assert out.calib_sequences == CPU_PTQ_PROFILE["calib_sequences"] and out.self_tokens == 0
    generation = (out.calib_sequences + 1) * 256 * 0.01 if own_text else 0.0
    assert out.calib == ("self" if own_text else "auto")
    assert plan.stages["init"] == pytest.approx(200.0 + generation)
    fixed, _, _ = plan_for_time(12 * 60, recipe, model, tok, src, tokens=None, spent_s=1.0,
                                fixed=frozenset({"calib_sequences"}))
    assert fixed.calib_sequences == 128


def test_bf16_matmuls_only_where_the_cpu_has_them(tmp_path):
    from binarize.profiles import native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512bw\n")
    assert native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not native_bf16(str(info))
    assert not native_bf16(str(tmp_path / "missing"))


def test_the_probe_times_every_stage_and_leaves_the_model_and_rng_alone(trained_tiny_dir, small_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from binarize.train.probe import init_seconds, measure_speeds, probe_ids

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(trained_tiny_dir)
    recipe = load_recipe("binaryllm-distill", dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, bai_steps=4,
                                                   calib_sequences=8, blockwise_sequences=8, self_batch=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    sp, passes = measure_speeds(model, tok, recipe, spent_s=1.0, generate=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [id(p) for p in model.parameters()] == params  # the one-block copies lent the model its blocks back
    assert sp.n_blocks == 2 and sp.spent_s > 1.0 and sp.ptq_init_s == 0.0
    for name in ("init_s", "block_fixed_s", "block_step_s", "last_block_extra_s", "qat_step_s", "gen_token_s"):
        assert 0 < getattr(sp, name) < 60, name
    assert sp.qat_step_s > passes.student_mb > passes.forward_mb > 0
    ptq = load_recipe("binary-ptq", dict(seq_len=64, calib_sequences=8))
    assert init_seconds(model, ptq, passes, probe_ids(model, ptq)) > 0


def _elapsed_as_planned(plan) -> float:
    return plan.expected_s - plan.stages["qat"] - plan.stages["save"]


def test_the_end_to_end_stage_takes_up_the_earlier_stages_estimate_error():
    plan = plan_time(3600, CPU, **PTB)
    planned = plan.tokens // CPU.batch_tokens
    on_time = revise_qat_steps(plan, _elapsed_as_planned(plan), 0)
    assert planned <= on_time <= planned + 1  # the plan leaves less than a step unused
    late = revise_qat_steps(plan, _elapsed_as_planned(plan) + 10 * CPU.qat_step_s, 0)
    assert on_time - 11 <= late <= on_time - 9  # 10 steps' time lost to the text's generation: 10 steps fewer
    ends = _elapsed_as_planned(plan) + late * CPU.qat_step_s + CPU.save_s
    assert ends <= 3600 * (1 - MARGIN) + 1e-6
    early = revise_qat_steps(plan, _elapsed_as_planned(plan) - 10 * CPU.qat_step_s, 0)
    assert early == pytest.approx(on_time + 10, abs=1)
    assert revise_qat_steps(plan, _elapsed_as_planned(plan) - 10 * CPU.qat_step_s, planned + 3) == planned + 3
    assert revise_qat_steps(plan, 3600.0, 0) == 4  # past the time: the fewest steps a schedule holds


def test_block_wise_steps_are_re_planned_for_the_time_the_text_really_took():
    sp = dataclasses.replace(CPU, gen_token_s=0.005)  # 40,960 tokens: 205 s, worth generating in an hour
    plan = plan_time(3600, sp, data="self", corpus_tokens=40_960, cached_tokens=0, held_out=8_192, max_epochs=2.0)
    assert plan.data == "self" and BW_MIN_STEPS < plan.blockwise_steps < BW_MAX_STEPS
    ready = plan.stages["spent"] + plan.stages["generate"]  # when the text is ready, as planned
    assert revise_blockwise_steps(plan, ready) == plan.blockwise_steps
    per_bw_step = sp.n_blocks * sp.block_step_s + sp.last_block_extra_s
    sooner = revise_blockwise_steps(plan, ready - 10 * per_bw_step)  # decoding took less than the probe said
    assert sooner == min(BW_MAX_STEPS, plan.blockwise_steps + 10)
    later = revise_blockwise_steps(plan, ready + 5 * per_bw_step)
    assert plan.blockwise_steps - 6 <= later <= plan.blockwise_steps - 4
    assert revise_blockwise_steps(plan, 3000.0) == BW_MIN_STEPS  # past what the stages need: the shortest
    assert revise_blockwise_steps(plan_time(12 * 3600, sp, **PTB), 0.0) == BW_MAX_STEPS


@pytest.mark.parametrize("floor", [0, QAT_FLOOR_STEPS])
@pytest.mark.parametrize("speed", [0.8, 1.0, 1.25])
def test_the_block_wise_stage_ends_on_time_at_the_speed_its_blocks_really_run(floor, speed):
    sp = dataclasses.replace(CPU, last_block_extra_s=0.0)
    plan = plan_time(3600, sp, qat_floor=floor, **PTB)
    assert BW_MIN_STEPS < plan.blockwise_steps < BW_MAX_STEPS
    reserve = plan.tokens // sp.batch_tokens  # the end-to-end floor the stage leaves alone (all of it here)
    deadline = 3600 * (1 - MARGIN) - sp.save_s - reserve * sp.qat_step_s
    step_s, fixed_s = speed * sp.block_step_s, speed * sp.block_fixed_s
    elapsed = plan.stages["spent"] + plan.stages["init"]
    steps = plan.blockwise_steps
    for done in range(sp.n_blocks):  # each block asks again once the one before it has run at the real speed
        if done:
            steps = deadline_block_steps(plan, elapsed, sp.n_blocks - done, fixed_s, step_s)
        elapsed += fixed_s + steps * step_s
        if done == 0:
            first = steps
    if speed == 1.0:  # as the probe said: the plan's steps (less than a step of rounding)
        assert abs(steps - plan.blockwise_steps) <= 1
    else:  # faster: more steps, slower: fewer, and the stage ends within a step of its deadline either way
        assert (steps > first) if speed < 1 else (steps < first)
    assert deadline - sp.n_blocks * step_s <= elapsed <= deadline + step_s


def test_the_block_wise_deadline_keeps_the_end_to_end_floor_and_its_bounds():
    plan = plan_time(3600, CPU, **PTB)
    floor_s = plan.tokens // CPU.batch_tokens * CPU.qat_step_s
    n = plan.blockwise_steps  # half the blocks done as planned; the last block's head-KL steps still to come
    mid = plan.stages["spent"] + plan.stages["init"] + 15 * (CPU.block_fixed_s + n * CPU.block_step_s)
    half = deadline_block_steps(plan, mid, 15, CPU.block_fixed_s, CPU.block_step_s)
    assert abs(half - plan.blockwise_steps) <= 1
    no_floor = dataclasses.replace(plan, tokens=0)  # the same time with nothing held back: more steps
    extra = deadline_block_steps(no_floor, mid, 15, CPU.block_fixed_s, CPU.block_step_s)
    per_bw = 15 * CPU.block_step_s + CPU.last_block_extra_s
    assert abs(extra - half - floor_s / per_bw) <= 1
    no_kl = dataclasses.replace(plan, speeds=dataclasses.replace(CPU, last_block_extra_s=0.0))
    assert deadline_block_steps(no_kl, mid, 15, CPU.block_fixed_s, CPU.block_step_s / 100) == BW_MAX_STEPS
    assert deadline_block_steps(plan, 3500.0, 15, CPU.block_fixed_s, CPU.block_step_s) == BW_MIN_STEPS
    ptq = dataclasses.replace(plan, path="ptq", blockwise_steps=0)
    assert deadline_block_steps(ptq, mid, 15, CPU.block_fixed_s, CPU.block_step_s) == 0


def test_the_deadline_reads_the_blocks_this_process_trained_and_records_each_change():
    from binarize.train.timed import block_deadline

    plan = plan_time(3600, CPU, **PTB)
    lines, now = [], [plan.stages["spent"] + plan.stages["init"]]  # the stage starts as planned
    steps_for = block_deadline(plan, 0.0, lines.append, clock=lambda: now[0])

    def ran(steps, step_s):  # one block trained at step_s per step: its record, and the clock moved on
        now[0] += CPU.block_fixed_s + steps * step_s
        return {"wall_s": steps * step_s, "steps": steps, "block_s": CPU.block_fixed_s + steps * step_s}

    resumed = {"wall_s": 1.0, "steps": 5}  # from a checkpoint: no block_s, not a measurement
    assert steps_for(29, [resumed]) == resumed["steps"] and not lines  # nothing measured yet: as it was
    n = plan.blockwise_steps
    blocks = [resumed, ran(n, 2 * CPU.block_step_s)]  # the block ran at half the speed the probe said
    fewer = steps_for(28, blocks)
    assert fewer == deadline_block_steps(plan, now[0], 28, CPU.block_fixed_s, 2 * CPU.block_step_s) < 0.65 * n
    assert plan.revised["blockwise_deadline"] == [[3, fewer]]
    assert len(lines) == 1 and f"{fewer} steps per block for the 28 left" in lines[0]
    blocks.append(ran(fewer, 1.9 * CPU.block_step_s))  # a little faster: a step or two more, not printed
    more = steps_for(27, blocks)
    assert fewer < more < 1.02 * fewer and len(lines) == 1
    assert plan.revised["blockwise_deadline"] == [[3, fewer], [4, more]]
    blocks.append(ran(more, CPU.block_step_s / 2))  # much faster: printed
    assert steps_for(26, blocks) > 1.1 * more and len(lines) == 2


def test_a_left_over_end_to_end_stage_the_block_wise_stage_ran_into_is_dropped_not_squeezed():
    from binarize.train.timed import revise_for_time

    plan = plan_time(8 * 3600, CPU, qat_floor=0, **PTB)  # block-wise full: the rest is a left-over
    planned = plan.tokens // CPU.batch_tokens
    assert plan.blockwise_steps == BW_MAX_STEPS and planned > 100
    end = 8 * 3600 * (1 - MARGIN) - CPU.save_s
    assert revise_qat_steps(plan, end - 10.5 * CPU.qat_step_s, 0) == 10
    assert revise_qat_steps(plan, end - 3.5 * CPU.qat_step_s, 0) == 0  # fewer than QAT_MIN_STEPS fit: none
    floored = plan_time(8 * 3600, CPU, **PTB)
    assert revise_qat_steps(floored, end - 3.5 * CPU.qat_step_s, 0) == QAT_MIN_STEPS  # a floor is kept
    recipe = load_recipe("ternary-distill", dict(seq_len=256, batch_tokens=1024))
    out, tokens, budget, line = revise_for_time(plan, recipe, plan.tokens, chunks=recipe.chunks,
                                                elapsed_s=end - 2 * CPU.qat_step_s, train_blocks=10_000)
    assert tokens == 0 and budget.steps == 0 and "end-to-end QAT dropped" in line
    assert plan.revised["steps"] == 0 and out.blockwise_steps == recipe.blockwise_steps


def test_a_revision_leaves_fixed_tokens_and_the_ptq_path_alone():
    fixed = plan_time(3600, CPU, tokens=20_480, **PTB)
    assert revise_qat_steps(fixed, 0.0, 0) == 20 and revise_qat_steps(fixed, 3000.0, 0) == 20
    full_min = CPU.spent_s + CPU.save_s + CPU.init_s + CPU.blockwise_s(BW_MIN_STEPS) + 4 * CPU.qat_step_s
    ptq = plan_time(full_min - 60, CPU, **PTB)
    assert ptq.path == "ptq" and revise_qat_steps(ptq, 0.0, 0) == 0 and revise_blockwise_steps(ptq, 0.0) == 0


def test_a_revision_the_recipe_cannot_schedule_keeps_the_plan():
    from binarize.train.timed import revise_for_time

    plan = plan_time(3600, CPU, **PTB)
    late = load_recipe("binaryllm", dict(seq_len=256, batch_tokens=1024, switch_at=20))  # quantized from step 20
    assert revise_for_time(plan, late, plan.tokens, chunks=late.chunks, elapsed_s=3500.0,
                           train_blocks=10_000) == (late, plan.tokens, None, None)  # 4 steps could not hold the switch
    assert plan.revised is None
    r = load_recipe("binaryllm", dict(seq_len=256, batch_tokens=1024))
    fitted, tokens, budget, line = revise_for_time(plan, r, plan.tokens, chunks=r.chunks, elapsed_s=3500.0,
                                                   train_blocks=10_000)
    assert tokens == 4 * 1024 and budget.steps == 4 and fitted.chunks == 4 and "re-planned" in line
    assert plan.revised["steps"] == 4


def _fake_speeds(monkeypatch, calls):
    """The probe replaced by fixed speeds of a 2-block model (the plan is then exact arithmetic)."""
    import binarize.train.probe as probe

    sp = StageSpeeds(n_blocks=2, batch_tokens=256, spent_s=1.0, init_s=2.0, ptq_init_s=0.0, block_fixed_s=0.1,
                     block_step_s=0.05, last_block_extra_s=0.0, qat_step_s=0.5, gen_token_s=0.0, save_s=1.0)

    def fake(model, tokenizer, recipe, **kw):
        calls.append(recipe.name)
        return sp, probe.PassTimes(0.1, 0.05)

    monkeypatch.setattr(probe, "measure_speeds", fake)
    return sp


def test_a_timed_conversion_records_its_plan_and_a_resume_keeps_it(trained_tiny_dir, small_text, tmp_path,
                                                                   monkeypatch):
    calls = []
    _fake_speeds(monkeypatch, calls)
    recipe = load_recipe("binaryllm-distill", dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, bai_steps=2,
                                                   calib_sequences=8, blockwise_sequences=8, data=str(small_text),
                                                   calib=str(small_text), save_every=2))
    expected = plan_time(60.0, _fake_speeds(monkeypatch, calls), data=str(small_text), corpus_tokens=0,
                         cached_tokens=0, held_out=0, max_epochs=2.0)
    out = tmp_path / "run"

    def interrupt(step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    job = ConvertJob(str(trained_tiny_dir), None, out, recipe, progress=False, time_s=60.0, on_step=interrupt)
    with pytest.raises(Interrupted):
        convert_run(job)
    assert calls == ["binaryllm-distill"]
    calls.clear()
    import binarize.train.probe as probe

    monkeypatch.setattr(probe, "measure_speeds", lambda *a, **k: pytest.fail("a resumed run measured again"))
    with pytest.raises(BinarizeError, match="differs"):  # another time is another job
        convert_run(dataclasses.replace(job, time_s=120.0, resume=True, on_step=None))
    result = convert_run(dataclasses.replace(job, resume=True, on_step=None))
    rec = json.loads((out / "run.json").read_text())
    assert rec["plan"]["tokens"] == expected.tokens > 0
    revised = rec["plan"]["revised"] or {}
    assert rec["plan"]["blockwise_steps"] == expected.blockwise_steps
    assert rec["recipe"]["blockwise_steps"] == revised.get("blockwise_steps", expected.blockwise_steps)
    blocks = rec["blockwise"]["blocks"]
    assert len(blocks) == 2 and rec["blockwise"]["steps"] == rec["recipe"]["blockwise_steps"] == blocks[0]["steps"]
    # the second block's steps from the first's measured speed (the tiny model outruns the fake probe: more)
    assert revised["blockwise_deadline"] == [[2, blocks[1]["steps"]]] and blocks[1]["steps"] > blocks[0]["steps"]
    assert rec["plan"]["expected_s"] == pytest.approx(expected.expected_s, abs=0.1)
    # the end-to-end stage was re-planned for the time actually left when it started (before the
    # interrupt; the tiny model runs at its own speed, not the fake one), within max_epochs of the
    # training text, and the resume kept it
    planned = expected.tokens // 256
    cap = max(int(2.0 * rec["data"]["train_blocks_available"]) // 4, planned)
    if "steps" in revised:
        assert revised["steps"] == revise_qat_steps(expected, revised["at_s"], cap) != planned
    else:
        revised = {"steps": planned, "tokens": expected.tokens}
    assert revised["tokens"] == rec["tokens"]["requested"] == revised["steps"] * 256
    assert rec["data"]["epochs_over_train_data"] <= max(2.0, planned * 4 / rec["data"]["train_blocks_available"])
    assert rec["plan"]["actual_s"] > 0 and len(result.record.steps) == revised["steps"]


@pytest.mark.parametrize("args, needle", [
    (["--time", "0"], "must be a positive duration"),
    (["--time", "abc"], "is not a duration"),
    ([], "give --time"),
    (["--time", "10m", "--from-scratch"], "--from-scratch takes --tokens"),
])
def test_bad_time_is_one_line_and_writes_nothing(capsys, tiny_model_dir, small_text, tmp_path, args, needle):
    out = tmp_path / "o"
    assert_one_line_error(*run_cli(capsys, "convert", str(tiny_model_dir), "--data", str(small_text), "--out",
                                   str(out), *args), needle)
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_time_too_short_or_contradicting_tokens_is_one_line_before_any_work(capsys, tiny_model_dir, small_text,
                                                                            tmp_path, monkeypatch):
    calls = []
    _fake_speeds(monkeypatch, calls)
    out = tmp_path / "o"
    base = [str(tiny_model_dir), "--data", str(small_text), "--out", str(out), "--seq-len", "64", "--batch-tokens",
            "256", "--set", "calib_sequences=8", "--set", "blockwise_sequences=8"]
    assert_one_line_error(*run_cli(capsys, "convert", *base, "--time", "5s"), "is too short")
    assert_one_line_error(*run_cli(capsys, "convert", *base, "--time", "30s", "--tokens", "1M"),
                          "--tokens 1,000,000 beside --time 30 s")
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_a_model_whose_training_copy_does_not_fit_is_refused_before_the_probe(trained_tiny_dir, small_text,
                                                                              tmp_path, monkeypatch):
    import collections

    import psutil

    import binarize.train.probe as probe
    from binarize.train.preflight import param_bytes
    from transformers import AutoModelForCausalLM

    size = param_bytes(AutoModelForCausalLM.from_pretrained(trained_tiny_dir))
    fake = collections.namedtuple("mem", "available")(2 * size)  # a teacher fits, a training copy does not
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    monkeypatch.setattr(probe, "measure_speeds", lambda *a, **k: pytest.fail("measured what cannot fit"))
    recipe = load_recipe("binaryllm-distill", dict(seq_len=64, batch_tokens=256, calib_sequences=8,
                                                   blockwise_sequences=8, data=str(small_text), calib=str(small_text)))
    out = tmp_path / "o"
    with pytest.raises(BinarizeError, match=r"--time measures the stages on a training copy .* GiB of RAM is free"):
        convert_run(ConvertJob(str(trained_tiny_dir), None, out, recipe, progress=False, time_s=600.0))
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_the_cpu_profile_sizes_a_conversion_and_the_command_line_wins(capsys, tiny_model_dir, small_text, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("BINARIZE_PROFILE", "cpu")
    out = tmp_path / "ptq"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_model_dir), "--tokens", "0", "--recipe", "binary-ptq", "--data", str(small_text),
              "--out", str(out), "--export", "none", "--no-progress", "--set", "hessian_scale_steps=1",
              "--set", "calib_sequences=8"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "cpu profile" in printed and "seq_len 256" in printed and "calib_sequences" not in printed.split("\n")[0]
    rec = json.loads((out / "run.json").read_text())["recipe"]
    assert rec["seq_len"] == CPU_PROFILE["seq_len"] and rec["batch_tokens"] == CPU_PROFILE["batch_tokens"]
    assert rec["calib_sequences"] == 8  # --set wins over the profile
