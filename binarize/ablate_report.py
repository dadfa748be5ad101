"""The report of an ablation plan (``binarize ablate``): the markdown table of every member and
the plots of loss and perplexity against tokens and wall time, from the members' results.
``plan`` is an ``ablate.Plan`` throughout (not imported: ``ablate`` imports this module)."""

from __future__ import annotations

import math
from pathlib import Path


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"


def markdown_table(plan, results: list[dict]) -> str:
    datasets = [d.strip() for d in str(plan.eval["datasets"]).split(",") if d.strip()]
    lim = f", first {plan.eval['limit']} windows" if plan.eval.get("limit") else ""
    what = f"from scratch ({plan.from_scratch})" if plan.from_scratch else (plan.model or "default model")
    head = [f"### {plan.name}: {what}, {plan.tokens:,} tokens, base recipe {plan.recipe}",
            "", f"{plan.description}".strip(), "",
            "| run | recipe | changes | final loss | " + " | ".join(f"{d} ppl (seq {plan.eval['seq_len']}{lim})"
                                                          for d in datasets) + " | tokens | time (s) | peak RSS (MiB) |",
            "|" + "---|" * (7 + len(datasets))]
    for r in results:
        changes = ", ".join(f"{k}={v}" for k, v in r.get("changes", {}).items()) or "(base)"
        if r["status"] != "ok":
            head.append(f"| {r['name']} | {r.get('recipe', '')} | {changes} | {r['status']}: "
                        f"{r.get('error', '')[:120]} |" + " |" * (3 + len(datasets)))
            continue
        ppl = " | ".join(_fmt(r["ppl"].get(d), 1) for d in datasets)
        head.append(f"| {r['name']} | {r['recipe']} | {changes} | {_fmt(r['final_loss'])} | {ppl} | "
                    f"{r['tokens']:,} | {r['wall_s']:,.0f} | {_fmt(r['peak_memory_mib'].get('cpu_rss'), 0)} |")
    return "\n".join(line for line in head if line is not None)


def plot(plan, results: list[dict], path: Path) -> None:
    """Loss curves overlaid (EMA-smoothed, raw faint) and perplexity bars (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for i, r in enumerate(ok):
        if not r["losses"]:
            continue
        color = f"C{i % 10}"
        tok, loss = zip(*r["losses"])
        k = len(loss) // 50  # centred moving average over 2k+1 steps: smooth, without an EMA's lag
        smooth = [sum(loss[max(0, j - k):j + k + 1]) / len(loss[max(0, j - k):j + k + 1]) for j in range(len(loss))]
        ax.plot(tok, loss, color=color, alpha=0.2, lw=0.8)
        ax.plot(tok, smooth, color=color, lw=1.6, label=r["name"])
        if r.get("switch_tokens") and r["switch_tokens"] > tok[0]:
            ax.axvline(r["switch_tokens"], color=color, ls=":", lw=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("next-token loss (faint: per step; moving average)")
    ax.set_title(f"{plan.name}: loss")
    if ok:
        ax.legend(fontsize=8)
    ds = str(plan.eval["datasets"]).split(",")[0].strip()
    names = [r["name"] for r in ok]
    vals = [r["ppl"].get(ds, float("nan")) for r in ok]
    bars = bx.bar(range(len(names)), vals, color=[f"C{i % 10}" for i in range(len(names))])
    bx.bar_label(bars, labels=[_fmt(v, 1) for v in vals], fontsize=7)
    bx.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    finite = [v for v in vals if math.isfinite(v) and v > 0]
    log = bool(finite) and max(finite) > 10 * min(finite)  # log only when the bars span a decade
    if log:
        bx.set_yscale("log")
    bx.set_ylabel(f"{ds} perplexity" + (" (log)" if log else ""))
    bx.set_title("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compact(v: float, _pos=None) -> str:
    """Tick label: 500, 2k, 50k, 1M."""
    return next((f"{v / div:g}{unit}" for div, unit in ((1e6, "M"), (1e3, "k")) if v >= div), f"{v:g}")


def plot_quality(plan, results: list[dict], path: Path) -> None:
    """Perplexity of each eval dataset against the training budget (tokens: QAT + BaI + block-wise
    sequence tokens) and against the conversion's wall time, one line per ``series``; log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    datasets = [d.strip() for d in str(plan.eval["datasets"]).split(",") if d.strip()]
    ok = [r for r in results if r["status"] == "ok" and r.get("series")]
    series = list(dict.fromkeys(r["series"] for r in ok))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    for row, ds in enumerate(datasets):
        for col, (key, label) in enumerate((("budget", "training tokens (QAT + BaI + block-wise)"),
                                            ("wall_s", "conversion wall time (s)"))):
            ax = axes[row][col]
            for i, name in enumerate(series):
                pts = sorted((r.get("tokens", 0) + r.get("bai_tokens", 0) + r.get("blockwise_tokens", 0)
                              if key == "budget" else r["wall_s"], r["ppl"].get(ds, float("nan")))
                             for r in ok if r["series"] == name)
                ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # labels at 1, 2, 5 x 10^k only: minor labels overlapped
                axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ticker.FuncFormatter(_compact))
                axis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylabel(f"{ds} perplexity")
            ax.grid(True, which="both", alpha=0.3)
            if row == 0 and col == 0 and series:
                ax.legend(fontsize=8)
    fig.suptitle(f"{plan.name}: perplexity against budget and wall time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
