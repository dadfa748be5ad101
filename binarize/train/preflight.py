"""Checks a conversion makes before any work, each a one-line BinarizeError: the launch (process
count, DeepSpeed), the model against the recipe and export, and the memory a distillation teacher needs."""

from __future__ import annotations

import os

import torch

from ..errors import BinarizeError
from ..experts import MOE_REFUSAL, has_moe_experts
from ..models import final_norm
from ..recipe import Recipe
from .liger_loss import resolve_backend
from .losses import check_chunked
from .sharding import TRUE


def check_launch(env: dict | None = None) -> None:
    """Multi-process launches binarize runs correctly: one process per device (DDP through
    ``accelerate launch --multi_gpu`` or ``torchrun``, FSDP through ``--fsdp`` or an accelerate FSDP
    config, ``sharding.py``; gloo on CPU). DeepSpeed launches are refused with one line; so is
    asking for more processes per machine than it has GPUs."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE:
        raise BinarizeError("DeepSpeed launches are not supported. Launch with DDP (accelerate launch --multi_gpu "
                            "--num_processes N, or torchrun --nproc_per_node N) or FSDP (an accelerate FSDP "
                            "config with fsdp_version: 2, or --fsdp), with --grad-checkpointing to save memory")
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and local > gpus:
        raise BinarizeError(f"{local} processes per machine were launched but it has {gpus} GPU(s): "
                            f"use --num_processes / --nproc_per_node {gpus}")


def check_model_options(model, recipe: Recipe, export: str | None = None) -> None:
    """Recipe and export options the loaded model must support, refused with one line before any work."""
    if export and export.startswith("gguf"):
        from ..families import family_of
        from ..formats.gguf_arch import arch_of

        try:
            arch_of(model.config)
        except BinarizeError as e:
            raise BinarizeError(f"--export {export}: {e}") from None
        if family_of(model.config).up_linear is None and (recipe.bai or recipe.train_st):
            raise BinarizeError(f"--export {export}: recipe {recipe.name} learns St, and a {model.config.model_type} "
                                "MLP has no linear place to fold down's St into a GGUF (use a recipe without BaI "
                                "and train_st, or --export binary)")
    if recipe.init == "hessian" and recipe.hessian_inputs == "corrected" and has_moe_experts(model):
        raise BinarizeError("hessian_inputs=corrected pairs each linear's quantized and full-precision inputs token by "
                            "token, and a mixture-of-experts router sends an expert different tokens in the two: "
                            "use --set hessian_inputs=quantized")
    if export == "bitnet" and has_moe_experts(model):
        raise BinarizeError("--export bitnet: " + MOE_REFUSAL.format(model_type=model.config.model_type))
    if recipe.grad_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise BinarizeError(f"--grad-checkpointing: {type(model).__name__} does not support activation "
                            "checkpointing in transformers; run without it")
    if recipe.loss_chunk:
        check_chunked(model)
    resolve_backend(recipe, model)  # loss_backend=liger where liger cannot run: refused here, before any work
    if recipe.blockwise_steps and recipe.blockwise_last_loss == "kl":  # refused before any work, not at the last block
        check_chunked(model, "blockwise_last_loss=kl", "--set blockwise_last_loss=same")
        final_norm(model)


def free_memory() -> tuple[int, str]:
    """(bytes free now, where): GPU memory when training runs on a GPU, else RAM."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0], "GPU memory"
    import psutil

    return psutil.virtual_memory().available, "RAM"


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_teacher_fits(model) -> None:
    """Distillation keeps a frozen copy of the model: refuse, before any training, when that copy
    does not fit in the memory free now (GPU memory when training runs on a GPU, else RAM)."""
    need, (free, where) = param_bytes(model), free_memory()
    if need > free:
        raise BinarizeError(f"distillation needs a frozen copy of the model ({need / 2**30:.2f} GiB) but only "
                            f"{free / 2**30:.2f} GiB of {where} is free: use a recipe without distill_alpha "
                            "(--distill 0) or a machine with more memory")


def check_probe_fits(model) -> None:
    """``--time`` measures the end-to-end step on a throw-away copy of the model with its
    gradients and AdamW's two moments (4x its weights' bytes, beside the model): refuse, before
    the measurement, when that does not fit in the memory free now."""
    need, (free, where) = 4 * param_bytes(model), free_memory()
    if need > free:
        raise BinarizeError(f"--time measures the stages on a training copy of the model (weights, gradients and "
                            f"AdamW's moments: {need / 2**30:.2f} GiB) but only {free / 2**30:.2f} GiB of {where} is "
                            "free: give --tokens instead of --time, or use a machine with more memory")
