"""Multi-process conversion: two CPU processes (gloo, launched by torchrun) train the same model as
one process on the same global batch, record the same tokens and global losses, and only the main
process writes the run and its export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _convert(launcher: list[str], model_dir, text, out, extra=()) -> subprocess.CompletedProcess:
    # 7 sequences of 64 tokens, 3 per step: steps of 3, 3 and 1 sequences, so the two processes
    # split 2 + 1 and the last step leaves rank 1 without a sequence of its own.
    args = [*launcher, "-m", "binarize", "convert", str(model_dir), "--tokens", "448", "--seq-len", "64",
            "--batch-tokens", "192", "--micro-batch", "1", "--bai-steps", "1", "--bai-batch-tokens", "128",
            "--chunks", "2", "--data", str(text), "--set", "lr=1e-2", "--set", "calib_sequences=4",
            "--distill", "1", "--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_train_like_one(trained_tiny_dir, small_text, tmp_path):
    one = _convert([sys.executable], trained_tiny_dir, small_text, tmp_path / "one", ["--export", "none"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _convert([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], trained_tiny_dir,
                   small_text, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and two.stdout.count("exported") == 1  # by the main process only
    r1, r2 = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["tokens"] == r2["tokens"] and r2["tokens"]["trained"] == 448
    assert len(r2["steps"]) == 3
    for a, b in zip(r1["steps"], r2["steps"]):  # global means, not rank 0's share
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4, abs=1e-6)
    assert r2["steps"][-1]["loss"] != pytest.approx(r2["steps"][0]["loss"], rel=1e-3)  # lr 1e-2 moved the model
    w1, w2 = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst
    assert (tmp_path / "two" / "packed" / "binarize.json").exists()
    assert not (tmp_path / "two.partial").exists()



def test_two_processes_train_a_mixture_of_experts(tokenizer_dir, small_text, tmp_path):
    """Tokens of a rank's share may route to no token of some expert: DDP must not wait for its gradient."""
    from test_families import make_family

    src = make_family("mixtral", tokenizer_dir, tmp_path / "moe", num_local_experts=8, num_experts_per_tok=1)
    two = _convert([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], src, small_text,
                   tmp_path / "two", ["--export", "none"])
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2 and run["tokens"]["trained"] == 448
    meta = json.loads((tmp_path / "two" / "binarize.json").read_text())
    assert run["quantized_layers"] == len(meta["quantized_layers"])
    assert sum(".experts." in n for n in meta["quantized_layers"]) == 2 * 2 * 8  # 2 blocks x 2 projections x 8
