"""End-to-end decode speed (issue 24): the packed 1-bit model against the same model in bf16, in the
same static-cache loop with a captured decode step (``binarize.decode``), and both through plain
``generate()``; batch 1, greedy. One run prints every figure side by side.

Models: the default model (SmolLM2-135M-Instruct; its weights binarized in place, sign * mean|W|
per row, no training: speed does not depend on training) and a Llama-3.2-1B-shaped model with
random weights (offline). For every (model, path) it prints tokens/s (median of ``--rounds``
after a warm-up), the ratio to bf16 in the same loop, how the step was captured, and whether the
loop's tokens equal ``generate()``'s greedy tokens.

    python benchmarks/gpu_decode.py                      # on a GPU: ~3-5 minutes
    python benchmarks/gpu_decode.py --device cpu --models tiny --new-tokens 8 --rounds 1   # smoke check

Capture: ``torch.compile(mode="reduce-overhead", fullgraph=True)`` first; if the packed layers
cannot be traced whole, ``fullgraph=False``; if that fails too, no capture. The one that ran is
printed, with the first error line of those that did not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {  # name -> LlamaConfig fields (random weights)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True),  # the default model's shape, for machines without its file
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True),
}


def build(name: str, device: str):
    """(bf16 model, packed binary model) for a model name."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from binarize.fake_quant import LayerSpec
    from binarize.formats.packed_writer import pack_model_
    from binarize.packed import PackedLinear
    from binarize.qlinear import quantize_

    if name == "default":
        from binarize.models import load_model

        fp, _, _ = load_model(None)
    else:
        torch.manual_seed(0)
        fp = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    fp = fp.float().eval()
    packed = copy.deepcopy(fp)
    quantize_(packed, LayerSpec(method="binary"))
    with torch.no_grad():
        pack_model_(packed, "binary", "bf16")
    for module in packed.modules():  # everything but the packed layers (codes, fp32 scales) in bf16, as fp
        if not isinstance(module, PackedLinear):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    return fp.to(device, torch.bfloat16), packed.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def run_loop(model, ids, n: int, device: str, compile: bool):
    """(the callable that ran, how it was captured, errors of the captures that failed)."""
    from binarize.decode import decode

    errors = []
    options = [("fullgraph", dict(compile=True, fullgraph=True)), ("graph breaks", dict(compile=True, fullgraph=False)),
               ("none", dict(compile=False))] if compile else [("none", dict(compile=False))]
    for how, kw in options:
        fn = lambda kw=kw: decode(model, ids, n, **kw)  # noqa: E731
        try:
            fn()  # warm-up / capture
            return fn, how, errors
        except Exception as exc:  # a capture that cannot trace the layers: report, try the next
            errors.append(f"{how}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    raise RuntimeError("; ".join(errors))


def generate_fn(model, ids, n: int):
    def fn():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
        return out[:, ids.shape[1]:]
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="default,llama-1b", help="comma list of: default, " + ", ".join(SHAPES))
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="run the loop without capturing the step")
    ap.add_argument("--gemv", default=None, help="comma list of the packed model's one-row kernels, fma and lut "
                    "(binarize.packed.set_gemv; default both on CUDA, fma elsewhere: the CPU path has no kernel)")
    args = ap.parse_args()
    from binarize.packed import set_gemv

    gemvs = (args.gemv or ("fma,lut" if args.device.startswith("cuda") else "fma")).split(",")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --device cpu for a smoke check)")
    name_of = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {name_of}, torch {torch.__version__}, prompt {args.prompt_len}, new tokens {args.new_tokens}, "
          f"batch 1, greedy, median of {args.rounds}")
    print("| model | path | capture | tokens/s | vs bf16 same path | same tokens as generate() |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        fp, packed = build(name, args.device)
        torch.manual_seed(1)
        ids = torch.randint(0, fp.config.vocab_size, (1, args.prompt_len), device=args.device)
        results = {}
        for label, model, gemv in [("bf16", fp, None)] + [(f"packed binary ({g} GEMV)", packed, g) for g in gemvs]:
            if gemv is not None:
                set_gemv(model, gemv)
            gen = generate_fn(model, ids, args.new_tokens)
            gen()  # warm-up
            loop, how, errors = run_loop(model, ids, args.new_tokens, args.device, not args.no_compile)
            times = {"loop": [], "generate": []}
            outs = {}
            for _ in range(args.rounds):  # alternate the two paths
                for path, fn in (("loop", loop), ("generate", gen)):
                    dt, outs[path] = timed(fn, args.device)
                    times[path].append(dt)
            same = torch.equal(outs["loop"], outs["generate"][:, :outs["loop"].shape[1]])
            for path in ("loop", "generate"):
                tps = args.new_tokens / statistics.median(times[path])
                results[(label, path)] = (tps, how if path == "loop" else "-", same, errors if path == "loop" else [])
        for (label, path), (tps, how, same, errors) in results.items():
            ratio = tps / results[("bf16", path)][0]
            print(f"| {name} | {label}, {'static-cache loop' if path == 'loop' else 'generate()'} | {how} | "
                  f"{tps:.1f} | {ratio:.2f}x | {'yes' if same else 'NO'} |")
            for e in errors:
                print(f"|   | capture failed | {e} | | | |")
        for g in gemvs:
            loop_vs_gen = results[(f"packed binary ({g} GEMV)", "loop")][0] / results[("bf16", "generate")][0]
            print(f"| {name} | packed ({g} GEMV) loop vs bf16 generate() | | | {loop_vs_gen:.2f}x | |")
        del fp, packed
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
