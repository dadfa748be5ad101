"""Binary-aware initialization (BinaryLLM, arXiv 2508.06974, section 3.1): with every weight
frozen, the per-input-channel scales St are searched by next-token loss under hard-sign weights
on the calibration set; then St is folded into the latent weight (W~ = W / St) for QAT.

With ``bai_path`` (our addition, issue 20 item 0) the Adam steps cycle t over
``schedules.bai_path_points`` (points of the QAT schedule's first half, then the hard sign), so
St fits the progressive path QAT walks, not only its end. St fitted at the hard sign alone
leaves intermediate t far worse than the sign (SmolLM2-135M, 16 steps: t = 1.22 -> 17.5 nats,
t = inf -> 11.5): the outlier weights the model's massive activation rests on are clipped to
~1.6 Sa and it fires on ordinary tokens. Fitting St along the path flattens that
(``benchmarks/progressive_path.py --bai-path``; 30 steps: every t <= 12.2 against 12.1 at the
sign). It is off by default because it costs the end model: St is then worse at the hard sign
(calibration loss after 16 steps 12.76 against 9.88) and binaryllm at 32k tokens ends worse
(quick WikiText-2 62,885 against 48,498; benchmarks/results/quality_cpu.md).
"""

from __future__ import annotations

import math

import torch

from ..errors import BinarizeError
from ..evaluate import mean_loss
from ..qlinear import quant_layers, set_t
from ..recipe import Recipe
from ..schedules import bai_path_points, bai_step_t
from .loop import accumulate, log_now
from .losses import TrainLoss
from .record import BaiRecord

BAI_EVAL_SEQUENCES = 8


def binary_aware_init(model, calib: torch.Tensor, recipe: Recipe, progress=None, log=None, *,
                      scales: tuple[str, ...] = ("st",), steps: int | None = None, lr: float | None = None,
                      label: str = "BaI") -> BaiRecord:
    """Search per-input-channel St by next-token loss under hard-sign weights, weights frozen
    (with ``recipe.bai_path``: under the t values of ``schedules.bai_path_points`` in turn, the
    last step at the hard sign).

    ``calib`` is (n, seq_len) token ids; each of ``recipe.bai_steps`` Adam steps (lr ``bai_lr``)
    takes ``bai_batch_tokens`` of it in order, cycling. Loss is measured before and after on the
    first ``BAI_EVAL_SEQUENCES`` sequences. Ends with St rounded to fp16 and folded into the latent.

    The same search tunes other per-layer scales with the codes fixed: ``scales=("st", "sl")`` after
    the Hessian-aware initialisation (``hessian_init.py``, recipe ``hessian_scale_steps``), with
    its own ``steps`` / ``lr`` / ``label`` (the layers are folded already; St is rounded to fp16).
    """
    steps = recipe.bai_steps if steps is None else steps
    lr = recipe.bai_lr if lr is None else lr
    layers = quant_layers(model)
    set_t(model, math.inf)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list({id(getattr(q, k)): getattr(q, k) for q in layers.values() for k in scales}.values())  # tied once
    for p in params:
        p.requires_grad_(True)
    eval_set = calib[:BAI_EVAL_SEQUENCES]
    before = mean_loss(model, eval_set, recipe.micro_batch)
    opt = torch.optim.Adam(params, lr=lr)
    per_step = max(1, recipe.bai_batch_tokens // recipe.seq_len)
    points = (bai_path_points(recipe.scheduler, recipe.chunks, recipe.schedule_span) if recipe.bai_path
              else [math.inf])
    losses = []
    task = progress.add_task(label, total=steps, info="") if progress else None
    model.train()
    loss_fn = TrainLoss(model, None, recipe.loss_chunk)
    for step in range(steps):
        t = bai_step_t(points, step, steps)
        set_t(model, t)
        idx = [(step * per_step + i) % calib.shape[0] for i in range(per_step)]
        loss, _ = accumulate(loss_fn, calib[idx], recipe.micro_batch, lambda l: l.backward())
        if not math.isfinite(loss):
            raise BinarizeError(f"{label} step {step + 1}/{steps}: the calibration loss is {loss} (not finite); "
                                f"lower its learning rate ({'bai_lr' if label == 'BaI' else 'hessian_scale_lr'})")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        if progress:
            progress.update(task, advance=1, info=f"loss {loss:.3f}")
        if log and log_now(step, steps):
            log(f"{label} step {step + 1}/{steps}  loss {loss:.3f}" + (f"  t {t:.3g}" if recipe.bai_path else ""))
    set_t(model, math.inf)
    model.eval()
    after = mean_loss(model, eval_set, recipe.micro_batch)
    if log:
        log(f"{label} loss on {eval_set.shape[0]} calibration sequences: {before:.3f} -> {after:.3f}")
    for q in layers.values():
        for k in scales:
            getattr(q, k).requires_grad_(False)
        if q.folded:
            q.round_st_()  # as fold_st rounds it, for the export
        q.fold_st()
    if progress:
        progress.remove_task(task)
    return BaiRecord(before, after, losses, steps, lr, int(eval_set.shape[0]), steps * per_step * recipe.seq_len)
