"""Perplexity speed: ``binarize.evaluate.perplexity`` against a plain transformers loop.

The plain loop is the one in transformers' perplexity guide: one window at a time,
``model(input_ids, labels=input_ids).loss``, no inference mode. Both run on the same model,
windows and threads, alternating over ``--rounds``; prints windows/s of each and the ratio,
and checks the two perplexities agree.

    python benchmarks/eval_speed.py --seq-len 2048 --windows 8
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def plain_loop(model, windows: torch.Tensor) -> float:
    losses = []
    for w in windows:
        with torch.no_grad():
            losses.append(float(model(input_ids=w[None], labels=w[None]).loss))
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="any model spec binarize eval accepts (default model)")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1, help="binarize eval's --batch-size (its default: 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from binarize.loading import load_any
    from binarize.evaluate import eval_tokens, perplexity

    model, tok, desc = load_any(args.model, cpu_cache="fp32")
    model.eval()
    ids, _ = eval_tokens(tok, args.dataset)
    windows = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)
    ours_s, plain_s = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ours = perplexity(model, ids, args.seq_len, limit=args.windows, batch_size=args.batch_size)["ppl"]
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain = plain_loop(model, windows)
        plain_s.append(time.perf_counter() - t0)
    o, p = statistics.median(ours_s), statistics.median(plain_s)
    print(f"model: {desc}; {args.dataset}, {args.windows} windows x {args.seq_len}, {args.threads} threads")
    print(f"binarize eval (batch {args.batch_size}): {args.windows / o:.3f} windows/s  ppl {ours:.4f}")
    print(f"plain transformers loop:     {args.windows / p:.3f} windows/s  ppl {plain:.4f}")
    print(f"speed ratio binarize/plain: {p / o:.2f}x   (ppl rel. diff {abs(ours - plain) / plain:.1e})")


if __name__ == "__main__":
    main()
