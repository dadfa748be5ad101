"""Multi-process conversion: two CPU processes (gloo, launched by torchrun) train the same model as
one process on the same global batch, record the same tokens and global losses, and only the main
process writes the run and its export; with DDP and with FSDP (sharded end-to-end QAT), and an
FSDP run interrupted by Ctrl-C resumes to the model of an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
WORKER = str(Path(__file__).with_name("fsdp_worker.py"))


def _convert(launcher: list[str], model_dir, text, out, extra=(), env=None) -> subprocess.CompletedProcess:
    # 7 sequences of 64 tokens, 3 per step: steps of 3, 3 and 1 sequences, so the two processes
    # split 2 + 1 and the last step leaves rank 1 without a sequence of its own.
    cli = [] if launcher[-1] == WORKER else ["-m", "binarize"]  # the worker script runs the CLI itself
    args = [*launcher, *cli, "convert", str(model_dir), "--tokens", "448", "--seq-len", "64",
            "--batch-tokens", "192", "--micro-batch", "1", "--bai-steps", "1", "--bai-batch-tokens", "128",
            "--chunks", "2", "--data", str(text), "--set", "lr=1e-2", "--set", "calib_sequences=4",
            "--distill", "1", "--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_process(trained_tiny_dir, small_text, tmp_path_factory):
    """The run the multi-process runs are compared with."""
    out = tmp_path_factory.mktemp("one-process") / "one"
    one = _convert([sys.executable], trained_tiny_dir, small_text, out, ["--export", "none"])
    assert one.returncode == 0, one.stderr[-2000:]
    return out


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_two_processes_train_like_one(trained_tiny_dir, small_text, tmp_path, how, one_process):
    two = _convert(TORCHRUN, trained_tiny_dir, small_text, tmp_path / "two", ["--fsdp"] if how == "fsdp" else [])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and two.stdout.count("exported") == 1  # by the main process only
    r1, r2 = (json.loads((d / "run.json").read_text()) for d in (one_process, tmp_path / "two"))
    assert (r1["processes"], r2["processes"], r1["fsdp"], r2["fsdp"]) == (1, 2, False, how != "ddp")
    assert r1["tokens"] == r2["tokens"] and r2["tokens"]["trained"] == 448
    assert len(r2["steps"]) == 3
    for a, b in zip(r1["steps"], r2["steps"]):  # global means, not rank 0's share
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4, abs=1e-6)
    assert r2["steps"][-1]["loss"] != pytest.approx(r2["steps"][0]["loss"], rel=1e-3)  # lr 1e-2 moved the model
    w1, w2 = (load_file(d / "model.safetensors") for d in (one_process, tmp_path / "two"))
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst
    assert (tmp_path / "two" / "packed" / "binarize.json").exists()
    assert not (tmp_path / "two.partial").exists()


def test_an_interrupted_fsdp_run_resumes_to_the_uninterrupted_model(trained_tiny_dir, small_text, tmp_path,
                                                                    one_process):
    """Launched as `accelerate launch --config_file` launches an FSDP config: by its environment."""
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    launch = [*TORCHRUN, WORKER]
    part = _convert(launch, trained_tiny_dir, small_text, tmp_path / "part", ["--export", "none"],
                    {**fsdp, "BINARIZE_TEST_STOP_AT": "0"})
    # each process exits 130 once the checkpoint is written; torchrun reports the first one's exit as 1
    assert part.returncode != 0 and not (tmp_path / "part").exists(), part.stderr[-3000:]
    state = json.loads((tmp_path / "part.partial" / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["fsdp"]) == (1, True)
    # a sharded checkpoint resumed without FSDP is refused in one line
    plain = _convert([sys.executable], trained_tiny_dir, small_text, tmp_path / "part", ["--resume"])
    assert plain.returncode == 2 and "resume it with --fsdp" in plain.stderr, plain.stderr[-2000:]
    resumed = _convert(launch, trained_tiny_dir, small_text, tmp_path / "part", ["--resume"], fsdp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same model and losses as one process trained without a break
    a, b = (load_file(d / "model.safetensors") for d in (one_process, tmp_path / "part"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (one_process, tmp_path / "part"))
    assert [s["loss"] for s in rb["steps"]] == pytest.approx([s["loss"] for s in ra["steps"]], rel=1e-5)
    assert ra["tokens"] == rb["tokens"] and (rb["processes"], rb["fsdp"]) == (2, True)


def test_two_processes_train_a_mixture_of_experts(tokenizer_dir, small_text, tmp_path):
    """Tokens of a rank's share may route to no token of some expert: DDP must not wait for its gradient."""
    from test_families import make_family

    src = make_family("mixtral", tokenizer_dir, tmp_path / "moe", num_local_experts=8, num_experts_per_tok=1)
    two = _convert(TORCHRUN, src, small_text, tmp_path / "two", ["--export", "none"])
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2 and run["tokens"]["trained"] == 448
    meta = json.loads((tmp_path / "two" / "binarize.json").read_text())
    assert run["quantized_layers"] == len(meta["quantized_layers"])
    assert sum(".experts." in n for n in meta["quantized_layers"]) == 2 * 2 * 8  # 2 blocks x 2 projections x 8
