"""Settings that fit the device a conversion runs on (``binarize convert --profile``).

The recipes hold the papers' settings (sequences of 2048 tokens, 32k tokens per optimizer step,
128 calibration sequences): on a GPU they are what the papers measured; on a 2-core CPU one such
step takes longer than a whole conversion should, and at equal time the paper's recipe scored
WikiText-2 6,218 where the CPU-sized distillation recipe scored 979
(``benchmarks/results/ablations/quality/``). So on a machine without CUDA, ``auto`` puts the CPU
profile below over the recipe, key by key, except where the command line sets a key itself
(``--seq-len``, ``--set calib_sequences=...``; fewer calibration sequences given cap the
profile's block-wise sequences). ``recipe`` keeps the recipe's own values everywhere. The
values are those the ``quality`` and ``quality2`` plans measured best on a 2-core CPU. The chosen
values are printed at the start and recorded in run.json's recipe.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import BinarizeError


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 ``avx512_bf16`` or ``amx_bf16``, from
    Linux's ``/proc/cpuinfo``). Elsewhere bf16 matmuls are emulated and may be slower than float32,
    so the CPU profile keeps float32 (False where the file cannot be read)."""
    try:
        flags = next((ln for ln in Path(cpuinfo).read_text(errors="replace").splitlines()
                      if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


CPU_PROFILE: dict[str, object] = {
    "seq_len": 256,  # tokens per sequence
    "batch_tokens": 1024,  # tokens per end-to-end optimizer step
    "micro_batch": 4,  # sequences per forward pass
    "bai_steps": 16,
    "bai_batch_tokens": 1024,
    # calibration sequences (BaI, Hessian-aware initialisation, block-wise): at 300 block-wise steps
    # per block 128 gave WikiText-2 567 where 32 gave 817 (quality2's bw300-seq128 / bw300-seq32)
    "calib_sequences": 128,
    "blockwise_sequences": 128,
    # the self-generated corpus, generated once and shared through the cache: the 128 x 256
    # calibration tokens held out of it, and 16,384 for the end-to-end stage (the 32 steps of 1,024
    # tokens of a short run, read twice; a longer run generates more). ~5 min to generate here,
    # under the quarter of a 30-minute run past which --time would train on PTB train instead
    "self_tokens": 49152,
    # sequences generated at once: 128 wrote 1.24-1.25x the tokens/s of 64 (5.05 vs 6.27 and 4.56
    # vs 5.68 ms per token, 96-token batches, default model, 2-core CPU); 256 no more than 128 (4.64)
    "self_batch": 128,
    # bf16 autocast matmuls where the CPU has bf16 instructions: 1.49x per block-wise step on the
    # default model (benchmarks/blockwise_step_speed.py; quality2's bw300-seq128-bf16)
    "cpu_bf16": native_bf16(),
}
# A post-training conversion (``--tokens 0`` with no block-wise steps, or ``--time`` where training
# does not fit) on the CPU profile: 64 calibration sequences of the model's own text, the corpus
# generated for them alone (self_tokens 0: no end-to-end text). Default model, ternary-ptq, quick
# WikiText-2 / C4 / PTB and the whole command's wall time on the 2-core CPU: 64 sequences 1,515 /
# 872 / 3,559 in 7.0 min, 128 sequences 974 / 680 / 2,907 in 12.8 min (49k tokens generated) where
# the ten-minute target leaves no room for them; 128 sequences of PTB train 10,424 / 5,225 / 525 in
# 8.6 min (benchmarks/results/hessian_init_cpu.md).
CPU_PTQ_PROFILE: dict[str, object] = {"calib_sequences": 64, "blockwise_sequences": 64, "self_tokens": 0}
PROFILES = ("auto", "cpu", "recipe")


def resolve_profile(name: str, cuda: bool | None = None) -> str:
    """``auto`` -> ``cpu`` on a machine without CUDA, else ``recipe``; BinarizeError for an unknown name."""
    if name not in PROFILES:
        raise BinarizeError(f"unknown --profile {name!r} (known: {', '.join(PROFILES)})")
    if name != "auto":
        return name
    return "recipe" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu"


def profile_overrides(name: str, given: dict, cuda: bool | None = None, ptq: bool = False) -> tuple[str, dict]:
    """(resolved profile, the recipe overrides it adds): the profile's values for every key the
    command line did not set (``given``: the overrides from flags and --set). ``ptq``: the job
    trains nothing (``sized_recipe``), so ``CPU_PTQ_PROFILE`` sizes its calibration set."""
    resolved = resolve_profile(name, cuda)
    if resolved != "cpu":
        return resolved, {}
    sized = {k: v for k, v in {**CPU_PROFILE, **(CPU_PTQ_PROFILE if ptq else {})}.items() if k not in given}
    if "blockwise_sequences" in sized and isinstance(given.get("calib_sequences"), int):
        # fewer calibration sequences given: the block-wise stage caches what there is
        sized["blockwise_sequences"] = min(sized["blockwise_sequences"], given["calib_sequences"])
    return resolved, sized


def sized_recipe(recipe: str, given: dict, profile: str, tokens: int | None, cuda: bool | None = None):
    """(resolved profile, the overrides it added, the loaded Recipe) for ``binarize convert``. A job
    that trains nothing (``tokens`` 0 and no block-wise steps: a post-training conversion) takes
    ``CPU_PTQ_PROFILE`` over the CPU profile; ``--tokens 0`` with block-wise steps (``binaryllm-distill``,
    ``--set blockwise_steps=300``) trains, and keeps the profile's calibration set and corpus.
    BinarizeError for a recipe that cannot be loaded."""
    from .recipe import load_recipe

    used, sized = profile_overrides(profile, given, cuda)
    rec = load_recipe(recipe, {**sized, **given})
    if tokens == 0 and not rec.blockwise_steps and used == "cpu":
        used, sized = profile_overrides(profile, given, cuda, ptq=True)
        rec = load_recipe(recipe, {**sized, **given})
    return used, sized, rec
