"""Machine-instruction census of the packed-weight kernels, compiled for an H100 without a GPU.

At batch 1 the kernels are issue-bound, not bandwidth-bound: a 4096x4096 binary layer is 2 MiB
of codes (0.6 us at 3.35 TB/s) but 16.8 M weights to decode. So the instructions one weight
costs in the inner loop bound the time from below:

    t >= out * in * instructions_per_weight / (132 SMs * 4 schedulers * 32 lanes * 1.98 GHz)

(on the H100 the measured batch-1 time was about twice that bound: latency, occupancy, launch).
For each autotune configuration this prints registers, stack bytes, the inner loop's
instructions per weight and its top opcodes, and that lower bound for 4096x4096 next to the bf16
matmul's bandwidth time (32 MiB at 3.35 TB/s). ``--against REV`` compiles the kernels of another
git revision side by side and prints the ratio.

    python benchmarks/kernel_sass.py [--against HEAD~1] [--arch 90] [--quick] [--kernels lut]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ISSUE_RATE = 132 * 4 * 32 * 1.98e9  # H100 SXM: thread-instructions per second
SHAPE = (4096, 4096)
BF16_US = SHAPE[0] * SHAPE[1] * 2 / 3.35e12 * 1e6


def revision_module(rev: str, tmp: str):
    """binarize/kernels/triton_packed.py as of ``rev``, imported inside the binarize.kernels package."""
    path = os.path.join(tmp, "triton_packed_rev.py")
    with open(path, "w") as f:
        f.write(subprocess.run(["git", "show", f"{rev}:binarize/kernels/triton_packed.py"], capture_output=True,
                               text=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location("binarize.kernels.triton_packed_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="git revision whose kernels to compile side by side")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--quick", action="store_true", help="first configuration of each kernel only")
    ap.add_argument("--kernels", default=None, help="comma-separated subset of gemv,dot,lut (default: all)")
    args = ap.parse_args()
    from binarize.kernels.offline import KERNELS, autotuner, compile_config

    with tempfile.TemporaryDirectory() as tmp:
        other = revision_module(args.against, tmp) if args.against else None
        print(f"sm_{args.arch}, {args.dtype} activations; bound = issue-bound lower limit for {SHAPE[0]}x{SHAPE[1]} "
              f"(bf16 matmul at 3.35 TB/s: {BF16_US:.1f} us)")
        ref = f" | {args.against} instr/weight | ratio" if other else ""
        print(f"| kernel | format | config | warps | regs | stack | instr/weight | bound us | top opcodes{ref} |")
        print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if other else ""))
        for kernel in args.kernels.split(",") if args.kernels else KERNELS:
            configs = autotuner(kernel).configs[:1] if args.quick else autotuner(kernel).configs
            for fmt in ("binary", "ternary2"):
                for config in configs:
                    c = compile_config(kernel, fmt, args.dtype, config, args.arch)
                    bound = SHAPE[0] * SHAPE[1] * c.instructions_per_weight / ISSUE_RATE * 1e6
                    top = " ".join(f"{k}:{v}" for k, v in sorted(c.census.items(), key=lambda kv: -kv[1])[:5])
                    row = (f"| {kernel} | {fmt} | {config.kwargs} | {config.num_warps} | {c.registers} | "
                           f"{c.stack_bytes} | {c.instructions_per_weight:.2f} | {bound:.1f} | {top} |")
                    if other:
                        try:
                            theirs = autotuner(kernel, other).configs
                        except AttributeError:  # that revision has no such kernel
                            theirs = []
                        same = [o for o in theirs if o.kwargs == config.kwargs and o.num_warps == config.num_warps]
                        if same:
                            o = compile_config(kernel, fmt, args.dtype, same[0], args.arch, module=other)
                            row += f" {o.instructions_per_weight:.2f} | {c.instructions_per_weight / o.instructions_per_weight:.2f} |"
                        else:
                            row += " - | - |"
                    print(row, flush=True)


if __name__ == "__main__":
    main()
