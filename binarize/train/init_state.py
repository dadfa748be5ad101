"""A conversion's initialisation, kept and reused: ``--save-init`` / ``--init-from RUN``.

Binary-aware initialization and the block-wise stage read only the calibration set, the model and
the recipe's initialisation keys; the token budget of end-to-end QAT does not enter them. On the
default model they cost 20-40 minutes of a 2-core CPU (block-wise: 35-65 s per block), so a second
conversion of the same model and recipe at another budget (a quality curve, a longer run after a
short one) should not pay for them again.

* ``binarize convert ... --save-init`` keeps the model state at the start of end-to-end QAT in
  ``OUT/init/``: ``model.safetensors`` (latent weights, scales, norms: the training layout),
  ``rng.pt`` (torch and Python RNG state at that point) and ``init.json`` (the key below, the BaI
  and block-wise records and their wall time in seconds).
* ``binarize convert ... --init-from RUN`` loads it instead of running BaI and block-wise. With the
  RNG state restored, the rest of the run is the run ``--save-init`` would have made at the new
  budget (``tests/test_init_state.py`` checks the latent weights are equal to a plain run's).

The key: the model spec and a SHA-256 of its files, a SHA-256 of the calibration token ids (which
also pins the calibration source, its size and the self-generated text) and every recipe key except
``QAT_ONLY``; a run whose key differs is refused in one line naming the first differing key, before
any output is written (``identity.first_difference``, the comparison ``--resume`` makes too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ..checkpoint import atomic_dir, rng_state, set_rng_state, write_json
from ..errors import BinarizeError
from ..recipe import Recipe
from .identity import first_difference, tokens_sha256

INIT = "init"
# Recipe keys only end-to-end QAT reads (optimizer, batch, loss, text, the continual switch): two
# runs that differ only in these (and in --tokens) share one initialisation.
QAT_ONLY = frozenset({
    "name", "description", "lr", "min_lr", "weight_decay", "warmup_steps", "betas", "grad_clip",
    "batch_tokens", "micro_batch", "loss_chunk", "loss_backend", "grad_checkpointing", "save_every", "data",
    "switch_at", "retain_optimizer", "phase_in", "phase_in_len", "phase_in_steepness",
    "distill_alpha", "distill_temperature", "distill_ce", "distill_topk", "distill_hidden", "qat_latent",
})


def init_key(recipe: Recipe, model_spec: str, calib: torch.Tensor, model_sha256: str | None = None) -> dict[str, Any]:
    """What decides the initialisation: the model (spec and, when given, the SHA-256 of its files),
    calibration ids (SHA-256 of their int64 bytes, shape (sequences, seq_len)) and the recipe
    without ``QAT_ONLY``."""
    key = {"model": model_spec, "calib_sha256": tokens_sha256(calib),
           "recipe": {k: v for k, v in recipe.to_dict().items() if k not in QAT_ONLY}}
    if model_sha256 is not None:
        key["model_sha256"] = model_sha256
    return key


def read_init(run: Path) -> dict[str, Any]:
    """``RUN/init/init.json``; BinarizeError (one line) when RUN holds no saved initialisation."""
    path = Path(run) / INIT / "init.json"
    if not path.is_file() or not (path.parent / "model.safetensors").is_file():
        raise BinarizeError(f"--init-from {run}: no saved initialisation there "
                            f"(convert with --save-init to keep one in OUT/{INIT}/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BinarizeError(f"--init-from {run}: corrupt {path}") from None


def check_init(run: Path, saved: dict[str, Any], key: dict[str, Any]) -> None:
    """Refuse an initialisation made for another model, calibration set or recipe (one line; the
    comparison of ``identity.first_difference``, as ``--resume`` makes it)."""
    diff = first_difference(saved.get("key", {}), key, ignore=QAT_ONLY)
    if diff:
        hint = "; only end-to-end keys and --tokens may differ" if diff.startswith("recipe key") else ""
        raise BinarizeError(f"--init-from {run}: it was made with other inputs: {diff}{hint}")


def save_init(work: Path, model: torch.nn.Module, key: dict[str, Any], records: dict[str, Any],
              wall_s: float) -> None:
    """Write ``work/init/`` atomically: the model as it enters QAT, the RNG state, the key."""
    with atomic_dir(work / INIT) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / "init.json", {"key": key, "wall_s": wall_s, **records})


def load_init(run: Path, model: torch.nn.Module) -> None:
    """Load ``RUN/init/`` into a prepared (QuantLinear) model and restore the RNG state."""
    src = Path(run) / INIT
    load_model(model, str(src / "model.safetensors"))
    set_rng_state(torch.load(src / "rng.pt", weights_only=False))
