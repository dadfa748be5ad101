"""Binary-aware initialization (BinaryLLM, arXiv 2508.06974, section 3.1): with every weight
frozen, the per-input-channel scales St are searched by next-token loss under hard-sign weights
on the calibration set; then St is folded into the latent weight (W~ = W / St) for QAT.
"""

from __future__ import annotations

import math

import torch

from ..evaluate import mean_loss
from ..qlinear import quant_layers, set_t
from ..recipe import Recipe
from .loop import accumulate, log_now
from .losses import TrainLoss
from .record import BaiRecord

BAI_EVAL_SEQUENCES = 8


def binary_aware_init(model, calib: torch.Tensor, recipe: Recipe, progress=None, log=None) -> BaiRecord:
    """Search per-input-channel St by next-token loss under hard-sign weights, weights frozen.

    ``calib`` is (n, seq_len) token ids; each of ``recipe.bai_steps`` Adam steps (lr ``bai_lr``)
    takes ``bai_batch_tokens`` of it in order, cycling. Loss is measured before and after on the
    first ``BAI_EVAL_SEQUENCES`` sequences. Ends with St rounded to fp16 and folded into the latent.
    """
    layers = quant_layers(model)
    set_t(model, math.inf)
    for p in model.parameters():
        p.requires_grad_(False)
    st = list({id(q.st): q.st for q in layers.values()}.values())  # tied St (share_st) once
    for p in st:
        p.requires_grad_(True)
    eval_set = calib[:BAI_EVAL_SEQUENCES]
    before = mean_loss(model, eval_set, recipe.micro_batch)
    opt = torch.optim.Adam(st, lr=recipe.bai_lr)
    per_step = max(1, recipe.bai_batch_tokens // recipe.seq_len)
    losses = []
    task = progress.add_task("BaI", total=recipe.bai_steps, info="") if progress else None
    model.train()
    loss_fn = TrainLoss(model, None, recipe.loss_chunk)
    for step in range(recipe.bai_steps):
        idx = [(step * per_step + i) % calib.shape[0] for i in range(per_step)]
        loss, _ = accumulate(loss_fn, calib[idx], recipe.micro_batch, lambda l: l.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        if progress:
            progress.update(task, advance=1, info=f"loss {loss:.3f}")
        if log and log_now(step, recipe.bai_steps):
            log(f"BaI step {step + 1}/{recipe.bai_steps}  loss {loss:.3f}")
    model.eval()
    after = mean_loss(model, eval_set, recipe.micro_batch)
    if log:
        log(f"BaI loss on {eval_set.shape[0]} calibration sequences: {before:.3f} -> {after:.3f}")
    for q in layers.values():
        q.st.requires_grad_(False)
        q.fold_st()
    if progress:
        progress.remove_task(task)
    return BaiRecord(before, after, losses, recipe.bai_steps, recipe.bai_lr, int(eval_set.shape[0]),
                     recipe.bai_steps * per_step * recipe.seq_len)
