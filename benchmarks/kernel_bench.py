"""Packed-weight Triton kernel against torch bf16 matmul, same device, one run.

Shapes: Llama-3.2-1B projections (out x in = 2048x2048, 2048x8192, 8192x2048) and 4096x4096,
batch 1 / 8 / 64. For each: kernel time, bf16 time, speed-up, and the kernel's achieved
bandwidth (packed weight + scales + activations in, outputs out) as GB/s and as a fraction
of the device's peak if ``--peak-gbs`` is given (H100 SXM: 3350).

    python benchmarks/kernel_bench.py --formats binary,ternary2 --peak-gbs 3350
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="binary,ternary2")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth in GB/s")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: the kernel benchmark needs a GPU (correctness is tested on CPU with TRITON_INTERPRET=1)")
    import triton.testing

    from binarize.kernels import packed_matmul_reference, prepare, prepared_matmul
    from binarize.packing import pack

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("times: CUDA-graph replay (GPU time, as in a graph-captured decode loop) and plain launches "
          "(includes Python/launch overhead); GB/s and % peak from the graph time")
    print("| format | out x in | batch | kernel us (graph) | bf16 us (graph) | speed-up (graph) | kernel us (launch) "
          "| bf16 us (launch) | speed-up (launch) | GB/s | % peak | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        for n, k in SHAPES:
            values = torch.tensor([-1, 1] if fmt == "binary" else [-1, 0, 1], dtype=torch.int8)
            codes = values[torch.randint(len(values), (n, k))]
            q = pack(codes, fmt).cuda()
            kw = prepare(q, fmt, n, k)  # once per layer, as PackedLinear does
            scale = (torch.rand(n) * 0.02).cuda()
            st = (torch.rand(k) + 0.5).cuda()
            w_bf16 = (codes.float() * 0.02).to(torch.bfloat16).cuda()
            for m in (int(b) for b in args.batches.split(",")):
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                kernel = lambda: prepared_matmul(x, kw, scale, st, fmt, n)  # noqa: E731
                dense = lambda: torch.nn.functional.linear(x, w_bf16)  # noqa: E731
                kernel(), dense()  # autotune / compile outside the timed region
                torch.cuda.synchronize()
                g_kernel = _graph_us(kernel)
                g_bf16 = _graph_us(dense)
                t_kernel = triton.testing.do_bench(kernel) * 1e3
                t_bf16 = triton.testing.do_bench(dense) * 1e3
                moved = kw.numel() * 4 + scale.numel() * 4 + st.numel() * 4 + x.numel() * 2 + m * n * 2
                gbs = moved / (g_kernel * 1e-6) / 1e9
                ref = packed_matmul_reference(x.float().cpu(), q.cpu(), scale.cpu(), st.cpu(), fmt, n)
                got = kernel().float().cpu()
                err = float((got - ref).abs().max() / ref.abs().max())
                peak = f"{100 * gbs / args.peak_gbs:.0f}%" if args.peak_gbs else "-"
                print(f"| {fmt} | {n}x{k} | {m} | {g_kernel:.1f} | {g_bf16:.1f} | {g_bf16 / g_kernel:.2f}x | "
                      f"{t_kernel:.1f} | {t_bf16:.1f} | {t_bf16 / t_kernel:.2f}x | {gbs:.0f} | {peak} | {err:.1e} |",
                      flush=True)


def _graph_us(fn) -> float:
    """GPU time of one call, replayed from a captured CUDA graph (launch overhead removed)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3


if __name__ == "__main__":
    main()
