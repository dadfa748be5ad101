"""Settings that fit the device a conversion runs on (``binarize convert --profile``).

The recipes hold the papers' settings (sequences of 2048 tokens, 32k tokens per optimizer step,
128 calibration sequences): on a GPU they are what the papers measured; on a 2-core CPU one such
step takes longer than a whole conversion should, and at equal time the paper's recipe scored
WikiText-2 6,218 where the CPU-sized distillation recipe scored 979
(``benchmarks/results/ablations/quality/``). So on a machine without CUDA, ``auto`` puts the CPU
profile below over the recipe, key by key, except where the command line sets a key itself
(``--seq-len``, ``--set calib_sequences=...``). ``recipe`` keeps the recipe's own values
everywhere. The values are the ``quality`` plan's, where every CPU figure the README quotes was
measured. The chosen values are printed at the start and recorded in run.json's recipe.
"""

from __future__ import annotations

import torch

from .errors import BinarizeError

CPU_PROFILE: dict[str, object] = {
    "seq_len": 256,  # tokens per sequence
    "batch_tokens": 1024,  # tokens per end-to-end optimizer step
    "micro_batch": 4,  # sequences per forward pass
    "bai_steps": 16,
    "bai_batch_tokens": 1024,
    "calib_sequences": 32,  # calibration sequences (BaI, Hessian-aware initialisation, block-wise)
    "blockwise_sequences": 32,
    "self_tokens": 40960,  # the self-generated corpus, generated once and shared through the cache
}
PROFILES = ("auto", "cpu", "recipe")


def resolve_profile(name: str, cuda: bool | None = None) -> str:
    """``auto`` -> ``cpu`` on a machine without CUDA, else ``recipe``; BinarizeError for an unknown name."""
    if name not in PROFILES:
        raise BinarizeError(f"unknown --profile {name!r} (known: {', '.join(PROFILES)})")
    if name != "auto":
        return name
    return "recipe" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu"


def profile_overrides(name: str, given: dict, cuda: bool | None = None) -> tuple[str, dict]:
    """(resolved profile, the recipe overrides it adds): the profile's values for every key the
    command line did not set (``given``: the overrides from flags and --set)."""
    resolved = resolve_profile(name, cuda)
    if resolved != "cpu":
        return resolved, {}
    return resolved, {k: v for k, v in CPU_PROFILE.items() if k not in given}
