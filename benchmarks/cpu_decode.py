"""CPU decode speed and resident weight memory: packed export (each CPU unpack cache) vs the FP32
transformers model.

Greedy decode of the same prompt, fixed number of new tokens, ``--threads`` threads, the models
alternating over ``--rounds``; prints tokens/s of each, its ratio to FP32, the bytes held by
weights (packed alone and with the cache) and whether each cache's greedy text equals the exact
(``fp32`` cache) one. The CPU's capability (``torch.backends.cpu.get_cpu_capability``) and
whether it has native bf16 (``avx512_bf16`` / ``amx_bf16``) are printed beside: without them
PyTorch converts bf16 to fp32 inside the matmul, and whether the halved weight bytes still win
depends on the CPU (results in ``benchmarks/results/cpu_decode_cpu.md``).

    python benchmarks/cpu_decode.py runs/smollm2-200k/packed
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from binarize.profiles import native_bf16


def decode_tps(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """(tokens/s, the greedy continuation) of ``new_tokens`` tokens after ``ids``."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / (time.perf_counter() - t0), out[0, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", help="a binarize export directory")
    ap.add_argument("--fp", default=None, help="the FP model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-caches", default="fp32,bf16", help="packed layers' CPU paths to compare: none,bf16,fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from binarize.formats.packed_reader import load_packed, resident_bytes
    from binarize.models import load_model

    hf_logging.set_verbosity_error()
    fp, tok, _ = load_model(args.fp)
    caches = {}  # label -> CPU cache mode (None for the FP32 model)
    models = {"fp32 model": fp}
    mem = {}
    for c in args.cpu_caches.split(","):
        packed, _, meta = load_packed(args.packed, c)
        label = f"packed {meta['packing']} / {c} cache"
        models[label], caches[label], mem[label] = packed, c, resident_bytes(packed)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    # warm-up (fills the unpack caches) and the greedy text of each
    texts = {name: decode_tps(m, prompt, 32)[1] for name, m in models.items()}
    tps = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            tps[name].append(decode_tps(m, prompt, args.new_tokens)[0])
    med = {k: statistics.median(v) for k, v in tps.items()}
    mib = 2**20
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}; threads {args.threads}, "
          f"{args.new_tokens} new tokens, prompt {prompt.shape[1]} tokens, {args.rounds} rounds")
    exact = next((n for n, c in caches.items() if c == "fp32"), None)
    for name, m in models.items():
        weights = f"{resident_bytes(m) / mib:7.1f} MiB"
        if name in caches:
            weights = f"{mem[name] / mib:6.1f} MiB packed, {weights} with the cache"
        same = "" if exact is None or name not in caches else \
            f"  greedy 32 tokens {'==' if texts[name] == texts[exact] else '!='} fp32 cache's"
        print(f"{name:28s} {med[name]:6.1f} tok/s  {med[name] / med['fp32 model']:5.2f}x FP32   weights {weights}{same}")


if __name__ == "__main__":
    main()
