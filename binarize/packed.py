"""PackedLinear: a converted linear layer whose weights stay packed in memory.

y = scale * (codes @ (St * x)) (+ bias). On CUDA the Triton kernel computes it from packed
bits (re-packed once into the kernel's layout, same bits per weight; see kernels/triton_packed).
On CPU there is no such kernel, so the layer unpacks: ``cpu_cache`` chooses the trade-off
between memory and decode speed:

* ``"none"``: unpack on every forward (packed size in memory; slow),
* ``"bf16"``: keep the codes unpacked as bf16 (+-1 and 0 are exact in bf16; 2 bytes/weight,
  half of FP32) and run a bf16 matmul on St * x, then scale in fp32. Activations are rounded
  to bf16, so logits differ from the fp32 reference by ~1e-2 relative,
* ``"fp32"``: keep the dequantized fp32 weight (same memory as the FP model; exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BinarizeError
from .packing import packed_shape, unpack
from .quantizers import dequantize, quantize_activations_int8

CPU_CACHE_MODES = ("none", "bf16", "fp32")
GEMV_KERNELS = ("fma", "lut")  # one-row products on CUDA: triton_packed's FMA kernel or the activation table



def check_cpu_cache(mode: str) -> None:
    """BinarizeError (one line, naming the modes) unless ``mode`` is one of CPU_CACHE_MODES."""
    if mode not in CPU_CACHE_MODES:
        raise BinarizeError(f"--cpu-cache must be one of {', '.join(CPU_CACHE_MODES)}, got {mode!r}")


class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, *, bias: bool = False, has_st: bool = True,
                 cpu_cache: str = "bf16", act_bits: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.register_buffer("qweight", torch.zeros(packed_shape(fmt, out_features, in_features), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("st", torch.ones(in_features) if has_st else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.cpu_cache, self.act_bits = cpu_cache, act_bits
        self.gemv = "fma"  # GEMV_KERNELS; set_gemv
        self._cache: torch.Tensor | None = None
        self._kernel_w: torch.Tensor | None = None  # GPU kernel layout, built at the first CUDA forward

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.fmt, self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight this layer stands for (the quantizer module's reference)."""
        return dequantize(self.codes(), self.scale, self.st)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits == 8:
            x = quantize_activations_int8(x)
        if x.is_cuda:
            from .kernels import prepare, prepared_matmul

            if self._kernel_w is None or self._kernel_w.device != self.qweight.device:
                self._kernel_w = prepare(self.qweight, self.fmt, self.out_features, self.in_features)
            y = prepared_matmul(x, self._kernel_w, self.scale, self.st, self.fmt, self.out_features,
                                lut=self.gemv == "lut")
        elif self.cpu_cache == "bf16":
            if self._cache is None:
                self._cache = self.codes().to(torch.bfloat16)
            xs = x if self.st is None else x * self.st.to(x.dtype)
            y = (F.linear(xs.to(torch.bfloat16), self._cache).float() * self.scale).to(x.dtype)
        else:
            if self.cpu_cache == "fp32" and self._cache is None:
                self._cache = self.dequantized()
            w = self._cache if self._cache is not None else self.dequantized()
            y = F.linear(x, w.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def set_cpu_cache(self, mode: str) -> None:
        self.cpu_cache, self._cache = mode, None

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = self._kernel_w = None  # new weights: both derived copies are stale
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, format={self.fmt}, st={self.st is not None}, "
                f"act_bits={self.act_bits}")


def set_gemv(model: nn.Module, kernel: str) -> int:
    """Choose the one-row (decode) kernel of every PackedLinear in ``model``: ``"fma"``
    (``kernels/triton_packed``) or ``"lut"`` (``kernels/lut_gemv``). Returns the number of layers
    set; ValueError for another name."""
    if kernel not in GEMV_KERNELS:
        raise ValueError(f"unknown GEMV kernel {kernel!r} (known: {', '.join(GEMV_KERNELS)})")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.gemv = kernel
    return len(layers)
