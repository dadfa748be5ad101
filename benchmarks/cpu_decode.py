"""CPU decode speed and resident weight memory: packed export vs the FP32 transformers model.

Greedy decode of the same prompt, fixed number of new tokens, ``--threads`` threads, the two
models alternating over ``--rounds``; prints tokens/s of each and their ratio, and the bytes
held by weights (packed alone, packed with the CPU unpack cache, FP32).

    python benchmarks/cpu_decode.py runs/smollm2-200k/packed
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def decode_tps(model, ids: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", help="a binarize export directory")
    ap.add_argument("--fp", default=None, help="the FP model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-cache", default="bf16", help="packed layers' CPU path: none | bf16 | fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from binarize.formats.packed_reader import load_packed, resident_bytes
    from binarize.models import load_model

    hf_logging.set_verbosity_error()
    fp, tok, _ = load_model(args.fp)
    packed, _, meta = load_packed(args.packed, args.cpu_cache)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    mem_packed = resident_bytes(packed)
    for m in (fp, packed):
        decode_tps(m, prompt, 4)  # warm-up (fills the unpack cache)
    mem_cached = resident_bytes(packed)
    tps = {"fp32": [], "packed": []}
    for _ in range(args.rounds):
        tps["fp32"].append(decode_tps(fp, prompt, args.new_tokens))
        tps["packed"].append(decode_tps(packed, prompt, args.new_tokens))
    med = {k: statistics.median(v) for k, v in tps.items()}
    mib = 2**20
    print(f"threads {args.threads}, {args.new_tokens} new tokens, prompt {prompt.shape[1]} tokens, {args.rounds} rounds")
    print(f"FP32              {med['fp32']:6.1f} tok/s   weights {resident_bytes(fp) / mib:7.1f} MiB")
    print(f"packed {meta['packing']:<10s} {med['packed']:6.1f} tok/s   weights {mem_packed / mib:7.1f} MiB packed, "
          f"{mem_cached / mib:.1f} MiB with the {args.cpu_cache} CPU cache")
    print(f"decode speed packed/FP32 = {med['packed'] / med['fp32']:.2f}x")


if __name__ == "__main__":
    main()
