#!/usr/bin/env bash
# Every GPU figure the open issues ask for, in one device call of about 9 minutes (issues 21 and 24):
#
#   bash benchmarks/gpu_session.sh          # results under $OUT (the device tool's folder), else gpu-results/
#
# 1. kernel_bench: packed kernels (with and without split-K; the lookup-table GEMV at batch 1)
#    against bf16, GemLite and BitBLAS
#    (4 shapes x batch 1/8/64)                                                                 ~2.5 min
# 2. convert_throughput, SmolLM2-135M and Llama-3.2-1B shapes, seq 2048: QAT step against the
#    full-precision step, eager and compiled weight quantizer, chunked or liger loss (1B), MFU
#    against 989 TFLOP/s (bf16)                                                                ~2.5 + 3 min
# 3. gpu_decode: static-cache captured decode loop, packed binary (FMA and lookup-table GEMV)
#    against bf16 and generate()                                                              ~2 min
#
# Everything runs offline on random weights of the real shapes (the default model's GGUF is larger
# than a device call carries). Wheels in .whl/ are installed first: GemLite and liger-kernel are pure
# Python, so `pip download --no-deps gemlite liger-kernel -d .whl` here and `carry: [".whl"]` bring
# them. Each step has its own time limit; a step that fails or runs out leaves its partial output
# and the next one still runs.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
. benchmarks/gpu_wheels.sh
install_wheels
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt" 2>&1

step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name ($*)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.md"
  echo "exit ${PIPESTATUS[0]} (124: ran past ${limit} s)" | tee -a "$OUT/$name.md"
}

step kernel_bench 195 python3 benchmarks/kernel_bench.py --peak-gbs 4800
step convert_throughput_135m 120 python3 benchmarks/convert_throughput.py --shape smollm2-135m --seq-len 2048 \
  --micro-batch 8 --peak-tflops 989 --variants fp,qat-chunked,qat-chunked-compiled --steps 5 --rounds 2 \
  --json "$OUT/convert_throughput_135m.json"
step convert_throughput_1b 150 python3 benchmarks/convert_throughput.py --shape llama-3.2-1b --seq-len 2048 \
  --micro-batch 4 --peak-tflops 989 --variants fp,qat-chunked,qat-chunked-compiled,qat-liger-compiled --steps 3 \
  --rounds 2 --json "$OUT/convert_throughput_1b.json"
step gpu_decode 115 python3 benchmarks/gpu_decode.py --models smollm2-135m,llama-1b --rounds 2
