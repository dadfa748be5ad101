"""The checkpoint state ``convert --resume`` reads (``OUT.partial/checkpoint/state.json``), checked
before anything is loaded: phase, step, a valid recipe and run record, else one BinarizeError line.
It lives beside the run record (train/) so that ``binarize.checkpoint`` imports nothing of training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT, check_output_dir
from ..errors import BinarizeError
from ..recipe import Recipe, _coerce
from .record import RunRecord


def read_checkpoint_state(workdir: Path) -> dict:
    path = workdir / CHECKPOINT / "state.json"
    if not path.exists():
        raise BinarizeError(f"nothing to resume: no checkpoint in {workdir}")
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError and bad UTF-8
        raise BinarizeError(f"corrupt checkpoint state: {path}") from None
    return check_state(state, path)


def check_state(state: Any, path: Path) -> dict:
    """``state`` as ``convert --resume`` reads it (phase, step, a valid recipe and run record), or
    BinarizeError naming what is wrong in ``path``."""
    if not isinstance(state, dict) or state.get("phase") not in ("bai", "blockwise", "qat"):
        raise BinarizeError(f"corrupt checkpoint state: {path} (no phase bai, blockwise or qat)")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise BinarizeError(f"corrupt checkpoint state: {path} (step {step!r} is not a count)")
    recipe = state.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(state.get("record"), dict):
        raise BinarizeError(f"corrupt checkpoint state: {path} (no recipe or run record)")
    state["recipe"] = {k: _coerce(k, v, f"{path}") for k, v in recipe.items()}  # typed as the dataclass's fields
    Recipe(**state["recipe"]).validate()
    try:
        RunRecord.from_dict(state["record"])
        state["record"]["tokens"]["requested"] + 0
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BinarizeError(f"corrupt checkpoint state: {path} (run record: {type(exc).__name__} {exc})") from None
    return state


def check_out(out: Path, work: Path, resume: bool, overwrite: bool) -> None:
    """OUT and OUT.partial as the job needs them: --resume a checkpoint in OUT.partial, else an OUT
    that is absent or empty (or --overwrite) and no interrupted run in OUT.partial."""
    if resume:
        if out.exists() and any(out.iterdir()) and not work.exists():
            raise BinarizeError(f"{out} is a finished run; nothing to resume")
        if not (work / CHECKPOINT / "state.json").exists():
            raise BinarizeError(f"nothing to resume: no checkpoint in {work}")
        return
    check_output_dir(out, overwrite, "use --overwrite, or --resume")
    if work.exists() and not overwrite and (work / CHECKPOINT / "state.json").exists():  # none: nothing to keep
        raise BinarizeError(f"an interrupted run is in {work} (use --resume to continue it, or --overwrite)")


def interrupted(work: Path, main: bool):
    """Ctrl-C in a phase that does not checkpoint: keep the last checkpoint if there is one (then
    --resume continues from it), else remove the partial run so that the same command starts again."""
    from .loop import Interrupted

    if (work / CHECKPOINT / "state.json").exists():
        return Interrupted("interrupted; the last checkpoint is kept")
    if main:
        shutil.rmtree(work, ignore_errors=True)
    return Interrupted("interrupted before the first checkpoint: nothing was kept, run the same command again",
                       resumable=False)
