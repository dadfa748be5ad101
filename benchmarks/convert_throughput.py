"""Training-step throughput of a conversion: QAT step against the full-precision step, and the
memory options (chunked loss, activation checkpointing), measured side by side in one run.

Every variant trains the same model, batch and trainable parameters (every linear in the decoder
blocks plus the norms; AdamW; gradient clipping) and differs only as named:

* ``fp``: the full-precision model, full-vocabulary logits (transformers' ``labels=`` loss);
* ``qat``: QuantLinear swapped in (progressive F at a mid-schedule t, dual scaling), same loss;
* ``qat-chunked``: ``qat`` with the chunked linear + cross-entropy of ``binarize.train.losses``
  (``--loss-chunk`` positions at a time; no full logits);
* ``qat-chunked-gc``: that plus activation checkpointing (``--grad-checkpointing``);
* ``qat-chunked-compiled``: ``qat-chunked`` with the weight quantizer fused by ``torch.compile``
  (recipe key ``compile_quantizer``, ``binarize/compiled_quantizers.py``; compiled in the warm-up).
* ``qat-liger`` / ``qat-liger-compiled``: ``qat-chunked`` / ``qat-chunked-compiled`` with liger-kernel's
  fused linear cross-entropy instead of binarize's chunked loss (recipe key ``loss_backend``,
  ``binarize/train/liger_loss.py``; its Triton kernel needs CUDA: on a CPU these variants fail).

Models are random-weight LLaMA configs of real shapes, so the benchmark runs offline:
``smollm2-135m`` (SmolLM2-135M) and ``llama-3.2-1b`` (Llama-3.2-1B, 128k vocabulary); ``--layers N``
keeps the first N blocks (the vocabulary and width stay), for machines where the whole model does
not fit or a step takes minutes. Each variant runs in its own subprocess (its peak memory is its
own); variants alternate over ``--rounds`` and the medians are compared to ``fp``.

Reported per variant: seconds per step, tokens/s, model FLOPs utilisation against ``--peak-tflops``
(FLOPs per token = 6 x (block + head parameters) + 12 x layers x hidden x seq, PaLM's count;
activation recomputation is not counted, as MFU defines it), and peak memory (CPU: peak resident
set size sampled during the timed steps; CUDA: ``max_memory_allocated``).

    python benchmarks/convert_throughput.py --shape smollm2-135m --seq-len 512 --micro-batch 2
    python benchmarks/convert_throughput.py --shape llama-3.2-1b --seq-len 2048 --micro-batch 8 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

SHAPES = {  # transformers LlamaConfig fields of the real checkpoints
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         rope_theta=500000.0),
}
VARIANTS = ("fp", "qat", "qat-chunked", "qat-chunked-gc", "qat-chunked-compiled", "qat-liger", "qat-liger-compiled")


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


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SHAPES[args.shape])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=max(2048, args.seq_len), **cfg))


def flops_per_token(model, seq_len: int) -> float:
    """6 N + 12 L d T (PaLM, appendix B) with N the block and head parameters (no embedding lookup)."""
    c = model.config
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    head = c.vocab_size * c.hidden_size
    return 6 * (blocks + head) + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def run_variant(args) -> dict:
    import torch

    from binarize.models import target_linears
    from binarize.qlinear import LayerSpec, quant_layers, quantize_, set_t
    from binarize.recipe import load_recipe
    from binarize.schedules import chunk_t
    from binarize.train.loop import accumulate, trainable_groups
    from binarize.train.losses import TrainLoss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_model(args)
    fpt = flops_per_token(model, args.seq_len)
    v = args.variant
    recipe = load_recipe(args.recipe, {"micro_batch": args.micro_batch, "compile_quantizer": v.endswith("-compiled")})
    if v == "fp":
        for p in model.parameters():
            p.requires_grad_(False)
        weights = [lin.weight for lin in target_linears(model).values()]
        norms = [p for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]
        for p in weights + norms:
            p.requires_grad_(True)
        groups = [{"params": weights, "weight_decay": recipe.weight_decay}, {"params": norms, "weight_decay": 0.0}]
    else:
        quantize_(model, LayerSpec.from_recipe(recipe))
        for q in quant_layers(model).values():
            q.fold_st()
        set_t(model, chunk_t(recipe.scheduler, recipe.chunks // 2, recipe.chunks, recipe.schedule_span))
        groups = trainable_groups(model, recipe)
    if v.endswith("-gc"):
        from binarize.train.run import set_grad_checkpointing

        set_grad_checkpointing(model, True)
    model.to(device).train()
    liger = "liger" in v
    loss_fn = TrainLoss(model, None, args.loss_chunk if "chunked" in v or liger else 0, "liger" if liger else "chunked")
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas))
    params = [p for g in groups for p in g["params"]]
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (args.micro_batch * args.accum, args.seq_len), generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            accumulate(loss_fn, batch, args.micro_batch, lambda loss: loss.backward())
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
    s = statistics.median(times)
    return {"variant": v, "device": device, "s_per_step": s, "times": times, "tokens_per_s": batch.numel() / s,
            "flops_per_token": fpt, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else mem.peak,
            "memory": "cuda max allocated" if cuda else "peak RSS", "tokens_per_step": batch.numel(),
            "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N blocks (0: all)")
    ap.add_argument("--recipe", default="binaryllm")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per forward")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="positions per chunk of the chunked loss")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (dense bf16 TFLOP/s) for MFU")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write all measurements here")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or "fp" not in variants:
        sys.exit(f"--variants must include fp and be among {', '.join(VARIANTS)} (got {args.variants})")
    results = {v: [] for v in variants}
    passthrough = [a for a in sys.argv[1:] if a not in ("--json", args.json)]
    for r in range(args.rounds):
        for v in variants:
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--variant", v], capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"{v} failed:\n{proc.stderr[-2000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[v].append(res)
            print(f"round {r + 1} {v:15s} {res['s_per_step']:8.3f} s/step  {res['peak_bytes'] / 2**20:9,.0f} MiB",
                  flush=True)
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("s_per_step", "tokens_per_s", "peak_bytes")}
           for v, rs in results.items()}
    first = results["fp"][0]
    layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    print(f"\n{args.shape} ({layers} blocks), seq {args.seq_len} x {args.micro_batch * args.accum} sequences per step, "
          f"{first['device']}, {first['memory']}, medians of {args.rounds} rounds x {args.steps} steps")
    print("| variant | s/step | tokens/s | MFU | peak MiB | time / fp | memory / fp |")
    print("|---|---|---|---|---|---|---|")
    for v, m in med.items():
        mfu = (f"{m['tokens_per_s'] * first['flops_per_token'] / (args.peak_tflops * 1e12):.1%}"
               if args.peak_tflops else "-")
        print(f"| {v} | {m['s_per_step']:.3f} | {m['tokens_per_s']:,.0f} | {mfu} | {m['peak_bytes'] / 2**20:,.0f} | "
              f"{m['s_per_step'] / med['fp']['s_per_step']:.3f}x | {m['peak_bytes'] / med['fp']['peak_bytes']:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "medians": med}, f, indent=2)


if __name__ == "__main__":
    main()
