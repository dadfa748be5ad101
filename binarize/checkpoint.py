"""Atomic directory writes and the resume checkpoint (model, optimizer, RNG, position)."""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_model, save_file, save_model

from .errors import BinarizeError

CHECKPOINT = "checkpoint"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces ``final`` only if the block succeeds."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_files(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def check_output_dir(out: Path, overwrite: bool, hint: str = "use --overwrite") -> None:
    """Refuse an output directory that would lose data: a path that is a file (even with
    ``overwrite``: an output directory never replaces a file) or a non-empty directory without
    ``overwrite``. Raises BinarizeError with one line naming ``out``."""
    if out.exists() and not out.is_dir():
        raise BinarizeError(f"output {out} is a file, not a directory: choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BinarizeError(f"output {out} exists and is not empty ({hint})")


def share_files(root: Path) -> None:
    """Give every file under ``root`` the mode the umask gives a new file (0644 under umask 022).

    safetensors writes through a private temporary file (mode 0600); without this the weights of
    a run or an export could not be read by the other users its other files are shared with."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_file() and not p.is_symlink():
            p.chmod(0o666 & ~mask)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(workdir: Path, model, optimizer, state: dict, tensors: dict | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Everything a resumed run needs to continue bit for bit, written atomically. ``tensors`` and
    ``optimizer_state``, when given, are written in place of ``model``'s and ``optimizer``'s own
    state (a sharded run's gathered full state, ``train/sharding.py``)."""
    with atomic_dir(workdir / CHECKPOINT) as tmp:
        if tensors is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file(tensors, str(tmp / "model.safetensors"))
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, tmp / "trainer.pt")
        write_json(tmp / "state.json", state)


def load_checkpoint(workdir: Path, model, optimizer) -> dict | None:
    """Load the checkpoint's model state into ``model`` and its optimizer state into ``optimizer``
    (None: not loaded), restore the RNG; returns the saved optimizer state."""
    ck = workdir / CHECKPOINT
    load_model(model, str(ck / "model.safetensors"))
    trainer = torch.load(ck / "trainer.pt", weights_only=False)
    if optimizer is not None and trainer["optimizer"] is not None:
        optimizer.load_state_dict(trainer["optimizer"])
    set_rng_state(trainer["rng"])
    return trainer["optimizer"]
