"""Perplexity over non-overlapping windows (the GPTQ / OmniQuant protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from binarize.calibration.streams import named_rows
from binarize.errors import BinarizeError

# How each benchmark's rows are joined before tokenizing, as the GPTQ codebase does.
EVAL_SPLITS = {
    "wikitext2": ("test", "\n\n"),
    "ptb": ("test", " "),
    "c4": ("validation", " "),
}


def eval_tokens(tokenizer, dataset: str) -> tuple[torch.Tensor, dict]:
    """Token ids of an evaluation set and a description of how they were made."""
    if dataset not in EVAL_SPLITS:
        raise BinarizeError(f"unknown eval dataset {dataset!r} (known: {', '.join(EVAL_SPLITS)})")
    split, join = EVAL_SPLITS[dataset]
    rows, where = named_rows(dataset, split)
    ids = tokenizer(join.join(rows), return_tensors="pt")["input_ids"][0]
    return ids, {"dataset": dataset, "split": split, "join": join, "source": where, "rows": len(rows),
                 "tokens": int(ids.numel())}


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seq_len: int, limit: int | None = None, batch_size: int = 1) -> dict:
    """exp(mean next-token NLL) over the first ``limit`` non-overlapping windows of seq_len."""
    n = ids.numel() // seq_len
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise BinarizeError(f"evaluation text has fewer than {seq_len} tokens")
    device = next(model.parameters()).device
    windows = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return {"ppl": math.exp(total / count), "nll": total / count, "windows": n, "seq_len": seq_len,
            "predicted_tokens": count}


@torch.inference_mode()
def mean_loss(model, blocks: torch.Tensor, micro_batch: int = 1) -> float:
    """Mean next-token loss over a set of blocks (BaI's before/after measure)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], micro_batch):
        x = blocks[i : i + micro_batch].to(device)
        total += float(model(input_ids=x, labels=x).loss) * x.shape[0]
        count += x.shape[0]
    return total / count
