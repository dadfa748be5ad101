"""Recipes: YAML files in ``recipes/`` mapping onto one dataclass, overridable from the CLI.

Unknown keys, wrong types and out-of-range values are rejected with one line naming the
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import BinarizeError
from .schedules import PHASE_INS, SCHEDULERS

PROGRESSIVE_FORMS = ("paper", "max")  # binarize.quantizers.PROGRESSIVE_FORMS (kept torch-free here; a test ties them)


@dataclass
class Recipe:
    """Every knob of a conversion. Defaults are the paper's (BinaryLLM) where it gives one."""

    name: str = "binaryllm"
    description: str = ""
    # --- weight quantizer ---
    method: str = "binary"  # binary (1 bit) | ternary (1.58 bits, BitNet b1.58)
    quantizer: str = "progressive"  # progressive: F(x,t) (ternary: F3) fwd+bwd | ste: hard, straight-through
    progressive_form: str = "paper"  # paper: F(W~/Sa, t) | max: tanh(t W~/max|W~|), row-optimal scale (quantizers.py)
    ternary_scale: str = "absmean"  # ternary gamma: absmean (BitNet b1.58) | absmedian (b1.58 Reloaded)
    per_row: bool = False  # ternary gamma per output row (the papers: one per tensor)
    act_bits: int = 0  # 0: full-precision activations | 8: per-token absmax int8 (BitLinear)
    scheduler: str = "exponential"
    chunks: int = 20
    schedule_span: float = 20.0  # c' = span*c/chunks in the exponential formula
    scaling: str = "dual"  # dual: Sl*Sa | analytic: Sa only | learnable: Sl only (init Sa, frozen Sa)
    sa_grad: bool = False  # let the QAT gradient flow through Sa = mean|W~|
    compile_quantizer: bool = False  # fuse the per-step weight quantizer with torch.compile (compiled_quantizers.py)
    # --- binary-aware initialization ---
    bai: bool = True
    bai_steps: int = 50
    bai_lr: float = 1e-2  # paper gives none; 1e-3 barely moves St in 50 steps (SmolLM2-135M: 13.4 -> 8.4 at 1e-2)
    bai_batch_tokens: int = 4096
    bai_path: bool = False  # False: St fitted at the hard sign (paper) | True: BaI steps cycle t over the schedule (bai.py)
    calib_sequences: int = 128  # size of the calibration set BaI cycles through
    st_min: float = 1e-2  # St is clamped to [st_min, inf) so W/St stays finite
    train_st: bool = False  # keep learning St during QAT (paper: St fixed after BaI)
    share_st: bool = False  # tie St (q/k/v, gate/up, o_proj per KV group) so export folds it away (qlinear.share_st_)
    # --- Hessian-aware initialisation (train/hessian_init.py, gptq.py), after BaI, before block-wise ---
    init: str = "sign"  # sign: plain rounding of the (BaI-scaled) weights | hessian: GPTQ feedback + scale refit
    hessian_feedback: bool = True  # GPTQ error feedback onto the columns not yet quantized
    hessian_refine: int = 2  # rounds of row/column scale refit + re-quantization
    hessian_column_scale: bool = True  # fit St as the column scale (off with share_st)
    hessian_column_init: str = "given"  # given: start from St (1, or BaI's) | svid: OneBit's rank-1 of |W|
    hessian_damp: float = 0.01  # H + damp * mean(diag H) * I
    hessian_inputs: str = "quantized"  # block i's inputs: quantized (blocks 0..i-1 converted) | fp | corrected
    hessian_weight: str = "relative"  # tokens in H: relative (1 / ||W x_t||^2) | plain (GPTQ)
    hessian_scale_steps: int = 0  # then Adam steps on St and Sl by next-token loss, codes fixed (bai.py's search)
    hessian_scale_lr: float = 1e-3
    # --- block-wise reconstruction (train/blockwise.py), after BaI and before end-to-end QAT ---
    blockwise_steps: int = 0  # AdamW steps per decoder block; 0: no block-wise stage
    blockwise_sequences: int = 32  # calibration sequences whose block activations are cached (<= calib_sequences)
    blockwise_batch: int = 4  # sequences per block step
    blockwise_lr: float = 1e-4  # latent weights
    blockwise_scale_lr: float = 1e-3  # Sl, St (train_st), biases and norms
    blockwise_inputs: str = "quantized"  # block i reads: quantized (blocks 0..i-1 converted) | fp (the FP model's)
    blockwise_loss: str = "relative"  # relative: per-token ||y_q - y||^2 / ||y||^2 | mse: plain mean squared error
    blockwise_quantizer: str = "progressive"  # progressive: t schedule within each block | ste: hard sign throughout
    blockwise_last_loss: str = "same"  # the last block's loss: same (blockwise_loss) | kl: KL to the FP logits
    # --- progressive QAT ---
    lr: float = 1e-4
    min_lr: float = 2e-6
    weight_decay: float = 0.1
    warmup_steps: int = 0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    seq_len: int = 2048
    batch_tokens: int = 32768  # tokens per optimizer step (multiple of seq_len)
    micro_batch: int = 1  # sequences per forward; the rest is gradient accumulation
    train_fp: str = "norms"  # which full-precision params train too: none | norms | all
    loss_chunk: int = 1024  # positions whose logits exist at once (train/losses.py); 0: the model's full logits
    loss_backend: str = "auto"  # chunked | liger (liger-kernel) | auto: liger on CUDA where it can (train/liger_loss.py)
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1.3x time)
    cpu_bf16: bool = False  # on a CPU, the block-wise stage's training matmuls under bfloat16 autocast
    # --- data ---
    data: str = "auto"  # auto: PTB train when its local file is found, else self-generated text
    calib: str = "auto"
    self_batch: int = 64  # --data self: sequences generated at once (64: 2x the tokens/s of 16 on a CPU)
    self_temperature: float = 1.0  # LLM-QAT samples from the full softmax
    self_top_p: float = 1.0
    self_greedy_prefix: int = 4  # top-1 tokens after the random first token (LLM-QAT: 3-5)
    self_tokens: int = 0  # size of the self-generated corpus (more steps repeat it in epochs); 0: what the run needs
    max_epochs: float = 2.0  # a fixed self_tokens corpus is enlarged so no token is trained on more often; 0: off
    # --time: end-to-end steps planned before the block-wise stage takes the time (at most a quarter of
    # it, train/timeplan.py); 0: the end-to-end stage gets only what is left once block-wise is at its most
    qat_floor_steps: int = 32
    seed: int = 0
    save_every: int = 0  # steps between checkpoints; 0: only on Ctrl-C and at the end
    # --- continual switch (seed 000): full precision first, quantized from switch_at ---
    switch_at: float = 0.0  # a step (>= 1) or a fraction of the optimizer steps (< 1); 0: quantized throughout
    retain_optimizer: bool = True  # keep AdamW moments across the switch (False: fresh optimizer)
    phase_in: str = "abrupt"  # quantization strength after the switch: abrupt | linear | sigmoid
    phase_in_len: float = 0.1  # linear/sigmoid length: steps (>= 1) or a fraction of the steps (< 1)
    phase_in_steepness: float = 10.0  # sigmoid slope k (see schedules.phase_lambda)
    # --- knowledge distillation from the frozen original model ---
    distill_alpha: float = 0.0  # loss = CE + alpha * tau^2 * KL(teacher || student); 0: off
    distill_temperature: float = 1.0
    distill_ce: float = 1.0  # weight of the next-token CE beside the KL: 1 = CE + KL, 0 = pure logit distillation
    distill_topk: int = 0  # > 0: KL to the teacher's top-k logits, cached per sequence (train/losses.Distill); 0: full
    distill_hidden: float = 0.0  # > 0: + this x per-layer relative hidden-state error to the teacher (losses.Distill)
    qat_latent: bool = True  # False: end-to-end trains scales, biases, norms; latents frozen (EfficientQAT E2E-QP)

    def validate(self) -> "Recipe":
        choices = {
            "method": ("binary", "ternary"),
            "quantizer": ("progressive", "ste"),
            "progressive_form": PROGRESSIVE_FORMS,
            "ternary_scale": ("absmean", "absmedian"),
            "phase_in": PHASE_INS,
            "scheduler": SCHEDULERS,
            "scaling": ("dual", "analytic", "learnable"),
            "train_fp": ("none", "norms", "all"),
            "blockwise_inputs": ("quantized", "fp"),
            "blockwise_loss": ("relative", "mse"),
            "blockwise_quantizer": ("progressive", "ste"),
            "blockwise_last_loss": ("same", "kl"),
            "loss_backend": ("auto", "chunked", "liger"),
            "init": ("sign", "hessian"),
            "hessian_column_init": ("given", "svid"),
            "hessian_inputs": ("quantized", "fp", "corrected"),
            "hessian_weight": ("relative", "plain"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise BinarizeError(f"recipe {self.name}: {key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        positive = ("chunks", "seq_len", "batch_tokens", "micro_batch", "bai_batch_tokens", "calib_sequences", "lr",
                    "blockwise_sequences", "blockwise_batch", "blockwise_lr", "blockwise_scale_lr")
        for key in positive:
            if getattr(self, key) <= 0:
                raise BinarizeError(f"recipe {self.name}: {key} must be positive, got {getattr(self, key)}")
        if not 0 < self.hessian_damp < 1e3 or self.hessian_refine < 0:
            raise BinarizeError(f"recipe {self.name}: hessian_damp must be in (0, 1000) (0 leaves a singular Hessian "
                                f"singular) and hessian_refine >= 0, got {self.hessian_damp}, {self.hessian_refine}")
        if self.act_bits not in (0, 8):
            raise BinarizeError(f"recipe {self.name}: act_bits must be 0 (full precision) or 8, got {self.act_bits}")
        if self.progressive_form == "max" and self.scaling == "learnable":
            raise BinarizeError(f"recipe {self.name}: progressive_form=max is not defined with scaling=learnable "
                                "(its hard-sign limit is Sa, not the frozen Sl); use progressive_form=paper")
        if self.compile_quantizer and self.progressive_form != "paper":
            raise BinarizeError(f"recipe {self.name}: compile_quantizer compiles the paper form only; "
                                f"progressive_form={self.progressive_form!r} runs eager (drop one of the two)")
        if self.method == "ternary" and self.scaling == "learnable":
            raise BinarizeError(f"recipe {self.name}: scaling=learnable (Sl only) is binary-only; ternary "
                                "recipes use analytic (gamma) or dual (Sl * gamma)")
        for key in ("phase_in_len", "phase_in_steepness", "distill_temperature"):
            if getattr(self, key) <= 0:
                raise BinarizeError(f"recipe {self.name}: {key} must be positive, got {getattr(self, key)}")
        for key in ("switch_at", "phase_in_len"):
            v = getattr(self, key)
            if v != int(v) and not 0 <= v < 1:
                raise BinarizeError(f"recipe {self.name}: {key} is a whole step (>= 1) or a fraction in [0, 1), got {v}")
        for key in ("bai_steps", "warmup_steps", "save_every", "min_lr", "weight_decay", "grad_clip", "schedule_span",
                    "switch_at", "distill_alpha", "blockwise_steps", "distill_ce", "loss_chunk", "distill_topk",
                    "hessian_scale_steps", "hessian_scale_lr", "max_epochs", "distill_hidden", "qat_floor_steps"):
            if getattr(self, key) < 0:
                raise BinarizeError(f"recipe {self.name}: {key} must be >= 0, got {getattr(self, key)}")
        if self.distill_ce == 0 and self.distill_alpha == 0:
            raise BinarizeError(f"recipe {self.name}: distill_ce=0 with distill_alpha=0 leaves no loss to train on")
        if self.distill_hidden and not self.distill_alpha:
            raise BinarizeError(f"recipe {self.name}: distill_hidden distils from the teacher that distill_alpha > 0 "
                                "loads (set distill_alpha, e.g. 1.0)")
        if not self.qat_latent and self.scaling == "analytic" and not self.train_st and self.train_fp == "none":
            raise BinarizeError(f"recipe {self.name}: qat_latent=false with scaling=analytic, train_st=false and "
                                "train_fp=none leaves end-to-end QAT nothing to train")
        if self.bai_path and self.quantizer != "progressive":
            raise BinarizeError(f"recipe {self.name}: bai_path fits St along the progressive schedule; "
                                f"quantizer={self.quantizer!r} has none (use bai_path: false)")
        if self.chunks < 2 and self.quantizer == "progressive":
            raise BinarizeError(f"recipe {self.name}: progressive training needs chunks >= 2, got {self.chunks}")
        if self.blockwise_steps and self.blockwise_sequences > self.calib_sequences:
            raise BinarizeError(f"recipe {self.name}: blockwise_sequences {self.blockwise_sequences} is larger than the "
                                f"calibration set (calib_sequences {self.calib_sequences})")
        if self.blockwise_steps and self.blockwise_batch > self.blockwise_sequences:
            raise BinarizeError(f"recipe {self.name}: blockwise_batch {self.blockwise_batch} is larger than "
                                f"blockwise_sequences {self.blockwise_sequences}")
        if self.batch_tokens % self.seq_len:
            raise BinarizeError(f"batch_tokens {self.batch_tokens} is not a multiple of seq_len {self.seq_len}")
        if self.bai_batch_tokens % self.seq_len:
            raise BinarizeError(f"bai_batch_tokens {self.bai_batch_tokens} is not a multiple of seq_len {self.seq_len}")
        for key in ("data", "calib"):
            parse_mix(getattr(self, key))  # raises on bad mix syntax
        from binarize.calibration.selfgen import SelfGenConfig

        try:  # the self-generation settings, checked where generation checks them
            SelfGenConfig(tokens=1, batch_size=self.self_batch, temperature=self.self_temperature,
                          top_p=self.self_top_p, greedy_prefix=self.self_greedy_prefix).check()
        except BinarizeError as exc:
            raise BinarizeError(f"recipe {self.name}: {exc} (keys self_batch, self_temperature, self_top_p, "
                                "self_greedy_prefix)") from None
        if self.self_tokens < 0:
            raise BinarizeError(f"recipe {self.name}: self_tokens must be >= 0 (0: what the run needs), got {self.self_tokens}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                           for b in self.betas):
            raise BinarizeError(f"recipe {self.name}: betas must be two numbers in [0, 1), got {self.betas}")
        return self

    @property
    def calibrates(self) -> bool:
        """An initialisation stage reads the calibration set: BaI, ``init: hessian`` or block-wise."""
        return bool(self.bai or self.init == "hessian" or self.blockwise_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Recipe)}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check a value against the dataclass field's type (YAML and --set strings alike)."""
    if key not in _FIELDS:
        raise BinarizeError(f"{source}: unknown recipe key {key!r} (known: {', '.join(sorted(_FIELDS))})")
    default = getattr(Recipe(), key)
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(value, str) and kind is float:  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
        or (kind is list and isinstance(value, list))
    )
    if ok and kind is float:
        try:
            value = float(value)
        except OverflowError:  # an integer past float's range
            value = math.inf
        ok = math.isfinite(value)
    if not ok:
        article = "an" if kind.__name__[0] in "aeiou" else ("a finite" if kind is float else "a")
        raise BinarizeError(f"{source}: recipe key {key!r} needs {article} {kind.__name__}, got {repr(value)[:80]}")
    return value


def recipe_dir() -> Path:
    return Path(str(resources.files("binarize.recipes")))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """A recipe by shipped name (``binaryllm``) or by path to a YAML file, then overrides."""
    try:
        return _load_recipe(name_or_path, overrides)
    except BinarizeError as exc:  # a path holding a line break still makes one error line
        raise BinarizeError(str(exc).replace("\r", "\\r").replace("\n", "\\n")) from None
    except (OSError, ValueError) as exc:  # a name too long or with a NUL byte; a file that is not UTF-8
        raise BinarizeError(f"cannot read recipe {str(name_or_path)[:80]!r} ({str(exc).splitlines()[0][:80]})") from None


def _load_recipe(name_or_path: str, overrides: dict[str, Any] | None) -> Recipe:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):  # a folder of that name is not a recipe file
        path = recipe_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise BinarizeError(f"unknown recipe {name_or_path!r} (shipped: {', '.join(available_recipes())})")
    elif not path.exists():
        raise BinarizeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise BinarizeError(f"malformed recipe {path}: {first}") from None
    if not isinstance(raw, dict):
        raise BinarizeError(f"malformed recipe {path}: expected a mapping of keys to values")
    values = {k: _coerce(k, v, str(path)) for k, v in raw.items()}
    values.setdefault("name", path.stem)
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = _coerce(k, v, "override")
    return Recipe(**values).validate()


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs."""
    out = {}
    for item in items:
        if "=" not in item:
            raise BinarizeError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_tokens(text: str | int, allow_zero: bool = False) -> int:
    """'2B', '500M', '200k', '1.5M', '12000' -> int; negative or garbage is an error, and so is zero
    unless ``allow_zero`` (``convert --tokens 0``: post-training quantization)."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)([kmbgt]?)", s)
    if not m:
        raise BinarizeError(f"cannot parse token budget {text!r} (use e.g. 200k, 500M, 2B or an integer)")
    n = Fraction(m.group(1)) * _SUFFIX[m.group(2)]  # exact: a float rounds past 2**53
    if n < 0 or (n == 0 and not allow_zero) or n != int(n):
        what = "a whole number of tokens >= 0" if allow_zero else "a positive whole number of tokens"
        raise BinarizeError(f"token budget must be {what}, got {text!r}")
    return int(n)


def _exists(spec: str) -> bool:
    try:
        return Path(spec).exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such file
        return False


def parse_mix(spec: str) -> tuple[str, float]:
    """``self+SPEC:F`` -> (SPEC, F): F of the tokens self-generated, the rest from SPEC.

    Any other spec is returned as (spec, 0.0), or (``""``, 1.0) for plain ``self``.
    """
    if spec == "self":
        return "", 1.0
    if not spec.startswith("self+"):
        if "+" in spec.split("#")[0] and not _exists(spec):
            raise BinarizeError(f"unknown data mix {spec!r}: use self+SOURCE:FRACTION, e.g. self+ptb:0.5")
        return spec, 0.0
    rest, _, frac = spec[5:].rpartition(":")
    try:
        f = float(frac)
    except ValueError:
        f = -1.0
    if not rest or not 0 < f < 1:
        raise BinarizeError(f"unknown data mix {spec!r}: use self+SOURCE:FRACTION with 0 < FRACTION < 1 "
                            "(the share of self-generated tokens)")
    return rest, f
