"""A decode loop you can read top to bottom: static KV cache, one prefill, then one token per step
(the structure of gpt-fast's ``generate``, github.com/pytorch-labs/gpt-fast).

* The KV cache is transformers' ``StaticCache``: its tensors are allocated once for
  ``prompt + max_new_tokens`` positions and never change shape, so the decode step can be captured
  (``compile=True``: ``torch.compile(mode="reduce-overhead")``, which records the step as a CUDA
  graph on a GPU and replays it; on a CPU it only compiles). Every decode step sees the same
  shapes: input (batch, 1), position (1,).
* Greedy decoding (``temperature=0``) returns exactly ``model.generate(do_sample=False)``'s tokens
  (tested); sampling divides the logits by the temperature and keeps the smallest set of tokens
  whose probability reaches ``top_p``, as transformers' warpers do, but draws with its own calls
  to ``torch.multinomial`` (same seed, not the same tokens as ``generate``).
* The loop stops at ``max_new_tokens`` or when every sequence has produced an end token; a
  finished sequence keeps receiving the end token, as ``generate`` pads with it.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Callable

import torch


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) next tokens."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_keyword(model) -> str:
    """transformers >= 5.2x names the KV-cache argument ``cache`` (``past_key_values`` warns there)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model, keyword: str, cache, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Logits of the last position, (batch, vocab), writing this input's keys / values into ``cache``."""
    out = model(input_ids=input_ids, **{keyword: cache}, cache_position=position, use_cache=True)
    return out.logits[:, -1]


_CAPTURED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (cache, batch, length, step, fullgraph)


def _cache_and_step(model, keyword: str, batch: int, length: int, compile: bool, fullgraph: bool = True):
    """A static cache for ``length`` positions and the decode step over it. Captured steps are kept per
    model with their cache (reset between calls, grown to the next power of two when a call needs
    more), so a chat compiles once rather than on every reply."""
    from transformers import StaticCache

    def make(size: int):
        cache = StaticCache(config=model.config, max_cache_len=size)

        def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:  # fixed shapes: capturable
            return _forward(model, keyword, cache, token, position)

        return cache, step

    if not compile:
        return make(length)
    held = _CAPTURED.get(model)
    if held is None or held[1] != batch or held[2] < length or held[4] != fullgraph:
        size = max(256, 1 << (length - 1).bit_length())
        cache, step = make(size)
        held = (cache, batch, size, torch.compile(step, mode="reduce-overhead", fullgraph=fullgraph), fullgraph)
        _CAPTURED[model] = held
    held[0].reset()
    return held[0], held[3]


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | list[int] | None = None,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, compile: bool = False,
           fullgraph: bool = True, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` (batch, prompt_len), no padding.

    Returns the new tokens, (batch, n) with n <= max_new_tokens. ``on_token`` receives each step's
    (batch,) tokens as soon as they are chosen (for streaming). ``compile`` captures the decode step
    (``fullgraph=False`` lets it break the graph where a layer cannot be traced). Raises ValueError for an empty
    prompt or a non-positive ``max_new_tokens``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("decode needs a (batch, prompt_len) prompt with prompt_len >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    keyword = _cache_keyword(model)
    cache, step = _cache_and_step(model, keyword, batch, prompt_len + max_new_tokens, compile, fullgraph)
    logits = _forward(model, keyword, cache, input_ids, torch.arange(prompt_len, device=device))  # prefill
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = []
    for i in range(max_new_tokens):
        token = _pick(logits, temperature, top_p, generator)
        if eos.numel():
            token = torch.where(done, eos[0], token)
            done |= torch.isin(token, eos)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if (eos.numel() and bool(done.all())) or i == max_new_tokens - 1:
            break
        position = torch.tensor([prompt_len + i], device=device)
        logits = step(token.view(batch, 1), position).clone()  # clone: a graph replay reuses outputs
    return torch.stack(tokens, dim=1)
