"""The initialisation stages of a conversion, in order, before block-wise and end-to-end training:
binary-aware initialisation (``bai.py``: St by next-token loss under the hard sign), the fold of St
into the latent weights (``qlinear.finish_init``), then the Hessian-aware initialisation
(``hessian_init.py``) and its scale search (BaI's search over St and Sl with the codes fixed)."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..qlinear import finish_init
from ..recipe import Recipe
from .bai import binary_aware_init
from .hessian_init import hessian_init
from .record import BaiRecord


def initialise(model, calib: torch.Tensor, recipe: Recipe, progress=None, log=None,
               main: bool = True) -> tuple[BaiRecord | None, dict | None]:
    """Run the recipe's initialisation stages on a prepared ``model`` with calibration token ids
    ``calib`` (n, seq_len) on the model's device; returns (BaI record or None, Hessian-aware
    initialisation record as a dict or None). The main process prints the Hessian stage's summary."""
    bai = binary_aware_init(model, calib, recipe, progress, log) if recipe.bai else None
    finish_init(model, recipe)
    if recipe.init != "hessian":
        return bai, None
    rec = hessian_init(model, calib, recipe, progress, log)
    if recipe.hessian_scale_steps:  # St and Sl by next-token loss, codes fixed
        t_search = time.perf_counter()
        tuned = binary_aware_init(model, calib, recipe, progress, log, scales=("st", "sl"),
                                  steps=recipe.hessian_scale_steps, lr=recipe.hessian_scale_lr, label="scale search")
        rec.scale_search = {**dataclasses.asdict(tuned), "wall_s": time.perf_counter() - t_search}
        rec.wall_s += rec.scale_search["wall_s"]
    if main:
        print(f"  Hessian-aware initialisation: {rec.summary()}", flush=True)
    return bai, dataclasses.asdict(rec)
