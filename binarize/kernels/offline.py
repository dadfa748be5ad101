"""Compile the packed-weight kernels for an NVIDIA GPU on a machine that has none.

Triton's wheel ships ptxas, nvdisasm and cuobjdump, so its whole CUDA pipeline (TTIR, TTGIR,
LLVM, PTX, cubin) runs without a GPU. CI uses this to check that the kernels compile for sm_90
for both code widths (the CPU interpreter checks the arithmetic, not the compiler), and
``benchmarks/kernel_sass.py`` counts the machine instructions of every configuration's inner
loop: both kernels are issue-bound at batch 1, so instructions per weight bound their time.

Arguments are specialised the way Triton's JIT does for our shapes: pointers 16-byte aligned,
N, K, KW and the row strides divisible by 16. Must run in a process without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_packed

KERNELS = ("gemv", "dot", "lut")
_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z0-9_]+)")


@dataclass
class Compiled:
    kernel: str
    fmt: str
    dtype: str
    config: triton.Config
    registers: int
    stack_bytes: int
    loop_instructions: int  # machine instructions in the inner (K) loop, per thread
    weights_per_thread: float  # weights one thread decodes per loop iteration
    census: dict[str, int]  # opcode -> count in the inner loop

    @property
    def instructions_per_weight(self) -> float:
        return self.loop_instructions / self.weights_per_thread


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def autotuner(kernel: str, module=None):
    """The autotuned kernel ``kernel`` ("gemv", "dot" or "lut") of a kernels module (another
    revision's, say; None: this one). AttributeError when that revision has no such kernel."""
    if kernel == "lut":
        if module is None:
            from . import lut_gemv as module
        return module._lut_gemv_kernel
    module = module if module is not None else triton_packed
    return {"gemv": module._gemv_kernel, "dot": module._dot_kernel}[kernel]


def compile_config(kernel: str, fmt: str, dtype: str, config: triton.Config, arch: int = 90,
                   module=None, split_k: int = 1) -> Compiled:
    """One autotune configuration of one kernel, compiled for sm_<arch> with ``split_k`` K splits
    (a kernel revision without the SPLIT_K argument ignores it), with its loop census."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline compilation needs a process without TRITON_INTERPRET=1")
    fn = autotuner(kernel, module).fn
    bits = triton_packed.kernel_bits(fmt)
    consts = {"BITS": bits, "HAS_ST": True, "SPLIT_K": split_k, "DOT_FP32": dtype == "fp32", **config.kwargs}
    consts = {a: v for a, v in consts.items() if a in fn.arg_names}  # what this kernel (revision) takes
    ptr = _DTYPES[dtype]
    types = {"x_ptr": ptr, "y_ptr": ptr, "w_ptr": "*i32", "scale_ptr": "*fp32", "st_ptr": "*fp32", "ws_ptr": "*fp32",
             "t_ptr": "*fp32"}
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    aligned = [a for a in fn.arg_names if a not in consts and a not in ("M", "M_BUCKET")]
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()},
                    attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    loop = inner_loop(sass)
    census = collections.Counter(_INSTR.match(line).group(1) for line in loop)
    per_thread = config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_KW"] * (32 // bits) / (32 * config.num_warps)
    return Compiled(kernel, fmt, dtype, config, int(re.search(r"REG:(\d+)", usage).group(1)),
                    int(re.search(r"STACK:(\d+)", usage).group(1)), len(loop), per_thread, dict(census))


def inner_loop(sass: str) -> list[str]:
    """Instruction lines of the longest backward-branch region: the K loop (CPW is unrolled)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.L_x_(\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if _INSTR.match(x)]
            best = body if len(body) > len(best) else best
    return best


