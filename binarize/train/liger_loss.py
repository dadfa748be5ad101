"""liger-kernel's fused linear losses as the training objective (recipe ``loss_backend``; issue 21).

``TrainLoss`` computes the loss from the final hidden states h (N, hidden) and the output head
without the full (N, vocab) logits, either with binarize's own chunked PyTorch function
(``losses.ChunkedLinearLoss``, any device) or with Liger-Kernel (Hsu et al., arXiv 2410.10989):

* next-token CE alone: ``LigerFusedLinearCrossEntropyFunction`` (a Triton kernel: CUDA, or the
  Triton CPU interpreter under ``TRITON_INTERPRET=1``, as the tests run it). Same value and
  gradients as the chunked path: CE is the mean over the N' positions that have a target.
* CE + distillation from the teacher's hidden states: ``LigerFusedLinearJSDFunction`` with
  beta = 0, which is the forward KL(p_T || p_S) at temperature tau (PyTorch chunks, compiled on
  CUDA), weighted ``distill_ce`` and ``distill_alpha * tau^2``. Its KL is averaged over the N'
  positions with a next-token target (the last position of each sequence is left out), the
  chunked path's over all N positions: the two differ by that one position per sequence.

``loss_backend``: ``chunked``; ``liger`` (refused in one line where liger cannot compute this
loss: not installed, ``loss_chunk 0``, the teacher's top-k cache, Gemma 2's logit soft-capping with
a teacher, or the CE kernel on a CPU without the Triton interpreter); ``auto`` (default): liger on
CUDA where it can, else chunked. The backend a run used is recorded in run.json (``loss_backend``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import BinarizeError


def why_not_liger(recipe, model, device: str) -> str | None:
    """Why liger cannot compute this recipe's loss on ``device`` ("cuda" / "cpu"), or None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if not recipe.loss_chunk:
        return "loss_chunk 0 asks for the model's full logits"
    distill = recipe.distill_alpha > 0
    if distill and recipe.distill_topk:
        return "its distillation loss has no form for the teacher's cached top-k logits (distill_topk)"
    if distill and getattr(model.config, "final_logit_softcapping", None):  # Gemma 2 (losses.logit_softcap)
        return f"its distillation loss has no logit soft-capping ({model.config.model_type})"
    if not distill and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "its cross-entropy kernel needs a CUDA device (or TRITON_INTERPRET=1 on a CPU)"
    return None


def resolve_backend(recipe, model, device: str | None = None) -> str:
    """The loss backend a run uses: ``chunked`` or ``liger`` (module docstring). ``device`` defaults
    to "cuda" when torch sees one. BinarizeError (one line) for ``liger`` where it cannot run."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if recipe.loss_backend == "chunked":
        return "chunked"
    reason = why_not_liger(recipe, model, device)
    if recipe.loss_backend == "liger":
        if reason:
            raise BinarizeError(f"loss_backend=liger: {reason}; use --set loss_backend=chunked")
        return "liger"
    return "liger" if device == "cuda" and reason is None else "chunked"


def liger_loss(h: torch.Tensor, head, targets: torch.Tensor, teacher_h: torch.Tensor | None, t_head,
               weights: tuple, chunk: int, ignore_index: int):
    """(loss, ce, kd) through liger: h (N, hidden), targets (N,) with ``ignore_index`` for none,
    teacher_h (N, hidden) or None; weights (w_ce, alpha, tau, softcap, teacher softcap) as for
    ``ChunkedLinearLoss``. kd is tau^2 * KL, mean over the positions with a target, or None."""
    w_ce, alpha, tau, cap, _ = weights
    if teacher_h is None or not alpha:
        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

        out = LigerFusedLinearCrossEntropyFunction.apply(h, head.weight, targets, head.bias, None, ignore_index, 0.0,
                                                         0.0, "mean", cap or None, False, None, False, False, False)
        loss = out[0] if isinstance(out, tuple) else out
        return w_ce * loss, loss.detach(), None
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    loss, soft, hard = LigerFusedLinearJSDFunction.apply(
        h, head.weight, teacher_h.to(h.dtype), t_head.weight, targets, head.bias, t_head.bias, w_ce,
        alpha * tau * tau, 0.0, ignore_index, tau, h.device.type == "cuda", chunk, True)
    return loss, hard.detach(), soft.detach() * tau * tau
