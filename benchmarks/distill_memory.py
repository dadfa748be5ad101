"""Memory and time cost of knowledge distillation: the same short conversion with and without it.

Each conversion runs in its own process (so peak RSS is its own), on the same model, data, recipe
and seed; the step time is the mean over the steps after the first.

    python benchmarks/distill_memory.py [MODEL] [--alpha 1.0] [--seq-len 256] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


def run(model: str | None, out: Path, args, alpha: float) -> dict:
    cmd = [sys.executable, "-m", "binarize.cli", "convert", *([model] if model else []),
           "--tokens", str(args.seq_len * args.micro_batch * args.steps), "--recipe", args.recipe,
           "--seq-len", str(args.seq_len), "--batch-tokens", str(args.seq_len * args.micro_batch),
           "--micro-batch", str(args.micro_batch), "--set", "bai=false", "--chunks", "2", "--export", "none",
           "--out", str(out), "--no-progress"]
    if alpha > 0:
        cmd += ["--distill", str(alpha)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    from binarize.train.record import RunRecord

    record = RunRecord.read(out)
    steps = record.steps[1:] or record.steps
    return {"peak": record.peak_memory_mib, "step_s": sum(s.wall_s for s in steps) / len(steps),
            "kd": record.steps[-1].kd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--recipe", default="binaryllm")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain = run(args.model, Path(tmp) / "plain", args, 0.0)
        kd = run(args.model, Path(tmp) / "kd", args, args.alpha)
    key = "cuda_allocated" if "cuda_allocated" in plain["peak"] else "cpu_rss"
    print(f"model {args.model or 'default'}, recipe {args.recipe}, {args.steps} steps of "
          f"{args.micro_batch} x {args.seq_len} tokens")
    print(f"peak memory ({key}): plain {plain['peak'][key]:,.0f} MiB, distill {kd['peak'][key]:,.0f} MiB "
          f"= {kd['peak'][key] / plain['peak'][key]:.3f}x (+{kd['peak'][key] - plain['peak'][key]:,.0f} MiB)")
    print(f"step time: plain {plain['step_s']:.2f} s, distill {kd['step_s']:.2f} s = "
          f"{kd['step_s'] / plain['step_s']:.3f}x  (last KL term {kd['kd']:.4f})")


if __name__ == "__main__":
    main()
