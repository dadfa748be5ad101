"""What each element of the Hessian-aware initialisation is worth, at zero training tokens.

Every variant starts from the same full-precision model, quantizes every decoder-block linear
with the recipe's quantizer structure (binary: a_i sign s_j; ternary: per-row a_i RoundClip s_j),
and is measured on the same evaluation windows (WikiText-2 test, non-overlapping windows of
``--seq-len``, the first ``--windows``). Calibration: the first ``--calib-seqs`` x ``--calib-len``
tokens of PTB train (``self`` text needs a generation run first; ``--calib FILE.jsonl.gz`` takes a
``binarize generate-data`` file).

    python benchmarks/hessian_init.py --method binary --variants sign,rtn-refit,gptq,gptq-refine,full
    python benchmarks/hessian_init.py --method ternary --windows 16 --seq-len 1024

Variants (each adds one element to the one before unless said):

* ``sign``: plain rounding, per-row mean|W| (binary Sa / ternary AbsMean), no St: today's start;
* ``rtn-refit``: the same codes, row scale refit in the Hessian metric (no feedback);
* ``gptq``: GPTQ error feedback, row scale mean|W| then refit once (no refinement rounds);
* ``gptq-refine``: + 2 rounds of row-scale refit and re-quantization (ARB-style);
* ``full``: + the column scale St fitted in the same alternation (the default ``init: hessian``);
* ``full-svid``: ``full`` with St started from OneBit's SVID;
* ``full-plainH``: ``full`` with the plain (unweighted) Hessian;
* ``full-fp``: ``full`` with every block fed the FP model's hidden states (not sequential);
* ``full-corr``: ``full`` on the quantized inputs with the FP outputs as targets (GPTAQ);
* ``rtn-col``: no feedback, but row and column scales refit (scale refinement alone);
* ``bai``: BaI's St (16 Adam steps on next-token loss under the plain sign), no Hessian;
* ``bai+full``: BaI, then ``full`` starting from BaI's St;
* ``full+scales`` / ``bai+full+scales``: then 16 Adam steps on St and Sl by next-token loss with the
  codes fixed (``hessian_scale_steps``);
* ``full+salient`` / ``full+salient+scales``: ``full``, then BiLLM's residual bit-plane on the
  ``--salient`` fraction of each layer's input columns that carry most of its remaining output
  error (``binarize.gptq.salient_residual``; a second sequential pass, each layer's Hessian on the
  inputs the earlier residuals already corrected), then (``+scales``) the scale search with the
  residuals in place. Not a recipe option yet (no format stores the second bit-plane): this
  measures what the element is worth and its bits per weight.

Prints one row per variant: WikiText-2 perplexity, mean relative layer-output error (plain ->
result), seconds of the initialisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from binarize.calibration.datasets import DATASETS, local_file
from binarize.evaluate import eval_tokens, perplexity
from binarize.models import load_model
from binarize.qlinear import finish_init, prepare, set_t
from binarize.recipe import Recipe
from binarize.train.bai import binary_aware_init
from binarize.train.hessian_init import hessian_init

VARIANTS = {
    "sign": None,
    "rtn-refit": dict(hessian_feedback=False, hessian_refine=0, hessian_column_scale=False),
    "rtn-col": dict(hessian_feedback=False, hessian_refine=2, hessian_column_scale=True),
    "gptq": dict(hessian_refine=0, hessian_column_scale=False),
    "gptq-refine": dict(hessian_refine=2, hessian_column_scale=False),
    "full": dict(),
    "full-svid": dict(hessian_column_init="svid"),
    "full-plainH": dict(hessian_weight="plain"),
    "full-fp": dict(hessian_inputs="fp"),
    "full-corr": dict(hessian_inputs="corrected"),  # quantized inputs, FP targets (GPTAQ)
    "full-corr+scales": dict(init="hessian", hessian_inputs="corrected", hessian_scale_steps=16),
    # with an end-to-end scale search (BaI's Adam on next-token loss, calibration text, codes fixed)
    "bai": dict(bai=True),  # BaI's St alone (plain sign codes): today's binaryllm start
    "bai+full": dict(bai=True, init="hessian"),  # BaI's St as the column scale's start
    "full+scales": dict(init="hessian", hessian_scale_steps=16),
    "bai+full+scales": dict(bai=True, init="hessian", hessian_scale_steps=16),
    "full+salient": dict(init="hessian", salient=True),
    "full+salient+scales": dict(init="hessian", hessian_scale_steps=16, salient=True),
}


@torch.no_grad()
def salient_pass(model, base, calib: torch.Tensor, recipe: Recipe, frac: float) -> dict:
    """Add each converted linear a residual bit-plane on its salient columns (forward hooks adding
    ``x[..., cols] @ (scale * codes)^T``), block by block in call order; returns the mean layer error
    after it and the bits per weight over every converted linear."""
    from binarize.gptq import salient_residual
    from binarize.models import decoder_layers
    from binarize.qlinear import quant_layers
    from binarize.train.blockwise import _run, block_inputs
    from binarize.train.hessian_init import _call_groups, _statistics

    names = {id(q): n for n, q in quant_layers(model).items()}
    x, kwargs = block_inputs(model, calib, recipe.micro_batch)
    errs, bits, weights = [], 0.0, 0
    for block in decoder_layers(model):
        for group in _call_groups(block, x, kwargs):
            stats = _statistics(block, group, x, kwargs, recipe.micro_batch, recipe.hessian_weight)
            for q in group:
                w = base.get_submodule(names[id(q)]).weight.float()
                res = salient_residual(w, q.effective_weight().float(), stats[id(q)]["h"], frac)
                plane = (res.scale.view(-1, 1) * res.codes).T.contiguous()  # (k, out)
                q.register_forward_hook(lambda m, a, out, c=res.cols, p=plane: out + a[0][..., c] @ p.to(out.dtype))
                errs.append(res.error)
                bits += (1.0 + res.extra_bits) * w.numel()
                weights += w.numel()
        x = _run(block, x, kwargs, recipe.micro_batch)
    return {"error": sum(errs) / len(errs), "bits": bits / weights}


def calibration(tokenizer, n: int, length: int, path: str | None) -> torch.Tensor:
    if path:
        from binarize.calibration.streams import load_documents, tokenize_documents

        ids = tokenize_documents(tokenizer, load_documents(path)[0])
    else:
        text = local_file(DATASETS["ptb"].splits["train"]).read_text()[:2_000_000]
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids[: n * length].view(n, length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="binary", choices=("binary", "ternary"))
    ap.add_argument("--variants", default="sign,rtn-refit,gptq,gptq-refine,full")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--calib", default=None, help="a data file instead of PTB train")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE recipe override for every variant")
    ap.add_argument("--salient", type=float, default=0.05, help="column fraction of the +salient variants")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, tokenizer, src = load_model(None)
    base.eval()
    calib = calibration(tokenizer, args.calib_seqs, args.calib_len, args.calib)
    ids, _ = eval_tokens(tokenizer, "wikitext2")
    extra = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        extra[k] = json.loads(v) if v[:1] in "0123456789-tf[" else v
    fp = perplexity(base, ids, args.seq_len, limit=args.windows)["ppl"]
    print(f"{src.spec}, {args.method}, calibration {tuple(calib.shape)}, WikiText-2 {args.windows} x {args.seq_len}: "
          f"full precision {fp:.2f}", flush=True)
    rows = []
    for name in args.variants.split(","):
        opts = dict(VARIANTS[name]) if VARIANTS[name] is not None else None
        salient = bool(opts and opts.pop("salient", False))
        opts = {"init": "hessian", **opts} if opts is not None and "init" not in opts and "bai" not in opts else opts
        settings = {"bai": False, "per_row": True, "micro_batch": 4, "seq_len": args.calib_len,
                    "bai_steps": 16, "bai_batch_tokens": 4 * args.calib_len, **(opts or {}), **extra}
        recipe = Recipe(method=args.method, **settings).validate()
        model = copy.deepcopy(base)
        prepare(model, recipe)
        t0 = time.perf_counter()
        if recipe.bai:
            binary_aware_init(model, calib, recipe)
        finish_init(model, recipe)
        rec = hessian_init(model, calib, recipe) if recipe.init == "hessian" else None
        sal = salient_pass(model, base, calib, recipe, args.salient) if salient else None
        if recipe.hessian_scale_steps:
            binary_aware_init(model, calib, recipe, scales=("st", "sl"), steps=recipe.hessian_scale_steps,
                              lr=recipe.hessian_scale_lr, label="scale search")
        sec = time.perf_counter() - t0
        set_t(model, math.inf, 1.0)
        ppl = perplexity(model, ids, args.seq_len, limit=args.windows)["ppl"]
        e = rec.layers if rec else {}
        e0 = sum(v["plain"] for v in e.values()) / max(1, len(e))
        e1 = sum(v["error"] for v in e.values()) / max(1, len(e))
        rows.append({"variant": name, "ppl": ppl, "err_plain": e0, "err": e1, "seconds": sec,
                     **({"salient": args.salient, "err_salient": sal["error"], "bits": sal["bits"]} if sal else {})})
        more = f"   -> {sal['error']:.4f} at {sal['bits']:.3f} bits per weight" if sal else ""
        print(f"{name:12s} WikiText-2 {ppl:14,.1f}   layer error {e0:.4f} -> {e1:.4f}{more}   {sec:6.0f} s", flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": args.method, "fp": fp, "calib": list(calib.shape), "windows": args.windows,
                       "seq_len": args.seq_len, "set": extra, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
