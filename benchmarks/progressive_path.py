"""Loss along the progressive path at initialisation, weights fixed, only t changed.

BinaryLLM's premise is that the loss moves smoothly from the full-precision model (t -> 0) to the
binary one (t = inf) as the schedule sharpens F(x, t). This script measures it: after a short
binary-aware initialization (St by next-token loss under hard-sign weights, as in training; 0
steps allowed), it prints the next-token loss on the first N WikiText-2 test tokens for t = 0, the
exponential schedule's 20 chunk values and t = inf, for each progressive form (``paper``,
``max``; ``binarize.quantizers.PROGRESSIVE_FORMS``), binary (BaI'd latents, Sl = 1) and ternary
(bitnet-b158-absmean: per-tensor AbsMean gamma on the original weights, no BaI, as that recipe
runs), side by side, and says whether each path is monotone.

    python benchmarks/progressive_path.py                      # default model, ~5 min on 2 cores
    python benchmarks/progressive_path.py --tokens 1024 --bai-steps 0 --methods binary

The effective weights of each (method, form, t) are computed once with ``binarize.quantizers``
and copied into the plain ``nn.Linear`` layers, so the forward is the model's own.

What it showed on SmolLM2-135M (3 BaI steps, 512 tokens; FP 3.09, hard sign 12.41):

* Cause of the paper form's jump at the first chunk: x = W~/Sa is heavy-tailed (|x| up to 57,
  0.999-quantile ~4.5) and F(x, t) saturates at 1/tanh(t) ~ 1/t, so t = 0.32 clips every
  |x| > ~3 to ~3.2. Clipping alone reproduces it (Sa * clamp(x, +-c): c = 3.2 -> 11.5,
  c = 6 -> 4.2, c = 12 -> 3.2), spread over all layers. The tail carries the model's massive
  activation: layer 11's MLP writes ~25000 into residual channel 507 at the first token (the
  attention sink; intermediate channels 1229/1487 at 3069/1093 times down_proj weights ~14 Sa);
  at t = 0.32 it falls to ~1200 (loss 10.9).
* Why intermediate t is worse than the sign: at t = 0.72 (saturation ~1.6 Sa) the same MLP
  fires on ordinary tokens instead (channel 507 up to ~850 on 60-70 % of them, ~0 at the first
  token), confident wrong predictions (16.8; clamp(x, +-1.6) with the rest exact: 15.4); the
  hard sign has no massive activation at all (12.4). Every elementwise path tried passes such
  states:
  linear interpolation to the sign (lambda = 0.7: 17.0), |x|^p (p = 0.3: 17.1), tanh with linear
  or slowly decaying tails, floors, and the "max" form (t ~ 3.5-84).
* "max" (binarize.quantizers, form="max") keeps chunks 1-4 at 3.1-6.8 instead of 10.9-18.9,
  but is not monotone either and is further from the sign in the last chunks (relative weight
  distance to the hard sign at t = 83.7: 0.12 vs the paper's 0.06).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from binarize.quantizers import PROGRESSIVE_FORMS, binary_weight, ternary_weight
from binarize.schedules import bai_path_points, bai_step_t, schedule

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _target_linears(model) -> dict[str, nn.Linear]:
    try:
        from binarize.models import target_linears

        return target_linears(model)
    except ImportError:  # the package layout moved: the same rule (decoder-block linears)
        return {n: m for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGETS and ".layers." in f".{n}"}


def _calibration_tokens(tokenizer, eval_ids: torch.Tensor, n_eval: int, n: int) -> tuple[torch.Tensor, str]:
    """PTB train (the convert default) when its local file is there, else WikiText-2 test after the eval slice."""
    try:
        from binarize.calibration.datasets import DATASETS, local_file

        path = local_file(DATASETS["ptb"].splits["train"])
        if path is not None:
            text = path.read_text()[: 40 * n]
            return tokenizer(text, return_tensors="pt")["input_ids"][0][:n], "ptb train"
    except ImportError:
        pass
    return eval_ids[n_eval : n_eval + n], "wikitext2 test (after the eval tokens)"


class _BaiLinear(nn.Module):
    """W frozen, St learned: W_eff = Sa(W/St) * F(W/(St Sa), t) * St (t = inf: the hard-sign BaI forward)."""

    t = math.inf  # set for all layers at once, as qlinear.set_t does

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = lin.weight.detach()
        self.bias = lin.bias
        self.st = nn.Parameter(torch.ones(lin.in_features))
        self.one = torch.ones(lin.out_features)

    def forward(self, x):
        st = self.st.clamp_min(1e-2)  # the recipe's st_min
        w = binary_weight(self.weight / st, self.one, st, _BaiLinear.t, sa_grad=True)
        return nn.functional.linear(x, w, self.bias)


def bai(model, lins: dict[str, nn.Linear], calib: torch.Tensor, steps: int, lr: float,
        points: list[float] = (math.inf,)) -> dict[str, torch.Tensor]:
    """A few Adam steps on St (one calibration sequence each) at t cycling over ``points``, the last
    step at the last point (train/bai.py's order); St rounded to fp16 as fold_st does."""
    if steps == 0:
        return {n: torch.ones(m.in_features) for n, m in lins.items()}
    wrapped = {}
    for name, lin in lins.items():
        parent, _, child = name.rpartition(".")
        wrapped[name] = _BaiLinear(lin)
        setattr(model.get_submodule(parent), child, wrapped[name])
    for p in model.parameters():
        p.requires_grad_(False)
    params = [m.st for m in wrapped.values()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        _BaiLinear.t = bai_step_t(points, step, steps)
        x = calib[step % calib.shape[0]][None]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"  BaI step {step + 1}/{steps}: t {_BaiLinear.t:.3g}, loss {loss.item():.3f}", flush=True)
    model.eval()
    for name, lin in lins.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
    return {n: m.st.detach().clamp_min(1e-2).half().float() for n, m in wrapped.items()}


@torch.inference_mode()
def nll(model, x: torch.Tensor) -> float:
    try:
        from binarize.evaluate import window_nll

        return window_nll(model, x) / (x.shape[1] - 1)
    except ImportError:
        return float(model(input_ids=x, labels=x).loss)


def model_and_eval_tokens(spec, n_tokens: int):
    """(model in eval mode, tokenizer, WikiText-2 test ids, the first n_tokens as one sequence (1, n))."""
    from binarize.evaluate import eval_tokens
    from binarize.models import load_model

    torch.manual_seed(0)
    model, tokenizer, _ = load_model(spec)
    model.eval()
    ids, _ = eval_tokens(tokenizer, "wikitext2")
    return model, tokenizer, ids, ids[:n_tokens][None]


def monotone(values: list[float]) -> bool:
    return all(b >= a for a, b in zip(values, values[1:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="hub id, HF directory or .gguf (default: the package default)")
    ap.add_argument("--tokens", type=int, default=512, help="first N WikiText-2 test tokens, one sequence")
    ap.add_argument("--bai-steps", type=int, default=3, help="BaI Adam steps before measuring (0: St = 1)")
    ap.add_argument("--bai-seq-len", type=int, default=256)
    ap.add_argument("--bai-lr", type=float, default=1e-2)
    ap.add_argument("--bai-path", action="store_true",
                    help="fit St along the schedule (recipe key bai_path: schedules.bai_path_points), not at t = inf only")
    ap.add_argument("--methods", default="binary,ternary")
    ap.add_argument("--forms", default=",".join(PROGRESSIVE_FORMS))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    forms = [f for f in args.forms.split(",") if f]
    t0 = time.perf_counter()

    model, tokenizer, ids, x = model_and_eval_tokens(args.model, args.tokens)
    lins = _target_linears(model)
    w_fp = {n: m.weight.detach().clone() for n, m in lins.items()}
    print(f"model {args.model or 'default'}: {len(lins)} linears; "
          f"eval on the first {x.shape[1]} WikiText-2 test tokens")

    st = {n: torch.ones(m.in_features) for n, m in lins.items()}
    if "binary" in methods and args.bai_steps:
        n_cal = args.bai_steps * args.bai_seq_len
        cal, where = _calibration_tokens(tokenizer, ids, args.tokens, n_cal)
        cal = cal[: (cal.numel() // args.bai_seq_len) * args.bai_seq_len].view(-1, args.bai_seq_len)
        points = bai_path_points("exponential", 20) if args.bai_path else [math.inf]
        print(f"BaI: {args.bai_steps} steps x {args.bai_seq_len} tokens of {where}, lr {args.bai_lr}, "
              f"t over {', '.join(f'{t:.3g}' for t in points)}")
        st = bai(model, lins, cal, args.bai_steps, args.bai_lr, points)

    def loss_with(fn) -> float:
        with torch.no_grad():
            for n, m in lins.items():
                m.weight.copy_(fn(n))
        return nll(model, x)

    def binary(t, form):
        return lambda n: binary_weight(w_fp[n] / st[n], torch.ones(w_fp[n].shape[0]), st[n], t, form=form)

    def ternary(t, form):
        return lambda n: ternary_weight(w_fp[n], "absmean", False, t, ste=False, form=form)

    ts = schedule("exponential", 20)
    fp = loss_with(lambda n: w_fp[n])
    cols, results = [], {}
    for method in methods:
        q = binary if method == "binary" else ternary
        hard = loss_with(q(math.inf, "paper"))  # t = inf is the same quantizer for every form
        for form in forms:
            col = f"{method} {form}"
            cols.append(col)
            path = [fp if t == 0 else loss_with(q(t, form)) for t in ts]
            results[col] = path + [hard]
            print(f"  {col}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    width = max(14, *(len(c) + 2 for c in cols))
    head = f"| {'chunk':>6} | {'t':>7} | " + " | ".join(f"{c:>{width}}" for c in cols) + " |"
    print()
    print(head)
    print("|" + "---|" * (2 + len(cols)))
    rows = [(str(c), f"{t:.3f}") for c, t in enumerate(ts)] + [("export", "inf")]
    for i, (c, t) in enumerate(rows):
        label = "0 FP" if i == 0 else c
        vals = []
        for col in cols:
            v = results[col][i]
            mark = " *" if i < len(ts) and v > results[col][-1] else "  "  # worse than the hard quantizer
            vals.append(f"{v:>{width - 2}.3f}{mark}")
        print(f"| {label:>6} | {t:>7} | " + " | ".join(vals) + " |")
    print()
    print("* = worse than t = inf. Full-precision loss (t = 0): %.3f" % fp)
    for col in cols:
        v = results[col]
        worse = [i for i in range(len(ts)) if v[i] > v[-1]]
        first_broken = next((i for i in range(len(ts)) if v[i] > 0.5 * (v[0] + v[-1])), None)
        print(f"{col:>{width}}: monotone {'yes' if monotone(v) else 'no '}; chunks worse than t = inf: "
              f"{len(worse)}/{len(ts)} (max {max(v[:-1]) - v[-1]:+.2f}); first chunk past halfway FP->inf: "
              f"{first_broken if first_broken is not None else '-'}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
