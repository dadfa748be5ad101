"""FSDP for end-to-end QAT: the latent weights, their gradients and the AdamW moments sharded over
the processes with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Asked for with ``binarize convert --fsdp`` under ``torchrun``, or by ``accelerate launch
--config_file`` with an FSDP config (``distributed_type: FSDP``, ``fsdp_version: 2``; accelerate
passes it on as ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` environment variables, read here).

Choices, and why:

* **torch's fully_shard, not accelerate's FSDP wrapper.** accelerate 1.x builds FSDP only on GPUs
  (a CPU launch silently becomes DDP), and it wraps the module it is given by that module's
  ``_no_split_modules``; binarize's training module is ``TrainLoss`` (model + chunked loss), whose
  output head must stay unsharded in the root unit because the chunked loss reads its weight
  directly. So binarize shards itself, the same way on CPU (gloo) and GPU (NCCL): one FSDP unit per
  decoder block, the root unit (``TrainLoss``) holding embeddings, final norm and head. accelerate
  still provides the processes, the device, bf16 autocast and the collectives of the loop.
* **Sharded from end-to-end QAT on.** BaI (St only) and the block-wise stage (one block at a time)
  run before sharding on every process, each on the full model as in one process; the model must
  fit on one device for them. Sharding then divides latent weights, gradients and AdamW moments
  (16 bytes per parameter in fp32, the bulk of a training step's memory) by the number of processes.
* **Full state on disk.** Checkpoints, ``run.json`` and the export are written by the main process
  from the full (gathered, CPU-offloaded) state: a checkpoint is the same ``model.safetensors`` a
  one-process run writes plus the full optimizer state keyed by parameter name, so any number of
  processes can resume it. The gather is a collective: every process calls the functions here.
* Parameters stay in fp32 (no FSDP ``param_dtype``): the weight quantizer (Sa = mean|W|, tanh(t x))
  sees the same fp32 latent weights as in DDP; matmuls run in bf16 under autocast on GPU.

Refused with one line: ``fsdp_version: 1``, parameter CPU offload (``fsdp_offload_params``), and
models with mixture-of-experts layers (a rank whose tokens skip an expert leaves it without a
gradient; use DDP, which is told to expect that).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from ..errors import BinarizeError

TRUE = ("1", "true", "yes")


def fsdp_requested(flag: bool = False, env: dict | None = None) -> bool:
    """``--fsdp``, or an accelerate FSDP launch (``ACCELERATE_USE_FSDP``)."""
    env = os.environ if env is None else env
    return flag or env.get("ACCELERATE_USE_FSDP", "").lower() in TRUE


def fsdp_options(env: dict | None = None) -> dict:
    """The accelerate FSDP settings binarize honours: ``reshard_after_forward`` (default true) and
    ``activation_checkpointing`` (default false). BinarizeError (one line) for unsupported ones."""
    env = os.environ if env is None else env
    version = env.get("FSDP_VERSION", "2")
    if version != "2":
        raise BinarizeError(f"FSDP version {version} is not supported: binarize shards with FSDP2 "
                            "(set fsdp_version: 2 in the accelerate config)")
    if env.get("FSDP_OFFLOAD_PARAMS", "").lower() in TRUE:
        raise BinarizeError("FSDP parameter CPU offload (fsdp_offload_params) is not supported: the weight "
                            "quantizer runs on every step's full latent weights; use more processes, "
                            "--grad-checkpointing or a smaller --micro-batch")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    return {"reshard_after_forward": reshard in TRUE or reshard == "full_shard",
            "activation_checkpointing": env.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() in TRUE}


def shard(loss_fn: torch.nn.Module, blocks: list[torch.nn.Module], reshard_after_forward: bool = True):
    """Shard ``loss_fn`` (a ``TrainLoss``) in place: one FSDP unit per decoder block of ``blocks``,
    then the root unit. Needs an initialised process group. Returns ``loss_fn``."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(loss_fn)
    return loss_fn


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(module: torch.nn.Module) -> Iterator[None]:
    """FSDP's ``no_sync``: micro-batches accumulate unsharded gradients, the last one reduce-scatters."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """The names of ``model``'s state, grouped by tensor: a tied embedding and head share one group."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(loss_fn: torch.nn.Module, model: torch.nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The full state dict of ``model`` (``loss_fn.model``, sharded inside ``loss_fn``) under the
    model's own names, one name per tied tensor (what ``safetensors.torch.save_model`` writes, so
    ``load_model`` reads it), gathered to CPU on the main process ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(loss_fn, options=_options(cpu_offload=True))
    keep = {group[0] for group in _tied_groups(model)}
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):] in keep}


def full_optimizer_state(loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name, on the main process ({} elsewhere). Collective.
    On an optimizer without state yet, torch first runs a zero step that creates the moments and
    counts a step (AdamW's bias correction then lags one step): call it once the optimizer has stepped."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(loss_fn, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a ``full_optimizer_state`` (read by every process) into a fresh optimizer of the sharded
    ``loss_fn``: each process keeps its shard of the moments. Collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(loss_fn, optimizer, state, options=_options())


def load_full_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a ``full_model_state`` into an unsharded ``model``; a name missing from ``tensors`` must
    be a tied alias of one present (RuntimeError otherwise)."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    aliases = {n for group in _tied_groups(model) if any(g in tensors for g in group) for n in group}
    bad = sorted(set(missing) - aliases) + sorted(unexpected)
    if bad:
        raise RuntimeError(f"the gathered state does not match the model: {bad[:5]}")


def unsharded_model(spec: str | None, from_scratch: str | None, recipe, tensors: dict[str, torch.Tensor]):
    """A fresh model of the run's architecture (``spec`` as ``binarize convert`` takes it, or a
    ``--from-scratch`` shape), prepared for ``recipe`` and holding ``tensors`` (the gathered state of
    an FSDP run): what the main process saves and exports."""
    from ..models import load_model, scratch_model
    from ..qlinear import finish_init, prepare

    fresh = scratch_model(spec, from_scratch, recipe.seed)[0] if from_scratch else load_model(spec)[0]
    prepare(fresh, recipe)
    finish_init(fresh, recipe, from_file=True)
    load_full_state(fresh, tensors)
    return fresh
