"""``binarize export --format gguf-tq2|gguf-tq1|gguf-q1``: one .gguf file that upstream llama.cpp runs.

Written with the ``gguf`` package's ``GGUFWriter`` and block quantizers, for the families llama.cpp
runs (``gguf_arch.ARCHS``: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt_neox; how each maps is
in that module):

* Converted linears become TQ2_0 (2 bits, 256 per block), TQ1_0 (1.69 bits) or, for binary models,
  Q1_0 (1 bit, 128 per block; llama.cpp decodes a set bit as +d). Binary models may also go out as
  TQ1_0/TQ2_0, simply without zero codes; a ternary model in Q1_0 is refused. Every block's fp16
  scale is its row's merged scale, so the codes are exact and the only error is fp16 rounding of
  the scale (measured per tensor and reported as ``max_scale_rel_error``).
* A row whose length is not a multiple of the block size (SmolLM2-135M's hidden size 576 is not a
  multiple of 256 or 128) falls back per tensor to a 32-weight block type that still holds the
  codes exactly: Q4_0 by default (``fallback="q4_0"``, 4.5 bits: d = the row scale, nibbles 7/8/9 for
  -1/0/+1, packed by hand because gguf's Q4_0 quantizer would pick d = max/-8 and round +s to 7/8 of
  it), or Q8_0 (``fallback="q8_0"``, 8.5 bits: d = s/127, codes +-127 and 0). Rows that fit no
  32-block go out as F16. The report counts the weights that fell back.
* St has no place in a GGUF linear, so it must vanish into neighbouring weights
  (``binarize.families``): q/k/v share one St (recipe option ``share_st``) that multiplies
  ``attn_norm`` (Gemma's whole (1 + w) multiplier; a LayerNorm's bias too); gate/up share one that
  multiplies ``ffn_norm``; o_proj's St (tied per KV group by ``share_st``) multiplies the value rows
  and their bias; down_proj's St multiplies the up rows of a gated MLP. A run whose St is untied
  (the default binaryllm recipe learns one St per layer), or a GPT-NeoX run whose down St is not 1
  (GELU has no linear place for it), is refused with that advice; recipes without BaI have St = 1.
* Biases of converted linears (Qwen2, GPT-NeoX) go out in F32, as do norms.
* For llama, q and k rows are permuted into the rotary layout llama.cpp uses for llama (pairs (i, i + d/2)
  become neighbours), as its own HF converter does; llama3 rope scaling is written as the
  ``rope_freqs`` tensor (the ratio of plain to scaled inverse frequencies).
* Embeddings and a separate lm_head go out in F16 (``outer="q8_0"`` for Q8_0), norms in F32.
* Tokenizer metadata is copied verbatim from the source GGUF when the run was converted from one
  (the default model), otherwise built from the run's byte-level BPE ``tokenizer.json`` (tokens,
  merges, special tokens, chat template); the pre-tokenizer name is read off its structure.
* Runs trained with 8-bit activations are exported too, but llama.cpp runs activations through its
  own 8-bit blocks (Q8_0/Q8_K, finer than one scale per token), so those logits differ a little
  more than for runs with full-precision activations; the report says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..checkpoint import atomic_dir, check_output_dir, write_json
from ..errors import BinarizeError
from ..families import family_of, head_dim, kv_heads, kv_tie
from ..models import decoder_layers
from ..qlinear import quant_layers
from .gguf_arch import GGUFArch, arch_of, rope_params, write_hparams
from .gguf_q1 import _gguf, register_q1_0
from .generation import add_gguf_sampling, gguf_generation
from .gguf_tokenizer import _source_gguf, add_hf_tokenizer_fields, copy_tokenizer_fields
from .latent import load_converted, require_run_dir
from .outer import check_fits
from .registry import GGUF_TIE_ADVICE as TIE_ADVICE
from .registry import FORMATS as ALL_FORMATS
from .registry import Exported, check_fit

FORMATS = tuple(n for n, f in ALL_FORMATS.items() if f.kind == "gguf")
OUTER_TYPES = ("f16", "q8_0")
FALLBACK_TYPES = ("q4_0", "q8_0")


@dataclass
class GGUFReport:
    """What the export wrote, for ``binarize_export.json`` and the CLI summary."""

    format: str
    file: str = ""
    size_bytes: int = 0
    converted_weights: int = 0
    converted_bytes: int = 0
    weights_by_type: dict[str, int] = field(default_factory=dict)
    fallback_tensors: list[str] = field(default_factory=list)
    fallback_weights: int = 0
    max_scale_rel_error: float = 0.0
    tokenizer: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.converted_bytes / max(self.converted_weights, 1)

    def to_dict(self) -> dict:
        return {"format": self.format, "file": self.file, "size_bytes": self.size_bytes,
                "converted_weights": self.converted_weights, "bits_per_weight": self.bits_per_weight,
                "weights_by_type": self.weights_by_type, "fallback_tensors": self.fallback_tensors,
                "fallback_weights": self.fallback_weights, "max_scale_rel_error": self.max_scale_rel_error,
                "tokenizer": self.tokenizer, "notes": self.notes}


def target_type(fmt: str):
    gguf = _gguf()
    return getattr(gguf.GGMLQuantizationType, {"gguf-tq2": "TQ2_0", "gguf-tq1": "TQ1_0", "gguf-q1": "Q1_0"}[fmt])


def check_options(fmt: str, outer: str, fallback: str) -> None:
    if fmt not in FORMATS:
        raise BinarizeError(f"unknown GGUF format {fmt!r} (known: {', '.join(FORMATS)})")
    if outer not in OUTER_TYPES:
        raise BinarizeError(f"--gguf-outer must be one of {', '.join(OUTER_TYPES)}, got {outer!r}")
    if fallback not in FALLBACK_TYPES:
        raise BinarizeError(f"--gguf-fallback must be one of {', '.join(FALLBACK_TYPES)}, got {fallback!r}")


def check_gguf_fit(model, meta: dict, fmt: str) -> GGUFArch:
    """Refuse what the writer cannot hold (one reason, before anything is written); the family's entry."""
    arch = arch_of(model.config)
    check_fit(meta.get("method", "binary"), fmt, "this run")
    if fmt == "gguf-q1" and not hasattr(_gguf().GGMLQuantizationType, "Q1_0"):
        raise BinarizeError("the installed gguf package has no Q1_0 type (pip install -U gguf); binary weights "
                            "are exact in gguf-tq1 / gguf-tq2 too")
    head = model.get_output_embeddings()
    if arch.tied_only and head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise BinarizeError(f"llama.cpp's {arch.name.lower()} architecture has no separate lm_head; this model's "
                            "is untied")
    return arch


@torch.no_grad()
def folded_weights(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(linears, norms, biases): every converted linear as codes * row scale with St moved out of it;
    every norm's whole multiplier (Gemma's 1 + w), St folded in where the norm feeds converted
    linears; the biases of converted linears and norms (parameter names), scaled alike. Raises
    BinarizeError when some St cannot be folded (not tied, or no linear place for it)."""
    family = family_of(model.config)
    groups, hd = kv_tie(model.config)
    qlayers = quant_layers(model)
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    codes, scales, biases, norms = {}, {}, {}, {}
    for name, q in qlayers.items():
        c, s = q.codes()
        codes[name], scales[name] = c.to(torch.int8), s.detach().float().clone()
        if q.bias is not None:
            biases[name + ".bias"] = q.bias.detach().float().clone()
    for name, mod in model.named_modules():  # every norm: its whole multiplier, biases as they are
        w = getattr(mod, "weight", None)
        if name not in qlayers and isinstance(w, torch.Tensor) and w.dim() == 1:
            norms[name] = family.norm_offset + w.detach().float()
            if getattr(mod, "bias", None) is not None:
                biases[name + ".bias"] = mod.bias.detach().float().clone()

    def scale_rows(linear: str, rows, st: torch.Tensor) -> None:
        idx = slice(None) if rows is None else rows
        scales[linear][idx] *= st
        if linear + ".bias" in biases:
            biases[linear + ".bias"][idx] *= st

    for i in range(len(layers)):
        p = f"{prefix}.{i}."
        for norm_name, readers in family.norm_groups:
            sts = [qlayers[p + r].scale_in().detach().float() for r in readers]
            for r, st in zip(readers[1:], sts[1:]):
                if not torch.equal(st, sts[0]):
                    raise BinarizeError(f"{p}{r} and {p}{readers[0]} have different St, which cannot fold into "
                                        f"{norm_name}: {TIE_ADVICE}")
            norms[p + norm_name] *= sts[0]
            if p + norm_name + ".bias" in biases:
                biases[p + norm_name + ".bias"] *= sts[0]
        st_o = qlayers[p + family.o_proj].scale_in().detach().float().view(-1, groups, hd)
        if not torch.equal(st_o, st_o[:, :1].expand_as(st_o)):
            raise BinarizeError(f"{p}{family.o_proj}'s St differs within a KV group, so it cannot fold into "
                                f"the value rows: {TIE_ADVICE}")
        scale_rows(p + family.v_linear, family.v_rows(model.config), st_o[:, 0].reshape(-1))
        st_down = qlayers[p + family.down_proj].scale_in().detach().float()
        if family.up_linear is not None:
            scale_rows(p + family.up_linear, family.up_rows(model.config), st_down)
        elif not torch.all(st_down == 1):
            raise BinarizeError(f"{p}{family.down_proj} has a St that cannot fold through the "
                                f"{model.config.model_type} MLP's activation into a GGUF; export a run without "
                                "BaI (e.g. --recipe bitnet-b158-absmean) or use --format binary")
    weights = {n: codes[n].float() * scales[n].view(-1, 1) for n in qlayers}
    return weights, norms, biases


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp divides each rotary frequency by rope_freqs[i]: plain / llama3-scaled inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base, dim = rope_params(config)["rope_theta"], head_dim(config)
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.double()).float().numpy()


def exact_q4_0(w: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (fp16 d, then byte j = nibble of x[j] | nibble of x[j + 16] << 4, value = (q - 8) d)
    holding rows of code * row scale with d = the row scale and q = code + 8."""
    rows, cols = w.shape
    s = np.abs(w).max(axis=1, keepdims=True)
    codes = np.sign(w).astype(np.int8)
    if not np.array_equal(codes * s, w):
        raise BinarizeError("Q4_0 fallback: a row is not sign/zero codes times one scale")
    q = (codes + 8).astype(np.uint8).reshape(rows, cols // 32, 2, 16)
    d = np.repeat(s.astype(np.float16)[:, :, None], cols // 32, axis=1).view(np.uint8)
    return np.concatenate([d, q[:, :, 0] | (q[:, :, 1] << 4)], axis=-1).reshape(rows, -1)


def _quantize(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes or array, dequantized float32) through gguf's block quantizers (exact Q4_0 by hand)."""
    gguf = _gguf()
    stored = exact_q4_0(w) if qtype == gguf.GGMLQuantizationType.Q4_0 else gguf.quants.quantize(w, qtype)
    return stored, gguf.quants.dequantize(stored, qtype).reshape(w.shape)


def _pick_type(in_features: int, target, fallback):
    gguf = _gguf()
    for qtype in (target, fallback):
        if in_features % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
    return gguf.GGMLQuantizationType.F16


def check_tensors(model, outer_modules: list, linears: dict, norms: dict, biases: dict, outer: str) -> None:
    """The writers' one precision rule (``outer.check_fits``) for every tensor of a GGUF: the
    embedding and an untied lm_head in ``outer`` (f16 holds |x| <= 65504), the folded linears as
    codes times an fp16 block scale (the same range as f16), norms and biases in F32. Raises
    BinarizeError naming the first tensor that does not fit, before anything is written."""
    for mod in outer_modules:
        name = next(n for n, m in model.named_modules() if m is mod) + ".weight"
        check_fits(name, mod.weight.detach(), outer, "use --gguf-outer q8_0" if outer == "f16" else "")
    for name, t in linears.items():
        check_fits(name + ".weight", t.detach(), "f16")
    for name, t in [*norms.items(), *biases.items()]:
        check_fits(name, t.detach(), "f32")


def write_gguf(model, tokenizer, meta: dict, path: Path, fmt: str, *, outer: str = "f16", fallback: str = "q4_0",
               tok_dir: Path | None = None, source_gguf: Path | None = None) -> GGUFReport:
    """Write ``model`` (a converted QuantLinear model) to ``path``; returns what was written."""
    gguf = _gguf()
    check_options(fmt, outer, fallback)
    arch = check_gguf_fit(model, meta, fmt)
    if fmt == "gguf-q1":
        register_q1_0()
    linears, norms, biases = folded_weights(model)
    cfg = model.config
    target = target_type(fmt)
    outer_type = gguf.GGMLQuantizationType.F16 if outer == "f16" else gguf.GGMLQuantizationType.Q8_0
    fallback_type = gguf.GGMLQuantizationType.Q4_0 if fallback == "q4_0" else gguf.GGMLQuantizationType.Q8_0
    model_arch = getattr(gguf.MODEL_ARCH, arch.name)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    report = GGUFReport(format=fmt)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == embed.weight.data_ptr():
        head = None  # tied: written once, as the embedding
    check_tensors(model, [m for m in (embed, head) if m is not None], linears, norms, biases, outer)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[model_arch])
    report.notes += write_hparams(writer, cfg, meta.get("name") or f"binarize {meta.get('recipe', {}).get('name', '')} "
                                  f"{fmt}", arch)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{target.name}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    special_ids, sampling, gen_notes = gguf_generation(getattr(model, "generation_config", None))
    add_gguf_sampling(writer, sampling)
    report.notes += gen_notes
    if source_gguf is not None:
        copy_tokenizer_fields(writer, source_gguf, special_ids)
        report.tokenizer = f"copied from {source_gguf.name}"
    else:
        if tok_dir is None:
            raise BinarizeError("no tokenizer to write into the GGUF metadata")
        pre = add_hf_tokenizer_fields(writer, tokenizer, tok_dir, cfg.vocab_size, special_ids)
        report.tokenizer = f"built from tokenizer.json (pre-tokenizer {pre})"
    if meta.get("act_bits", 0) == 8:
        report.notes.append("trained with int8 per-token activations; llama.cpp quantizes activations in its own "
                            "8-bit blocks instead")

    def raw(qtype):  # block types go in as bytes; F32/F16 arrays carry their own dtype
        return None if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else qtype

    def gguf_name(hf_name: str) -> str:
        found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise BinarizeError(f"no llama.cpp {arch.name.lower()} tensor for {hf_name}")
        return found

    def add_plain(hf_name: str, t: torch.Tensor, qtype) -> None:
        a = t.detach().float().contiguous().numpy()
        stored = a if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(a, qtype)
        writer.add_tensor(gguf_name(hf_name), stored, raw_dtype=raw(qtype))

    def reorder(name: str, t: torch.Tensor) -> torch.Tensor:
        for suffix, rows in (arch.row_order or {}).items():
            if name.removesuffix(".bias").endswith(suffix):
                return t[rows(cfg)]
        return t

    add_plain(next(n for n, m in model.named_modules() if m is embed) + ".weight", embed.weight, outer_type)
    for name, w in linears.items():
        if arch.permute_qk and name.endswith("q_proj"):
            w = permute_rotary(w, cfg.num_attention_heads)
        elif arch.permute_qk and name.endswith("k_proj"):
            w = permute_rotary(w, kv_heads(cfg))
        w = reorder(name, w)
        qtype = _pick_type(w.shape[1], target, fallback_type)
        a = w.contiguous().numpy()
        stored, back = _quantize(a, qtype)
        rows = np.abs(a).max(axis=1)
        ok = rows > 0
        if ok.any():
            err = float((np.abs(back - a).max(axis=1)[ok] / rows[ok]).max())
            report.max_scale_rel_error = max(report.max_scale_rel_error, err)
        writer.add_tensor(gguf_name(name + ".weight"), stored, raw_dtype=raw(qtype))
        report.converted_weights += a.size
        report.converted_bytes += stored.nbytes
        report.weights_by_type[qtype.name] = report.weights_by_type.get(qtype.name, 0) + a.size
        if qtype != target:
            report.fallback_tensors.append(name)
            report.fallback_weights += a.size
    for name, w in norms.items():
        add_plain(name + ".weight", w, gguf.GGMLQuantizationType.F32)
    for name, b in biases.items():
        add_plain(name, reorder(name, b), gguf.GGMLQuantizationType.F32)
    if head is not None:
        add_plain(next(n for n, m in model.named_modules() if m is head) + ".weight", head.weight, outer_type)
    if rope_params(cfg)["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(cfg))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report.size_bytes = path.stat().st_size
    return report


def export_gguf(run_dir: Path, out: Path, fmt: str, *, outer: str = "f16", fallback: str = "q4_0",
                overwrite: bool = False) -> tuple[Path, GGUFReport]:
    """A convert run -> ``out`` (a .gguf file, or a directory holding model.gguf and the report)."""
    check_options(fmt, outer, fallback)
    run_dir, out = Path(run_dir), Path(out)
    require_run_dir(run_dir)
    model, tokenizer, meta = load_converted(run_dir)
    meta = {**meta, "name": run_dir.resolve().name}
    source = _source_gguf(run_dir)

    def write(file: Path) -> GGUFReport:
        return write_gguf(model, tokenizer, meta, file, fmt, outer=outer, fallback=fallback, tok_dir=run_dir,
                          source_gguf=source)

    if out.suffix == ".gguf":
        if out.exists() and not overwrite:
            raise BinarizeError(f"output {out} exists (use --overwrite)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        try:
            report = write(tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        report.file = str(out)
        return out, report
    check_output_dir(out, overwrite)
    with atomic_dir(out) as tmp:
        report = write(tmp / "model.gguf")
        report.file = "model.gguf"
        write_json(tmp / "binarize_export.json", {"binarize_version": __version__, "source_run": str(run_dir),
                                                  "method": meta.get("method"), "recipe": meta.get("recipe", {}),
                                                  **report.to_dict()})
    return out / "model.gguf", report


def export_gguf_format(run_dir: Path, out: Path, fmt: str, *, overwrite: bool = False, gguf_outer: str = "f16",
                       gguf_fallback: str = "q4_0") -> Exported:
    """The registry's entry point: ``export_gguf`` with the CLI's option names and a summary."""
    file, rep = export_gguf(run_dir, out, fmt, outer=gguf_outer, fallback=gguf_fallback, overwrite=overwrite)
    lines = [f"{fmt}: {rep.bits_per_weight:.4f} bits per converted weight, {rep.converted_weights:,} weights "
             f"({', '.join(f'{k} {v:,}' for k, v in rep.weights_by_type.items())}); "
             f"{len(rep.fallback_tensors)} tensors / {rep.fallback_weights:,} weights fell back; "
             f"max scale error {rep.max_scale_rel_error:.2e}; file {rep.size_bytes / 2**20:.1f} MiB"]
    return Exported(file, lines + [f"note: {note}" for note in rep.notes])
