"""Wall time of one block-wise training step in float32 against bfloat16 autocast, side by side.

The block-wise stage (``binarize/train/blockwise.py``) spends ~0.27 s per step per block of the
default model on a 2-core CPU, ~90 % of a one-hour conversion. This script builds one decoder
block of the default model's shape (SmolLM2-135M: hidden 576, MLP 1536, 9 heads, 3 KV heads;
random weights: the speed does not depend on their values), prepares it with the recipe's
quantized layers, and times forward + backward + AdamW of the step the stage runs
(``blockwise_batch`` sequences of ``seq_len`` tokens, relative reconstruction loss) in float32
and under ``torch.autocast(device, bfloat16)``, alternating, best of ``--repeat`` rounds each.

    python benchmarks/blockwise_step_speed.py                 # ~1 min on 2 cores
    python benchmarks/blockwise_step_speed.py --hidden 2048 --intermediate 8192 --heads 32 --kv-heads 8

Prints each mode's seconds per step and the ratio; also the relative difference of the loss and
of the gradients of the latent weights between the modes on the same batch.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from binarize.models import decoder_layers
from binarize.qlinear import finish_init, prepare, set_t
from binarize.recipe import load_recipe
from binarize.train.blockwise import _block_call, block_inputs
from binarize.train.losses import reconstruction_loss
from binarize.train.loop import trainable_groups


def build(a):
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, num_hidden_layers=1, vocab_size=1024,
                      max_position_embeddings=a.seq_len, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    recipe = load_recipe(a.recipe, {"seq_len": a.seq_len, "bai": False})
    prepare(model, recipe)
    finish_init(model, recipe)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len))
    x, kwargs = block_inputs(model, ids, a.batch)
    block = decoder_layers(model)[0]
    set_t(block, float("inf"))
    groups = trainable_groups(block, recipe)
    for q in block.modules():
        if hasattr(q, "ste"):
            q.ste = True
    target = x + 0.1 * torch.randn_like(x)
    return block, x, target, kwargs, groups


def step(block, x, target, kwargs, opt, params, dtype):
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = reconstruction_loss(_block_call(block, x, kwargs), target)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="binaryllm-distill")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per mode, alternating")
    a = ap.parse_args()
    block, x, target, kwargs, groups = build(a)
    opt = torch.optim.AdamW(groups, lr=0.0)  # lr 0: every step sees the same weights
    params = [p for g in groups for p in g["params"]]
    modes = {"float32": torch.float32, "bf16 autocast": torch.bfloat16}
    loss_ref, g_ref = step(block, x, target, kwargs, opt, params, torch.float32)
    loss_bf, g_bf = step(block, x, target, kwargs, opt, params, torch.bfloat16)
    num = sum(float((a_ - b_).pow(2).sum()) for a_, b_ in zip(g_ref, g_bf))
    den = sum(float(a_.pow(2).sum()) for a_ in g_ref)
    best = {k: float("inf") for k in modes}
    for _ in range(a.repeat):
        for name, dtype in modes.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(block, x, target, kwargs, opt, params, dtype)
            best[name] = min(best[name], (time.perf_counter() - t0) / a.steps)
    print(f"block {a.hidden}/{a.intermediate}, {a.batch} x {a.seq_len} tokens, {torch.get_num_threads()} threads")
    for name in modes:
        print(f"  {name:14s} {best[name]:.4f} s per step")
    print(f"  ratio float32 / bf16 autocast: {best['float32'] / best['bf16 autocast']:.2f}x")
    print(f"  loss float32 {loss_ref:.6f}, bf16 {loss_bf:.6f} (relative difference {abs(loss_bf - loss_ref) / loss_ref:.2e})")
    print(f"  latent-weight gradients: relative L2 difference {(num / den) ** 0.5:.2e}")


if __name__ == "__main__":
    main()
