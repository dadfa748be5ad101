"""Time and peak memory of one QAT step against one full-precision training step.

Both steps use the same model, the same batch and the same trainable parameters (every
linear in the decoder blocks plus the norms, AdamW, gradient clipping); the QAT step differs
only by the QuantLinear swap (progressive F at a mid-schedule t, dual scaling). Each mode
runs in its own subprocess so its peak memory is its own; modes alternate over ``--rounds``
and the medians are compared. Targets (issue 2): time <= 1.15x, memory <= 1.2x.

CPU memory is the peak resident set size sampled during the timed steps (it includes the
interpreter and the loaded model, as a user's process would); on CUDA it is
``torch.cuda.max_memory_allocated``.

    python benchmarks/qat_overhead.py                       # default model, CPU
    python benchmarks/qat_overhead.py --seq-len 2048 --micro-batch 8   # a GPU-sized batch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every few ms while running."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def run_mode(args) -> dict:
    import torch

    from binarize.train.loop import accumulate, trainable_groups
    from binarize.models import load_model, target_linears
    from binarize.qlinear import LayerSpec, quant_layers, quantize_, set_t
    from binarize.recipe import load_recipe
    from binarize.schedules import chunk_t

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, _, _ = load_model(args.model)
    recipe = load_recipe(args.recipe, {"micro_batch": args.micro_batch})
    if args.mode == "qat":
        quantize_(model, LayerSpec.from_recipe(recipe))
        for q in quant_layers(model).values():
            q.fold_st()
        set_t(model, chunk_t(recipe.scheduler, recipe.chunks // 2, recipe.chunks, recipe.schedule_span))
        groups = trainable_groups(model, recipe)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        weights = [lin.weight for lin in target_linears(model).values()]
        norms = [p for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]
        for p in weights + norms:
            p.requires_grad_(True)
        groups = [{"params": weights, "weight_decay": recipe.weight_decay}, {"params": norms, "weight_decay": 0.0}]
    model.to(device).train()
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas))
    params = [p for g in groups for p in g["params"]]
    n_trainable = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (args.micro_batch * args.accum, args.seq_len), generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            accumulate(model, batch, args.micro_batch, lambda loss: loss.backward())
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as mem:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else mem.peak
    return {"mode": args.mode, "device": device, "s_per_step": statistics.median(times), "times": times,
            "peak_bytes": peak, "memory": "cuda max allocated" if cuda else "peak RSS",
            "tokens_per_step": batch.numel(), "trainable_params": n_trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--recipe", default="binaryllm")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating fp/qat subprocess pairs")
    ap.add_argument("--mode", choices=["fp", "qat"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write all measurements here")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return

    results = {"fp": [], "qat": []}
    passthrough = [a for a in sys.argv[1:] if a not in ("--json", args.json)]
    for r in range(args.rounds):
        for mode in ("fp", "qat"):
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--mode", mode],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} run failed:\n{proc.stderr[-2000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode].append(res)
            print(f"round {r + 1} {mode:3s}: {res['s_per_step']:.3f} s/step, {res['memory']} "
                  f"{res['peak_bytes'] / 2**20:,.0f} MiB ({res['tokens_per_step']} tokens/step, {res['device']})",
                  flush=True)
    med = {m: (statistics.median(r["s_per_step"] for r in rs), statistics.median(r["peak_bytes"] for r in rs))
           for m, rs in results.items()}
    t_ratio = med["qat"][0] / med["fp"][0]
    m_ratio = med["qat"][1] / med["fp"][1]
    print(f"time   QAT/FP = {t_ratio:.3f}x  ({med['qat'][0]:.3f} s vs {med['fp'][0]:.3f} s per step; target <= 1.15x)")
    print(f"memory QAT/FP = {m_ratio:.3f}x  ({med['qat'][1] / 2**20:,.0f} vs {med['fp'][1] / 2**20:,.0f} MiB; "
          "target <= 1.2x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "time_ratio": t_ratio, "memory_ratio": m_ratio}, f,
                      indent=2)
    if not (math.isfinite(t_ratio) and math.isfinite(m_ratio)):
        sys.exit(1)


if __name__ == "__main__":
    main()
