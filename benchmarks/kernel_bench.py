"""Packed-weight Triton kernels against bf16 matmul and the peers GemLite and BitBLAS, same device,
one run (issue 24).

Shapes: Llama-3.2-1B projections (out x in = 2048x2048, 2048x8192, 8192x2048) and 4096x4096,
batch 1 / 8 / 64. For each (format, shape, batch) one row per implementation: time (CUDA-graph
replay, launch overhead removed; plain launches beside it), speed-up over bf16 ``F.linear`` of the
same shape, achieved GB/s (packed weight + scales + activations in, outputs out) and, with
``--peak-gbs``, its share of the device's peak (H100 SXM 3350, H200 4800), and the largest error
relative to the dequantized reference (``binarize.kernels.packed_matmul_reference``).

Implementations:

* ``binarize``: ``binarize.kernels.prepared_matmul`` (binary: 1 bit, ternary2: 2 bits per weight,
  with the per-input-channel scale St applied in the kernel), K split over ``choose_split_k``
  programs where the output tiles alone leave SMs idle; ``binarize split_k=1`` beside it, the
  same kernels without the split. Each row names the configuration the autotuner kept (batch 1:
  per-bit-group rows or whole-word ``TILE3`` tiles; batch > 1: one dot per bit group or one
  ``WHOLE_WORD`` dot per decoded word tile);
* ``binarize lut`` (batch 1): the activation-table kernel (``binarize.kernels.lut_gemv``: one table
  read per 4 bits of weight), the table build counted in its time;
* ``gemlite``: GemLite's ``GemLiteLinear`` (PyPI ``gemlite``) at 1 bit (binary) or 2 bits
  (ternary), the codes in its HQQ form W = (W_q - zero) * scale with groups of 128 (the row scale
  repeated per group; GemLite has no input-channel scale, so it runs without St: less work than ours);
* ``bitblas``: BitBLAS ``Matmul`` with int1 / int2 weights and a per-row scale, where it installs.

A peer that is not installed, or fails to build or run, is a row saying so, never silently
dropped. GemLite is pure Python and travels to a device machine as a wheel built here
(``pip wheel --no-deps gemlite``); BitBLAS's wheel (81 MB) is larger than a device call can carry.

    python benchmarks/kernel_bench.py --formats binary,ternary2 --peak-gbs 4800
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096)]
PEERS = ("gemlite", "bitblas")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:160]


def gemlite_fn(codes: torch.Tensor, row_scale: torch.Tensor, fmt: str, x: torch.Tensor):
    """GemLite's layer for these codes; returns a callable y = layer(x) (codes (N, K) in {-1, 0, 1})."""
    from gemlite import DType, GemLiteLinear

    n, k = codes.shape
    nbits, zero, mult = (1, 0.5, 2.0) if fmt == "binary" else (2, 1.0, 1.0)  # code = (W_q - zero) * mult
    group = 128
    w_q = ((codes.float() / mult) + zero).round().to(torch.uint8).cuda()
    scales = (row_scale.float() * mult).view(n, 1).expand(n, k // group).contiguous().to(torch.bfloat16).cuda()
    zeros = torch.full((n, k // group), zero, dtype=torch.bfloat16, device="cuda")
    layer = GemLiteLinear(nbits, group_size=group, in_features=k, out_features=n, input_dtype=DType.BF16,
                          output_dtype=DType.BF16)
    layer.pack(w_q, scales, zeros, None)
    return lambda: layer(x)


def bitblas_fn(codes: torch.Tensor, row_scale: torch.Tensor, fmt: str, x: torch.Tensor):
    """BitBLAS's matmul for these codes (int1 / int2 weights, one scale per row)."""
    import bitblas

    n, k = codes.shape
    cfg = bitblas.MatmulConfig(M=x.shape[0], N=n, K=k, A_dtype="float16", W_dtype="int1" if fmt == "binary" else "int2",
                               accum_dtype="float32", out_dtype="float16", layout="nt", with_bias=False,
                               group_size=k, with_scaling=True, with_zeros=False)
    op = bitblas.Matmul(config=cfg)
    w = op.transform_weight(codes.to(torch.int8).cuda())
    scale = row_scale.view(n, 1).to(torch.float16).cuda()
    xh = x.to(torch.float16)
    return lambda: op(xh, w, scale=scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="binary,ternary2")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="out x in, comma list")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} (empty: none)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth in GB/s")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: the kernel benchmark needs a GPU (correctness is tested on CPU with TRITON_INTERPRET=1)")
    import triton.testing

    from binarize.kernels import lut_gemv, packed_matmul_reference, prepare, prepared_matmul, triton_packed
    from binarize.packing import pack

    peers = [p for p in args.peers.split(",") if p]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name in peers:
        try:
            mod = __import__(name)
            print(f"peer {name}: {getattr(mod, '__version__', 'installed')}")
        except Exception as exc:  # noqa: BLE001 - a peer that cannot import is reported, not fatal
            print(f"peer {name}: not available ({_one_line(exc)})")
    print("times in us: CUDA-graph replay (GPU time) and plain launches; speed-up = bf16 / implementation, "
          "from the graph times; GB/s and % peak from the graph time")
    print("| format | out x in | batch | implementation | us (graph) | us (launch) | speed-up vs bf16 | GB/s | "
          "% peak | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for fmt in args.formats.split(","):
        for n, k in shapes:
            values = torch.tensor([-1, 1] if fmt == "binary" else [-1, 0, 1], dtype=torch.int8)
            codes = values[torch.randint(len(values), (n, k))]
            q = pack(codes, fmt).cuda()
            kw = prepare(q, fmt, n, k)  # once per layer, as PackedLinear does
            scale = (torch.rand(n) * 0.02 + 0.01).cuda()
            st = (torch.rand(k) + 0.5).cuda()
            w_bf16 = (codes.float() * 0.02).to(torch.bfloat16).cuda()
            for m in (int(b) for b in args.batches.split(",")):
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                impls = {"bf16": (lambda: torch.nn.functional.linear(x, w_bf16), None, n * k * 2),
                         "binarize": (lambda: prepared_matmul(x, kw, scale, st, fmt, n), st, kw.numel() * 4 + (n + k) * 4),
                         "binarize split_k=1": (lambda: prepared_matmul(x, kw, scale, st, fmt, n, split_k=1), st,
                                                kw.numel() * 4 + (n + k) * 4)}
                if m == 1:  # the activation-table kernel (its table build included in the time)
                    impls["binarize lut"] = (lambda: prepared_matmul(x, kw, scale, st, fmt, n, lut=True), st,
                                             kw.numel() * 4 + (n + k) * 4)
                for peer in peers:
                    try:
                        fn = (gemlite_fn if peer == "gemlite" else bitblas_fn)(codes, scale.cpu(), fmt, x)
                        impls[peer] = (fn, None, n * k * (1 if fmt == "binary" else 2) // 8 + n * (k // 128) * 4)
                    except Exception as exc:  # noqa: BLE001
                        print(f"| {fmt} | {n}x{k} | {m} | {peer} | failed: {_one_line(exc)} | | | | | |", flush=True)
                times = {}
                for name, (fn, st_used, weight_bytes) in impls.items():
                    try:
                        fn()  # autotune / compile outside the timed region
                        torch.cuda.synchronize()
                        g = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
                        t = triton.testing.do_bench(fn) * 1e3
                    except Exception as exc:  # noqa: BLE001
                        print(f"| {fmt} | {n}x{k} | {m} | {name} | failed: {_one_line(exc)} | | | | | |", flush=True)
                        continue
                    times[name] = g
                    if name.startswith("binarize"):
                        best = (lut_gemv._lut_gemv_kernel if name == "binarize lut" else triton_packed._gemv_kernel
                                if m == 1 else triton_packed._dot_kernel).best_config
                        split = 1 if "split_k=1" in name else triton_packed.choose_split_k(m, n, kw.shape[0], x.device)
                        name += f" [{best.kwargs}, warps {best.num_warps}, split {split}]"
                    if name == "bf16":
                        ref_w = torch.nn.functional.linear(x.float().cpu(), w_bf16.float().cpu())
                    else:
                        ref_w = packed_matmul_reference(x.float().cpu(), q.cpu(), scale.cpu(), st_used.cpu()
                                                        if st_used is not None else None, fmt, n)
                    got = fn().float().cpu()
                    err = float((got - ref_w).abs().max() / ref_w.abs().max())
                    moved = weight_bytes + x.numel() * 2 + m * n * 2
                    gbs = moved / (g * 1e-6) / 1e9
                    peak = f"{100 * gbs / args.peak_gbs:.0f}%" if args.peak_gbs else "-"
                    speed = f"{times['bf16'] / g:.2f}x" if "bf16" in times else "-"
                    print(f"| {fmt} | {n}x{k} | {m} | {name} | {g:.1f} | {t:.1f} | {speed} | {gbs:.0f} | {peak} | "
                          f"{err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
