"""Zero-token, Hessian-aware initialisation (recipe ``init: hessian``): after BaI (if any) and
before block-wise / end-to-end training, every converted linear gets the codes, row scale and
column scale (St) that ``binarize.gptq.quantize_layer`` chooses from its input Hessian. No
weight is trained; the calibration set is only run forward.

Order (GPTQ's "true sequential", arXiv 2210.17323 section 4): decoder blocks in order; inside a
block, the linears in the order the forward calls them, grouped by the tensor they read (q/k/v,
then o, then gate/up, then down for a LLaMA block). A group's Hessians are collected with the
block's earlier groups already quantized and the later ones at full precision, so each linear
compensates the error of the ones before it. Block i's inputs (``hessian_inputs``):
``"quantized"`` (default) are the outputs of the already-quantized blocks 0..i-1, ``"fp"`` the
full-precision model's own hidden states, ``"corrected"`` the quantized inputs with the FP layer's
output on its own inputs as the target (``corrected_target``: each linear also undoes the error
its inputs carry; GPTAQ, arXiv 2504.02692; it runs a copy of each FP block beside it).

The Hessian H = sum_t w_t x_t x_t^T / sum_t w_t over the calibration tokens t (``hessian_weight``):
``"plain"`` (w_t = 1, GPTQ) or ``"relative"`` (default; w_t = 1 / mean_i y_ti^2 with y_t = W x_t the
layer's full-precision output at token t). The default model carries massive activations at a few
positions (the first token's residual reaches ~25,000), which dominate a plain H; the relative
weight makes every token's output count alike, as the block-wise stage's relative loss does.

The result is written into each ``QuantLinear`` so that its own quantizer at t = inf gives exactly
the chosen weight (checked; a mismatch is a BinarizeError): binary latent = the error-fed columns
(their signs are the codes), ternary latent = codes x the layer's mean |W / St| (RoundClip of it
under AbsMean gives the codes back); St = the column scale rounded to fp16; Sl = a / (the
quantizer's own row scale of that latent).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import BinarizeError
from ..gptq import HessianQuantConfig, quantize_layer
from ..models import decoder_layers
from ..qlinear import QuantLinear, quant_layers, set_t
from ..recipe import Recipe
from .blockwise import _block_call, _run, block_inputs


@dataclass
class HessianInitRecord:
    """What the stage did: per-layer relative output errors (plain rounding -> result), the
    number of calibration tokens, options and wall time (s)."""

    layers: dict = field(default_factory=dict)  # name -> {"plain": e0, "error": e1, "round": r}
    tokens: int = 0
    options: dict = field(default_factory=dict)
    wall_s: float = 0.0
    scale_search: dict | None = None  # hessian_scale_steps: the BaI-style search of St and Sl that followed

    def summary(self) -> str:
        if not self.layers:
            return "no layers"
        e0 = [v["plain"] for v in self.layers.values()]
        e1 = [v["error"] for v in self.layers.values()]
        return (f"{len(e1)} layers, mean relative output error {sum(e0) / len(e0):.4f} (plain rounding) -> "
                f"{sum(e1) / len(e1):.4f}, {self.wall_s:.0f} s")


def config_from_recipe(recipe: Recipe) -> HessianQuantConfig:
    """The per-layer options of a recipe; the column scale is not fitted where St is shared
    across linears (``share_st``), since one layer cannot move another's St."""
    return HessianQuantConfig(method=recipe.method, feedback=recipe.hessian_feedback, refine=recipe.hessian_refine,
                              column_scale=recipe.hessian_column_scale and not recipe.share_st,
                              column_init=recipe.hessian_column_init, damp=recipe.hessian_damp)


class _GroupDone(Exception):
    """Raised after the last linear of a group has run: the block's forward stops there."""


def _call_groups(block, x: torch.Tensor, kwargs: dict) -> list[list[QuantLinear]]:
    """The block's QuantLinears in call order, grouped by the input tensor they read."""
    order: list[tuple[QuantLinear, int]] = []
    hooks = [q.register_forward_pre_hook(lambda m, args: order.append((m, id(args[0]))))
             for q in quant_layers(block).values()]
    try:
        with torch.no_grad():
            _block_call(block, x[:1], kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[QuantLinear]] = []
    last, seen = None, set()
    for q, key in order:
        if id(q) in seen:
            continue
        seen.add(id(q))
        if groups and key == last:
            groups[-1].append(q)
        else:
            groups.append([q])
        last = key
    return groups


def _statistics(block, group: list[QuantLinear], x: torch.Tensor, kwargs: dict, batch: int, weight: str,
                fp_block=None, fp_x: torch.Tensor | None = None) -> dict:
    """Per linear of ``group`` (by id): H = E_w[x x^T] (in, in) of its inputs when the block runs on x
    (n, seq, hidden), and, given the FP block and its own inputs ``fp_x``, M = E_w[x_fp x^T] (in, in)
    for the input-error correction. The token weights w come from the FP output W x_fp (or W x)."""
    rel = {id(m): n for n, m in block.named_modules()}
    acc = {id(q): {"h": torch.zeros(q.in_features, q.in_features, device=x.device), "m": None, "n": 0.0}
           for q in group}
    seen: dict[str, torch.Tensor] = {}

    def capture(m, args):  # the FP block's input to the same linear, for the same tokens
        seen[rel_fp[id(m)]] = args[0].detach().float().reshape(-1, m.in_features)
        if id(m) == last_fp:
            raise _GroupDone

    def hook(m, args):
        a = args[0].detach().float().reshape(-1, m.in_features)
        ref = seen.get(rel[id(m)], a)
        if weight == "relative":
            y = ref @ (fp_weights[id(m)] if fp_block is not None else m.full_precision_weight().detach().float()).T
            wt = 1.0 / y.pow(2).mean(1).clamp_min(1e-12)
        else:
            wt = torch.ones(a.shape[0], device=a.device)
        st = acc[id(m)]
        st["h"] += (a * wt.unsqueeze(1)).T @ a
        st["n"] += float(wt.sum())
        if fp_block is not None:
            mm = (ref * wt.unsqueeze(1)).T @ a
            st["m"] = mm if st["m"] is None else st["m"] + mm

    def stop(m, args, out):  # the rest of the block is not needed for this group's statistics
        raise _GroupDone

    hooks = [q.register_forward_pre_hook(hook) for q in group] + [group[-1].register_forward_hook(stop)]
    if fp_block is not None:
        fp_mods = {id(q): fp_block.get_submodule(rel[id(q)]) for q in group}
        rel_fp = {id(fm): rel[k] for k, fm in fp_mods.items()}
        fp_weights = {k: fm.full_precision_weight().detach().float() for k, fm in fp_mods.items()}
        last_fp = id(fp_mods[id(group[-1])])
        hooks += [fm.register_forward_pre_hook(capture) for fm in fp_mods.values()]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch):
                seen.clear()
                for blk, inp in ((fp_block, fp_x), (block, x)):
                    if blk is None:
                        continue
                    try:
                        _block_call(blk, inp[i : i + batch], kwargs)
                    except _GroupDone:
                        pass
    finally:
        for h in hooks:
            h.remove()
    return {k: {"h": v["h"] / max(v["n"], 1e-30), "m": None if v["m"] is None else v["m"] / max(v["n"], 1e-30)}
            for k, v in acc.items()}


def corrected_target(w: torch.Tensor, h: torch.Tensor, m: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight whose output on the quantized model's inputs x best matches the FP layer's output on
    its own inputs x_fp: argmin_V E||V x - W x_fp||^2 = W M H^-1 with M = E[x_fp x^T], H = E[x x^T]
    (damped like GPTQ's H). Quantizing it in the H metric then also undoes the error the earlier
    layers left in x (GPTAQ, arXiv 2504.02692, asymmetric calibration)."""
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    return torch.linalg.solve(hd, (w @ m).T).T


@torch.no_grad()
def apply_layer(q: QuantLinear, codes: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                latent: torch.Tensor) -> None:
    """Write codes (out, in), row scale a (out,), column scale s (in,) into a folded QuantLinear so
    that its hard quantizer gives a_i C_ij s_j (St rounded to fp16; see the module docstring)."""
    if q.st_groups is None and q.st.shape == col.shape:
        q.st.copy_(col)
        q.round_st_()
    st = q.scale_in().detach()
    if q.spec.method == "binary":
        new = latent * (col / st).view(1, -1)  # same signs; divided by the rounded St
    else:
        g = (q.full_precision_weight().detach() / st).abs().mean().clamp_min(1e-8)
        new = codes * g
    q.weight.copy_(new)
    if q.sa_fixed is not None:
        q.use_learnable_scale()
    q.sl.fill_(1.0)
    got, scale = q.codes()
    if not torch.equal(got.to(codes.dtype), codes):
        raise BinarizeError("internal error: the Hessian-aware codes do not survive the layer's own quantizer")
    q.sl.copy_(row / scale)


def check_calibration(widths: list[int], calib: torch.Tensor) -> None:
    """Each layer's Hessian needs at least as many calibration tokens as its input width (the
    widest of ``widths``); else one BinarizeError line, raised by ``convert`` before any work."""
    if calib.numel() < max(widths):
        raise BinarizeError(f"the Hessian-aware initialisation needs at least {max(widths)} calibration tokens (the "
                            f"widest layer input) but has {calib.numel()}: raise calib_sequences")


def hessian_init(model, calib: torch.Tensor, recipe: Recipe, progress=None, log=None) -> HessianInitRecord:
    """Run the stage on every decoder block of a prepared model whose St is folded (after
    ``finish_init``). ``calib`` is (n, seq_len) token ids; each layer's Hessian needs at least as
    many calibration tokens as its widest input (else a BinarizeError before any work)."""
    t0 = time.perf_counter()
    cfg = config_from_recipe(recipe)
    check_calibration([q.in_features for q in quant_layers(model).values()], calib)
    rec = HessianInitRecord(tokens=int(calib.numel()), options={**asdict(cfg), "inputs": recipe.hessian_inputs,
                                                                 "weight": recipe.hessian_weight})
    names = {id(q): n for n, q in quant_layers(model).items()}
    blocks = decoder_layers(model)
    x, kwargs = block_inputs(model, calib, recipe.micro_batch)
    mode = recipe.hessian_inputs
    fp_x = x if mode in ("fp", "corrected") else None  # the FP model's hidden states, block by block
    batch = max(1, recipe.micro_batch)
    task = progress.add_task("Hessian init", total=len(blocks), info="") if progress else None
    for b, block in enumerate(blocks):
        set_t(block, math.inf, 0.0)  # every layer at its full-precision weight until its group is done
        fp_block = copy.deepcopy(block) if mode == "corrected" else None  # the original weights, kept
        if fp_x is not None:  # the next block's FP inputs, before this block's latents are replaced
            fp_next = _run(block, fp_x, kwargs, batch)
        inputs = fp_x if mode == "fp" else x
        for group in _call_groups(block, inputs, kwargs):
            stats = _statistics(block, group, inputs, kwargs, batch, recipe.hessian_weight, fp_block,
                                fp_x if mode == "corrected" else None)
            for q in group:
                name = names[id(q)]
                w = q.full_precision_weight().detach().float()
                h, m = stats[id(q)]["h"], stats[id(q)]["m"]
                try:
                    if m is not None:
                        w = corrected_target(w, h, m, recipe.hessian_damp)
                    res = quantize_layer(w, h, q.scale_in().detach().float(), cfg, q.st_min)
                except (BinarizeError, RuntimeError) as e:
                    raise BinarizeError(f"Hessian-aware initialisation, layer {name}: {e}") from None
                apply_layer(q, res.codes, res.row_scale, res.col_scale, res.latent)
                q.lam = 1.0
                rec.layers[name] = {"plain": round(res.error_plain, 6), "error": round(res.error, 6),
                                    "round": res.rounds}
        set_t(block, math.inf, 1.0)
        if mode != "fp":
            x = _run(block, x, kwargs, batch)
        if fp_x is not None:
            fp_x = fp_next
        del fp_block
        if not torch.isfinite(fp_x if mode == "fp" else x).all():
            raise BinarizeError(f"Hessian-aware initialisation: block {b} gives non-finite outputs")
        if progress:
            progress.update(task, advance=1)
        if log:
            errs = [rec.layers[names[id(q)]] for q in quant_layers(block).values()]
            log(f"Hessian init block {b + 1}/{len(blocks)}: relative output error "
                f"{sum(e['plain'] for e in errs) / len(errs):.4f} -> {sum(e['error'] for e in errs) / len(errs):.4f}")
    set_t(model, math.inf, 1.0)
    if progress:
        progress.remove_task(task)
    rec.wall_s = time.perf_counter() - t0
    return rec
