"""Rope scaling of a GGUF given as MODEL, which transformers' GGUF reader drops.

transformers (5.x) maps a GGUF's ``{arch}.rope.freq_base`` to ``rope_theta`` but neither
``{arch}.rope.scaling.*`` nor llama.cpp's ``rope_freqs`` tensor (llama3 scaling), so a
Llama 3.x GGUF came back with ``rope_type: default``: a different network (logits 6.5 % off,
greedy tokens 65-84 % equal, issue 22). ``restore_rope`` puts the scaling back into the config
before the weights are loaded, or refuses with one line:

* ``rope.scaling.type = linear`` (with ``rope.scaling.factor``) -> ``rope_type: linear``;
* a ``rope_freqs`` tensor (llama.cpp divides each rotary frequency by it) -> ``rope_type: llama3``
  with (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) fitted to
  the per-frequency ratios, then checked: transformers' llama3 frequencies must equal
  ``plain / rope_freqs`` (relative 1e-4), else refused. Only two combinations of the last three
  parameters are observable, so ``original_max_position_embeddings`` is taken from
  ``rope.scaling.original_context_length`` when present, else 8192 (Llama 3's);
* any other scaling type (yarn, longrope, ...) is refused: binarize does not guess it.

The header is read with a small parser of its own: ``gguf.GGUFReader`` parses every tokenizer
string into numpy views (seconds for a 49k vocabulary); this reads the key/value table and the
tensor index only (GGUF v2/v3 layout, llama.cpp ``ggml/include/gguf.h``).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import BinarizeError
from ..families import head_dim

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_F32, _F16 = 0, 1
LLAMA3_ORIGINAL_CONTEXT = 8192


class _Header:
    """Key/values (arrays skipped unless small) and the tensor index of a GGUF file."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self.buf = f.read(1 << 16)
            self.f, self.pos, self.size = f, 0, os.fstat(f.fileno()).st_size
            if self._take(4) != b"GGUF":
                raise BinarizeError(f"{path} is not a GGUF file (bad magic)")
            version, = self._unpack("<I")
            if version not in (2, 3):
                raise BinarizeError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = self._unpack("<QQ")
            self.kv: dict[str, object] = {}
            for _ in range(n_kv):
                key = self._string()
                self.kv[key] = self._value(self._unpack("<I")[0])
            self.tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
            for _ in range(n_tensors):
                name = self._string()
                n_dims, = self._unpack("<I")
                dims = self._unpack("<" + "Q" * n_dims)
                qtype, offset = self._unpack("<IQ")
                self.tensors[name] = (dims, qtype, offset)
            align = int(self.kv.get("general.alignment", 32))
            self.data_start = (self.pos + align - 1) // align * align

    def _take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise BinarizeError(f"{self.path}: truncated or damaged GGUF header (a length past the end of the file)")
        while self.pos + n > len(self.buf):
            more = self.f.read(max(1 << 20, n))
            if not more:
                raise BinarizeError(f"{self.path}: truncated GGUF header")
            self.buf += more
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def _unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))

    def _string(self) -> str:
        n, = self._unpack("<Q")
        return self._take(n).decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("<IQ")
            if etype == _STRING:
                for _ in range(count):
                    self._take(self._unpack("<Q")[0])
                return None  # string arrays (the vocabulary) are not needed here
            if etype in _SCALAR:
                size = struct.calcsize(_SCALAR[etype])
                raw = self._take(size * count)
                return list(struct.unpack("<" + _SCALAR[etype][1] * count, raw)) if count <= 4096 else None
            return [self._value(etype) for _ in range(count)]
        if vtype not in _SCALAR:
            raise BinarizeError(f"{self.path}: unknown GGUF value type {vtype}")
        return self._unpack(_SCALAR[vtype])[0]

    def tensor(self, name: str) -> np.ndarray | None:
        if name not in self.tensors:
            return None
        dims, qtype, offset = self.tensors[name]
        if qtype not in (_F32, _F16):
            raise BinarizeError(f"{self.path}: tensor {name} has GGML type {qtype}, expected F32 or F16")
        dtype = np.float32 if qtype == _F32 else np.float16
        n = math.prod(dims)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + offset)
            data = np.frombuffer(f.read(n * np.dtype(dtype).itemsize), dtype=dtype)
        if data.size != n:
            raise BinarizeError(f"{self.path}: tensor {name} is truncated")
        return data.astype(np.float64)


def gguf_rope_parameters(path: str | Path, config) -> dict | None:
    """The rope parameters (transformers' ``rope_parameters`` dict) the GGUF at ``path`` asks for,
    None when it uses plain rope. ``config`` is the config transformers read from it (head size,
    rope_theta). Raises BinarizeError for a scaling binarize cannot restore exactly."""
    path = Path(path)
    head = _Header(path)
    arch = head.kv.get("general.architecture", "")
    stype = head.kv.get(f"{arch}.rope.scaling.type")
    theta = float(head.kv.get(f"{arch}.rope.freq_base", _params(config).get("rope_theta", 10000.0)))
    freqs = head.tensor("rope_freqs.weight")
    if freqs is not None:
        if stype not in (None, "none", "llama3"):
            raise BinarizeError(f"{path}: rope_freqs together with rope scaling {stype!r} is not restorable")
        orig = int(head.kv.get(f"{arch}.rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT))
        return _fit_llama3(path, config, freqs, theta, orig)
    if stype in (None, "none"):
        return None
    if stype == "linear":
        factor = float(head.kv.get(f"{arch}.rope.scaling.factor", 1.0))
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    raise BinarizeError(f"{path}: rope scaling {stype!r} is dropped by transformers' GGUF reader and binarize does "
                        "not restore it; convert from the original (safetensors) checkpoint instead")


def restore_rope(config, path: str | Path) -> None:
    """Set ``config.rope_parameters`` from the GGUF at ``path`` where the reader left plain rope."""
    params = gguf_rope_parameters(path, config)
    if params is None:
        return
    if _params(config).get("rope_type", "default") not in ("default", params["rope_type"]):
        return  # the reader already restored a scaling of its own: keep it
    config.rope_parameters = params


def _params(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _plain_inv_freq(config, theta: float) -> np.ndarray:
    dim = int(head_dim(config) * _params(config).get("partial_rotary_factor", 1.0))
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _fit_llama3(path: Path, config, ratio: np.ndarray, theta: float, orig: int) -> dict:
    """llama3 parameters whose frequencies are plain / ratio (ratio = llama.cpp's rope_freqs)."""
    plain = _plain_inv_freq(config, theta)
    if ratio.shape != plain.shape:
        raise BinarizeError(f"{path}: rope_freqs has {ratio.size} values for {plain.size} rotary frequencies")
    inv_wave = plain / (2 * math.pi)  # 1 / wavelength
    factor = float(ratio.max())
    if factor <= 1.0 + 1e-6:
        return {"rope_type": "default", "rope_theta": theta}
    # medium band: 1 / ratio = 1/f + s (1 - 1/f), s = A / wavelength - B (A = orig/(h-l), B = l/(h-l))
    s = (1 / ratio - 1 / factor) / (1 - 1 / factor)
    medium = (s > 1e-4) & (s < 1 - 1e-4)
    if medium.sum() >= 2:
        a, neg_b = np.polyfit(inv_wave[medium], s[medium], 1)
        low = -neg_b / a * orig  # l = B orig / A
        high = low + orig / a
    else:  # no smooth band to fit: thresholds between the last unscaled and the first fully scaled wavelength
        wave = 1 / inv_wave
        short = wave[s >= 1 - 1e-4].max() if (s >= 1 - 1e-4).any() else wave.min() / 2
        long = wave[s <= 1e-4].min() if (s <= 1e-4).any() else wave.max() * 2
        if medium.any():
            raise BinarizeError(f"{path}: rope_freqs has one smoothed frequency only; the llama3 scaling is ambiguous")
        high, low = orig / (short * (long / short) ** (1 / 3)), orig / (short * (long / short) ** (2 / 3))
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(high),
              "original_max_position_embeddings": orig, "rope_theta": theta}
    if not (0 < low < high) or not np.allclose(_llama3_inv_freq(plain, params), plain / ratio, rtol=1e-4, atol=0):
        raise BinarizeError(f"{path}: rope_freqs is not a llama3 rope scaling binarize can restore exactly")
    return params


def _llama3_inv_freq(plain: np.ndarray, p: dict) -> np.ndarray:
    """transformers' ``_compute_llama3_parameters`` (modeling_rope_utils), in float64."""
    wave = 2 * math.pi / plain
    orig, lo, hi, f = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"], p["factor"]
    out = np.where(wave > orig / lo, plain / f, plain)
    smooth = (orig / wave - lo) / (hi - lo)
    medium = ~(wave < orig / hi) & ~(wave > orig / lo)
    return np.where(medium, (1 - smooth) * out / f + smooth * out, out)
