"""Loss along a block-by-block path from the full-precision model to the quantized one.

Issue 20 item 0 asks for a path from the FP model to the binary one on which no intermediate
model is worse than the end. ``benchmarks/progressive_path.py`` walks the tanh-progressive t with
the weights fixed; this script walks the decoder blocks instead: state k has blocks 0..k-1
quantized and blocks k.. at full precision (k = 0: the FP model; k = L: the quantized model).

* ``--init-from RUN`` (a conversion made with ``--save-init``): blocks 0..k-1 as the block-wise
  stage left them (trained latent weights, scales and norms, hard quantizer), blocks k.. the
  original FP blocks. With ``blockwise_inputs: quantized`` state k is exactly the model block k's
  reconstruction was trained under, so this is the path the block-wise stage walks.
* without it (``--method binary|ternary``): the untrained path at initialisation, weights fixed:
  blocks 0..k-1 (``--order front``) or L-k..L-1 (``--order back``) at the hard sign with BaI's St
  (``--bai-steps``; progressive_path.py's BaI), or at the BitNet b1.58 AbsMean ternary quantizer.

    python benchmarks/blockwise_path.py --init-from runs/ablate/quality/runs/distill-200k
    python benchmarks/blockwise_path.py --bai-steps 16 --order front          # ~4 min on 2 cores

Loss: next-token cross-entropy (nats) on the first ``--tokens`` WikiText-2 test tokens, one
sequence, as progressive_path.py measures it. The summary counts the states worse than the end
(state L) and says whether the path is monotone.

What it showed on SmolLM2-135M-Instruct (512 tokens; FP 3.09; benchmarks/results/quality_cpu.md):

* Untrained, binary, BaI 16 steps (hard sign of all blocks: 11.54): front to back 10.24 after
  block 0, 14.13 after blocks 0-6, 23 of 29 intermediate states worse than the end; back to front
  22 of 29 (15.90 at 12 blocks). Partly binarized models are worse than the fully binarized one
  even with no tanh at all, so no choice of the elementwise F(x, t) or per-block t can give a
  monotone path at initialisation while the all-binary end sits at the uniform guess (ln 49152 =
  10.8): the partly working model predicts confidently and wrongly, the dead one diffusely.
* Along binaryllm-distill's block-wise stage (distill-200k of the quality plan): 3.09 -> 7.11, no
  state worse than the end (block 2: 6.63, then 4.76-6.22).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from binarize.models import decoder_layers
from binarize.quantizers import binary_weight, ternary_weight
from progressive_path import _calibration_tokens, _target_linears, bai, model_and_eval_tokens, monotone, nll


def _block_index(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def trained_path(run: Path, fp_model, x: torch.Tensor) -> list[float]:
    """States 0..L along the block-wise stage of a saved initialisation (RUN/init/) of ``fp_model``."""
    from binarize.qlinear import finish_init, prepare, quant_layers, set_t
    from binarize.recipe import load_recipe
    from binarize.train.init_state import load_init, read_init

    saved = read_init(run)
    # the key holds every recipe key but the end-to-end ones (init_state.QAT_ONLY, the name among
    # them), so any base recipe with the key's values set on it builds the same layers
    recipe = load_recipe("binaryllm", saved["key"]["recipe"])
    qmodel = copy.deepcopy(fp_model)
    prepare(qmodel, recipe)
    for q in quant_layers(qmodel).values():
        q.ste = False
    finish_init(qmodel, recipe, from_file=True)
    load_init(run, qmodel)
    qmodel.eval()
    set_t(qmodel, math.inf)
    q_blocks, fp_blocks = list(decoder_layers(qmodel)), list(decoder_layers(fp_model))
    holder = decoder_layers(qmodel)
    out = []
    for k in range(len(q_blocks) + 1):
        for i, blk in enumerate(q_blocks[:k] + fp_blocks[k:]):
            holder[i] = blk
        out.append(nll(qmodel, x))
        print(f"  blocks 0..{k - 1} quantized: {out[-1]:.3f}", flush=True)
    return out


def untrained_path(model, tokenizer, ids, x, method: str, order: str, bai_steps: int) -> list[float]:
    """States 0..L at initialisation, weights fixed: the first k blocks of ``order`` quantized."""
    lins = _target_linears(model)
    w_fp = {n: m.weight.detach().clone() for n, m in lins.items()}
    st = {n: torch.ones(m.in_features) for n, m in lins.items()}
    if method == "binary" and bai_steps:
        cal, where = _calibration_tokens(tokenizer, ids, x.shape[1], bai_steps * 256)
        cal = cal[: (cal.numel() // 256) * 256].view(-1, 256)
        print(f"BaI: {bai_steps} steps x 256 tokens of {where}, hard sign")
        st = bai(model, lins, cal, bai_steps, 1e-2)

    def quantized(n):
        if method == "binary":
            return binary_weight(w_fp[n] / st[n], torch.ones(w_fp[n].shape[0]), st[n], math.inf)
        return ternary_weight(w_fp[n], "absmean", False, math.inf, ste=False)

    n_blocks = len(decoder_layers(model))
    seq = list(range(n_blocks)) if order == "front" else list(range(n_blocks))[::-1]
    q = {n: quantized(n) for n in lins}
    out = []
    for k in range(n_blocks + 1):
        done = set(seq[:k])
        with torch.no_grad():
            for n, m in lins.items():
                m.weight.copy_(q[n] if _block_index(n) in done else w_fp[n])
        out.append(nll(model, x))
        print(f"  {k} blocks quantized ({order}): {out[-1]:.3f}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="hub id, HF directory or .gguf (default: the package default)")
    ap.add_argument("--init-from", type=Path, default=None, help="a run made with --save-init: its block-wise path")
    ap.add_argument("--method", choices=("binary", "ternary"), default="binary", help="untrained path only")
    ap.add_argument("--order", choices=("front", "back"), default="front", help="untrained path only")
    ap.add_argument("--bai-steps", type=int, default=16, help="untrained binary path: BaI steps (0: St = 1)")
    ap.add_argument("--tokens", type=int, default=512, help="first N WikiText-2 test tokens, one sequence")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer, ids, x = model_and_eval_tokens(args.model, args.tokens)
    if args.init_from is not None:
        label = f"block-wise stage of {args.init_from}"
        path = trained_path(args.init_from, model, x)
    else:
        label = f"untrained {args.method}, {args.order} first" + (
            f", BaI {args.bai_steps} steps" if args.method == "binary" else "")
        path = untrained_path(model, tokenizer, ids, x, args.method, args.order, args.bai_steps)
    end = path[-1]
    worse = [k for k in range(1, len(path) - 1) if path[k] > end]
    print(f"\n{label} ({x.shape[1]} WikiText-2 tokens, nats)")
    print("| blocks quantized | " + " | ".join(str(k) for k in range(len(path))) + " |")
    print("|---|" + "---|" * len(path))
    print("| loss | " + " | ".join(f"{v:.2f}" + ("*" if k in worse else "") for k, v in enumerate(path)) + " |")
    print(f"\n* = worse than all {len(path) - 1} blocks quantized ({end:.3f}); FP {path[0]:.3f}")
    print(json.dumps({"path": label, "fp": round(path[0], 4), "end": round(end, 4), "monotone": monotone(path),
                      "states_worse_than_end": len(worse), "intermediate_states": len(path) - 2,
                      "max_excess": round(max(path[1:-1]) - end, 4), "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
