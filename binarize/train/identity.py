"""What a run is made of, fingerprinted once at its start, so that a run is only ever continued
(``--resume``) or started from a saved initialisation (``--init-from``) with what it was made of.

An identity is a flat dict; each check compares only the fields both sides hold (a record an older
binarize wrote lacks some), in this order:

* ``model`` (the spec typed), ``model_sha256`` (SHA-256 over the model's weight and config files:
  ``calibration/selfgen.model_fingerprint``, which keys the self-generated text too; equal files
  are the same model whatever path names them), ``from_scratch``;
* ``tokens`` (``--tokens``) and ``recipe`` (every key; a key an older record lacks counts as its
  default, which is what that run ran);
* ``calib_sha256`` and ``train_sha256`` (SHA-256 of the int64 token ids of the calibration set and of
  the training blocks: they pin the source, its content, its size and any self-generated text),
  with ``calib_source`` / ``train_source`` to say where they came from.

``OUT.partial/identity.json`` holds a conversion's identity from its start; ``--resume`` refuses one
line naming the first field that differs (``check_resume``). ``--init-from`` compares the key of
``train/init_state.py`` with the same function (``first_difference``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from binarize.calibration.selfgen import model_fingerprint  # noqa: F401 (re-exported for run.py)

from ..errors import BinarizeError
from ..recipe import Recipe

IDENTITY = "identity.json"


def tokens_sha256(ids: torch.Tensor) -> str:
    """SHA-256 of token ids as int64 bytes in row-major order (no copy when already so)."""
    t = ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(t.numpy() if t.numel() else b"").hexdigest()


def recipe_difference(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()) -> str | None:
    """``recipe key K differs (A there, B here)`` for the first differing key outside ``ignore``,
    else None. A key one side lacks (written before it existed) counts as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}
    for k in sorted((set(old) | set(new)) - ignore):
        a, b = old.get(k, defaults.get(k)), new.get(k, defaults.get(k))
        if json.dumps(a) != json.dumps(b):
            return f"recipe key {k} differs ({a!r} there, {b!r} here)"
    return None


def first_difference(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()) -> str | None:
    """The first field (module docstring's order) in which two identities differ, as a phrase for
    a one-line error; None when every field both hold agrees. ``ignore``: recipe keys not compared."""
    def both(k: str) -> bool:
        return old.get(k) is not None and new.get(k) is not None

    if both("model_sha256"):
        if old["model_sha256"] != new["model_sha256"]:
            return (f"the model differs ({old.get('model')} there, {new.get('model')} here; "
                    f"files {old['model_sha256'][:12]} vs {new['model_sha256'][:12]})")
    elif both("model") and old["model"] != new["model"]:
        return f"the model differs ({old['model']} there, {new['model']} here)"
    if "from_scratch" in old and "from_scratch" in new and old["from_scratch"] != new["from_scratch"]:
        return f"--from-scratch differs ({old['from_scratch']} there, {new['from_scratch']} here)"
    if old.get("time_s") != new.get("time_s"):  # --time (train/timed.py): the plan was made for that time
        def t(v):
            return f"--time {v:g} s" if v is not None else "no --time"
        return f"--time differs ({t(old.get('time_s'))} there, {t(new.get('time_s'))} here)"
    if both("tokens") and old["tokens"] != new["tokens"]:
        return f"--tokens differs ({old['tokens']:,} there, {new['tokens']:,} here)"
    if both("recipe"):
        diff = recipe_difference(old["recipe"], new["recipe"], ignore)
        if diff:
            return diff
    for key, what in (("calib_sha256", "calibration"), ("train_sha256", "training")):
        if both(key) and old[key] != new[key]:
            a, b = old.get(key.replace("sha256", "source")), new.get(key.replace("sha256", "source"))
            where = (f"{a} there, {b} here" if a != b else f"{b}: its content changed" if b
                     else "source, size, seq_len or self-generated corpus")
            return f"the {what} data differ (other {what} text: {where})"
    return None


def read_identity(work: Path) -> dict[str, Any] | None:
    """``work/identity.json``, or None for a run started by a binarize that wrote none."""
    path = Path(work) / IDENTITY
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BinarizeError(f"corrupt run identity {path}: start afresh with --overwrite") from None
    if not isinstance(saved, dict):
        raise BinarizeError(f"corrupt run identity {path}: start afresh with --overwrite")
    return saved


def write_identity(work: Path, identity: dict[str, Any]) -> None:
    from ..checkpoint import write_json

    write_json(Path(work) / IDENTITY, identity)


def check_resume(work: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse, in one line, to resume the run in ``work`` (whose identity is ``saved``) with a
    model, data, budget or recipe other than it started with. ``now`` may hold only some fields
    (each is checked as soon as it is known, before the work that needs it)."""
    if saved is None:
        return
    diff = first_difference(saved, now)
    if diff:
        raise BinarizeError(f"--resume {work}: {diff}; resume with the command that "
                            "started it, or start afresh with --overwrite")
