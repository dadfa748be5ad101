"""Perplexity over non-overlapping windows: the protocol of GPTQ, OmniQuant and ParetoQ.

Each set is joined into one text as those codebases do, tokenized once and cut into
non-overlapping windows of seq_len; perplexity = exp(mean next-token NLL over all windows).
C4 takes the first 1100 documents of validation shard 0 (our local copy holds 1025) joined
with a space and keeps at most 256 windows, as GPTQ's ``get_c4`` does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from binarize.calibration.streams import named_rows
from binarize.errors import BinarizeError


@dataclass(frozen=True)
class EvalSet:
    split: str
    join: str
    max_rows: int | None = None
    max_windows: int | None = None


# How each benchmark's rows are joined before tokenizing, as the GPTQ codebase does.
EVAL_SPLITS = {
    "wikitext2": EvalSet("test", "\n\n"),
    "ptb": EvalSet("test", " "),
    "c4": EvalSet("validation", " ", max_rows=1100, max_windows=256),
}


def _check_dataset(name: str) -> None:
    if name not in EVAL_SPLITS:
        raise BinarizeError(f"unknown eval dataset {name!r} (known: {', '.join(EVAL_SPLITS)})")


def window_count(n_tokens: int, seq_len: int, max_windows: int | None = None, limit: int | None = None) -> int:
    """Non-overlapping windows evaluated: as many as fit, capped by the set and by --limit."""
    return min([n_tokens // seq_len, *(v for v in (max_windows, limit) if v is not None)])


def eval_tokens(tokenizer, dataset: str) -> tuple[torch.Tensor, dict]:
    """Token ids of an evaluation set and a description of how they were made."""
    _check_dataset(dataset)
    spec = EVAL_SPLITS[dataset]
    rows, where = named_rows(dataset, spec.split)
    rows = rows[: spec.max_rows] if spec.max_rows else rows
    ids = tokenizer(spec.join.join(rows), return_tensors="pt")["input_ids"][0]
    return ids, {"dataset": dataset, "split": spec.split, "join": spec.join, "source": where, "rows": len(rows),
                 "tokens": int(ids.numel()), "max_windows": spec.max_windows}


# Architectures whose causal-LM forward is exactly lm_head(model(...).last_hidden_state): for
# these the head and the loss run in chunks of positions, so the [B, L, vocab] fp32 logits
# (400 MB per 2048-token window of a 49k vocabulary) are never materialised. Others (logit
# scaling or soft-capping, unknown wrappers) take the plain full-logits path.
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
HEAD_CHUNK = 256


def _plain_head(model) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in _PLAIN_HEAD_TYPES and hasattr(model, "model")
            and getattr(model, "lm_head", None) is not None
            and not getattr(config, "final_logit_softcapping", None))


def window_nll(model, x: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows (fp32), each window's last token unpredicted."""
    if _plain_head(model):
        h = model.model(input_ids=x).last_hidden_state
        total = 0.0
        for s in range(0, x.shape[1] - 1, HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, x.shape[1] - 1)
            logits = model.lm_head(h[:, s:e]).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, s + 1:e + 1].reshape(-1),
                                           reduction="sum"))
        return total
    logits = model(input_ids=x).logits.float()
    labels = F.pad(x[:, 1:], (0, 1), value=-100)  # shift the labels, not the logits (a slice would copy them)
    return float(F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                 reduction="sum"))


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seq_len: int, limit: int | None = None, batch_size: int = 1,
               max_windows: int | None = None, on_batch=None) -> dict:
    """exp(mean next-token NLL) over the first ``limit`` non-overlapping windows of seq_len.

    Only hidden states / logits are asked of the model (no labels), and the NLL is summed in
    fp32 per batch, so batching windows changes nothing but speed. ``on_batch(n)`` reports
    progress.
    """
    n = window_count(ids.numel(), seq_len, max_windows, limit)
    if n == 0:
        raise BinarizeError(f"evaluation text has fewer than {seq_len} tokens")
    device = next(model.parameters()).device
    windows = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i : i + batch_size].to(device)
        total += window_nll(model, x)
        count += x[:, 1:].numel()
        if on_batch is not None:
            on_batch(x.shape[0])
    nll = total / count
    ppl = math.exp(nll) if nll < 700 else math.inf if nll == nll else math.nan  # exp overflows past ~709
    return {"ppl": ppl, "nll": nll, "windows": n, "seq_len": seq_len, "predicted_tokens": count}


def check_finite_result(dataset: str, desc: str, res: dict) -> None:
    """A perplexity that is NaN or infinite is no result: refuse it (BinarizeError, one line naming
    the dataset) instead of printing ``nan`` with exit 0."""
    if not (math.isfinite(res["ppl"]) and math.isfinite(res["nll"])):
        raise BinarizeError(f"{dataset}: the perplexity of {desc} is not finite (mean NLL {res['nll']} over "
                            f"{res['windows']} windows): its outputs overflow or hold NaN, so no result is reported")


@torch.inference_mode()
def mean_loss(model, blocks: torch.Tensor, micro_batch: int = 1) -> float:
    """Mean next-token loss over a set of blocks (BaI's before/after measure)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], micro_batch):
        x = blocks[i : i + micro_batch].to(device)
        total += float(model(input_ids=x, labels=x).loss) * x.shape[0]
        count += x.shape[0]
    return total / count


# The named protocols of ``binarize eval`` (--quick, --full): windows of seq_len tokens, the first
# ``limit`` of each set (None: all; C4 keeps at most 256 either way), on these sets. quick is the
# 16 x 1024 figure README quotes (minutes on a CPU); full is the GPTQ/OmniQuant protocol.
PROTOCOLS = {
    "quick": {"seq_len": 1024, "limit": 16, "datasets": ["wikitext2", "c4", "ptb"]},
    "full": {"seq_len": 2048, "limit": None, "datasets": ["wikitext2", "c4", "ptb"]},
}
DEFAULT_SEQ_LEN, DEFAULT_DATASETS = 2048, ["wikitext2"]  # binarize eval without a preset


def protocol_name(seq_len: int, limit: int | None) -> str:
    """quick or full when the windows are that protocol's (whichever sets they are taken from), else custom."""
    return next((n for n, p in PROTOCOLS.items() if (p["seq_len"], p["limit"]) == (seq_len, limit)), "custom")


def describe_protocol(name: str, seq_len: int, limit: int | None, datasets: list[str]) -> str:
    windows = f"first {limit} windows" if limit else "all windows (C4: at most 256)"
    return f"protocol: {name} ({windows} x {seq_len} tokens) on {', '.join(datasets)}"


def resolve_protocol(quick: bool = False, full: bool = False, seq_len: int | None = None, limit: int | None = None,
                     datasets: list[str] | None = None) -> dict:
    """--quick / --full / explicit flags -> {name, seq_len, limit, datasets}. A preset's --seq-len and
    --limit may be repeated but not contradicted (BinarizeError, one line); --datasets picks other sets
    for the preset's windows."""
    if quick and full:
        raise BinarizeError("--quick and --full are exclusive: --quick is 16 windows x 1024 tokens, --full every "
                            "window x 2048; give one of them")
    preset = "quick" if quick else "full" if full else None
    if preset is None:
        seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
        datasets = list(DEFAULT_DATASETS) if datasets is None else datasets
        return {"name": protocol_name(seq_len, limit), "seq_len": seq_len, "limit": limit, "datasets": datasets}
    p = PROTOCOLS[preset]
    for flag, given, want in (("--seq-len", seq_len, p["seq_len"]), ("--limit", limit, p["limit"])):
        if given is not None and given != want:
            windows = f"the first {p['limit']} windows" if p["limit"] else "every window"
            raise BinarizeError(f"--{preset} evaluates {windows} x {p['seq_len']} tokens; {flag} {given} contradicts "
                                f"it (drop --{preset} for a custom protocol, or drop {flag})")
    return {"name": preset, "seq_len": p["seq_len"], "limit": p["limit"],
            "datasets": list(p["datasets"]) if datasets is None else datasets}


@dataclass
class EvalOptions:
    """What ``binarize eval`` measures, for every model it is given."""

    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seq_len: int = 2048
    limit: int | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    ptq: str = "none"  # none | sign | ternary
    tasks: list[str] = field(default_factory=list)
    tasks_include: Path | None = None
    tasks_limit: int | None = None
    progress: bool = True

    def check(self) -> None:
        """Reject bad options before any model is loaded."""
        for d in self.datasets:
            _check_dataset(d)
        if not self.datasets and not self.tasks:
            raise BinarizeError("nothing to evaluate: give --datasets and/or --tasks")
        if self.ptq not in ("none", "sign", "ternary"):
            raise BinarizeError(f"--ptq must be none, sign or ternary, got {self.ptq!r}")
        if self.dtype not in DTYPES:
            raise BinarizeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name, v in (("--seq-len", self.seq_len), ("--batch-size", self.batch_size), ("--limit", self.limit),
                        ("--tasks-limit", self.tasks_limit)):
            if v is not None and v <= 0:
                raise BinarizeError(f"{name} must be positive, got {v}")
        if self.device != "auto" and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BinarizeError(f"--device {self.device}: CUDA is not available on this machine")


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _placement(opts: EvalOptions) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          "cpu" if opts.device == "auto" else opts.device)
    dtype = DTYPES[opts.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def apply_ptq(model, method: str) -> None:
    """Replace every converted-to-be linear's weight by its round-to-nearest sign/ternary copy."""
    from .models import convertible_linears
    from .quantizers import naive_sign, naive_ternary

    fn = {"sign": naive_sign, "ternary": naive_ternary}[method]
    with torch.no_grad():
        for lin in convertible_linears(model).values():
            lin.weight.copy_(fn(lin.weight))


def evaluate_models(specs: list[str | None], opts: EvalOptions, echo=print) -> list[dict]:
    """One result row per model: perplexity per dataset (with its protocol) and task metrics."""
    from .formats.latent import is_converted_dir
    from .formats.packed_reader import is_packed_dir
    from .loading import load_any
    from .models import max_positions

    device, dtype = _placement(opts)
    protocol = {"name": protocol_name(opts.seq_len, opts.limit), "seq_len": opts.seq_len, "limit": opts.limit,
                "datasets": list(opts.datasets)}
    if opts.datasets:
        echo(describe_protocol(**protocol))
    token_cache: dict[tuple[str, str], tuple[torch.Tensor, dict]] = {}
    rows = []
    for spec in specs:
        if opts.ptq != "none" and (is_packed_dir(spec) or is_converted_dir(spec)):
            raise BinarizeError(f"--ptq applies to full-precision models; {spec} is already converted")
        model, tok, desc = load_any(spec, cpu_cache="fp32" if device.type == "cpu" else None)
        limit_pos = max_positions(model.config)
        if opts.datasets and limit_pos and opts.seq_len > limit_pos:
            raise BinarizeError(f"seq_len {opts.seq_len} exceeds the model's maximum of {limit_pos} positions")
        if opts.ptq != "none":
            apply_ptq(model, opts.ptq)
            desc += f" + naive {opts.ptq}"
        model.to(device=device, dtype=dtype).eval()
        row = {"model": desc, "spec": spec, "ptq": opts.ptq, "device": str(device), "dtype": str(dtype).split(".")[-1],
               "protocol": protocol, "perplexity": {}, "tasks": {}}
        for name in opts.datasets:
            key = (tok.name_or_path, name)
            if key not in token_cache:  # models sharing a tokenizer tokenize once
                token_cache[key] = eval_tokens(tok, name)
            ids, info = token_cache[key]
            start = time.perf_counter()
            res = _with_progress(opts, name, ids, info, lambda cb: perplexity(
                model, ids, opts.seq_len, opts.limit, opts.batch_size, info["max_windows"], cb))
            check_finite_result(name, desc, res)
            res["seconds"] = round(time.perf_counter() - start, 2)
            row["perplexity"][name] = {**info, **res}
            echo(f"{name:10s} ppl {res['ppl']:12.3f}  ({res['windows']} windows x {opts.seq_len}, "
                 f"{res['seconds']:.0f} s)  {desc}")
        if opts.tasks:
            from .zeroshot import run_tasks

            out = run_tasks(model, tok, opts.tasks, include=opts.tasks_include, limit=opts.tasks_limit,
                            batch_size=opts.batch_size)
            row["tasks"] = out["results"]
            for task, metrics in out["results"].items():
                echo(f"{task:10s} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  {desc}")
        rows.append(row)
        del model
    return rows


def _with_progress(opts: EvalOptions, name: str, ids: torch.Tensor, info: dict, run):
    if not opts.progress:
        return run(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    n = window_count(ids.numel(), opts.seq_len, info["max_windows"], opts.limit)
    with Progress(TextColumn(f"{name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(name, total=n)
        return run(lambda k: bar.advance(task, k))


def markdown_table(rows: list[dict], ratio: bool = False) -> str:
    """Perplexity per dataset and task metrics; with ``ratio``, each value over the first model's."""
    datasets = list(dict.fromkeys(d for r in rows for d in r["perplexity"]))
    metrics = list(dict.fromkeys((t, m) for r in rows for t, ms in r["tasks"].items() for m in ms))
    head = ["model", *(f"{d} ppl" for d in datasets), *(f"{t} {m}" for t, m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for r in rows:
        cells = [r["model"]]
        for d in datasets:
            v = r["perplexity"].get(d, {}).get("ppl")
            b = base["perplexity"].get(d, {}).get("ppl")
            cells.append("" if v is None else f"{v:.3f}" + (f" ({v / b:.2f}x)" if ratio and b else ""))
        for t, m in metrics:
            v = r["tasks"].get(t, {}).get(m)
            b = base["tasks"].get(t, {}).get(m)
            cells.append("" if v is None else f"{v:.4f}" + (f" ({v / b:.2f}x)" if ratio and b else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
