"""``run.json``: the one schema of a conversion's record, written by training and read by the CLI,
``binarize ablate`` and the benchmarks (``RunRecord.read``), never by raw keys elsewhere.

The JSON keeps the layout it always had (``steps[i].lambda``, ``t`` as ``"inf"`` when infinite,
``tokens.trained`` ...), so run directories written before this schema read back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import write_json
from ..errors import BinarizeError


@dataclass
class StepRecord:
    """One optimizer step. ``t`` is the progressive sharpness (inf: hard quantizer), ``lam`` the
    continual switch's quantization strength, ``loss`` the mean next-token loss (nats) over the
    step's global batch, ``kd`` the mean distillation KL (or None), ``tokens`` trained so far."""

    step: int
    chunk: int
    t: float
    lam: float
    lr: float
    loss: float
    kd: float | None
    tokens: int
    tokens_per_s: float
    wall_s: float

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["t"] = self.t if math.isfinite(self.t) else "inf"
        return {("lambda" if k == "lam" else k): v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        return cls(d["step"], d["chunk"], float(d["t"]), d.get("lambda", 1.0), d["lr"], d["loss"], d.get("kd"),
                   d["tokens"], d["tokens_per_s"], d["wall_s"])


@dataclass
class BaiRecord:
    """Binary-aware initialization: loss (nats) on ``eval_sequences`` calibration sequences before
    and after, the per-step losses, steps, Adam lr and tokens processed."""

    loss_before: float
    loss_after: float
    losses: list[float]
    steps: int
    lr: float
    eval_sequences: int
    tokens: int


@dataclass
class BlockwiseRecord:
    """Block-wise reconstruction: per block, the reconstruction loss (``loss`` kind) at its first
    and last step and at the hard quantizer afterwards, with the block's wall time; ``tokens`` is
    the sequence tokens one block trains on at the planned ``steps`` (steps x batch x seq_len),
    ``activation_mib`` the size of the cached block inputs and targets. Each block's own ``steps``
    and ``block_s`` (its wall time in all) are in ``blocks``: a timed run's deadline may change
    the steps from block to block (``timeplan.deadline_block_steps``)."""

    inputs: str
    loss: str
    steps: int
    batch: int
    sequences: int
    lr: float
    tokens: int
    activation_mib: float
    blocks: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class TokenRecord:
    """The budget: ``requested`` tokens became ``sequences`` of ``seq_len`` (``budget_used``
    tokens; ``dropped_remainder`` left over) in ``optimizer_steps`` steps of ``per_step`` tokens."""

    requested: int
    seq_len: int
    sequences: int
    budget_used: int
    dropped_remainder: int
    per_step: int
    optimizer_steps: int
    trained: int = 0

    @classmethod
    def of(cls, tokens: int, budget) -> "TokenRecord":
        """The record of ``tokens`` requested as ``budget`` (``plan.Budget``) lays them out."""
        return cls(requested=tokens, seq_len=budget.seq_len, sequences=budget.n_sequences,
                   budget_used=budget.tokens_used, dropped_remainder=tokens % budget.seq_len,
                   per_step=budget.seqs_per_step * budget.seq_len, optimizer_steps=budget.steps)


@dataclass
class RunRecord:
    binarize_version: str
    model: str
    from_scratch: str | None
    recipe: dict
    quantized_layers: int
    data: dict
    tokens: TokenRecord
    steps: list[StepRecord] = field(default_factory=list)
    bai: BaiRecord | None = None
    wall_s: float = 0.0
    peak_memory_mib: dict | None = None
    blockwise: BlockwiseRecord | None = None
    processes: int = 1  # training processes (DDP / FSDP ranks); the record's losses are global means
    init_from: dict | None = None  # --init-from: {"run": RUN, "wall_s": its BaI + block-wise seconds}
    fsdp: bool = False  # end-to-end QAT sharded over the processes (train/sharding.py)
    loss_backend: str = "chunked"  # the end-to-end loss's implementation (train/liger_loss.py)
    hessian: dict | None = None  # init: hessian (train/hessian_init.py HessianInitRecord as a dict)
    plan: dict | None = None  # --time: the plan (train/timeplan.py TimePlan.to_dict) and its actual_s

    def tail_loss(self, parts: int = 10) -> float | None:
        """Mean loss over the last 1/``parts`` of the steps (at least one); None without steps."""
        if not self.steps:
            return None
        tail = self.steps[-max(1, len(self.steps) // parts):]
        return sum(s.loss for s in tail) / len(tail)

    def to_dict(self) -> dict[str, Any]:
        out = {"binarize_version": self.binarize_version, "model": self.model, "from_scratch": self.from_scratch,
               "recipe": self.recipe, "quantized_layers": self.quantized_layers, "data": self.data,
               "steps": [s.to_dict() for s in self.steps],
               "bai": dataclasses.asdict(self.bai) if self.bai else None,
               "tokens": dataclasses.asdict(self.tokens), "wall_s": self.wall_s, "processes": self.processes,
               "fsdp": self.fsdp, "loss_backend": self.loss_backend}
        if self.blockwise is not None:
            out["blockwise"] = dataclasses.asdict(self.blockwise)
        if self.peak_memory_mib is not None:
            out["peak_memory_mib"] = self.peak_memory_mib
        if self.init_from is not None:
            out["init_from"] = self.init_from
        if self.hessian is not None:
            out["hessian"] = self.hessian
        if self.plan is not None:
            out["plan"] = self.plan
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """The record of a run.json document; BinarizeError for a field of the wrong type."""
        record = cls._from_dict(d)
        record.check()
        return record

    def check(self) -> None:
        """Numbers where numbers belong (a damaged run.json must not load as a record)."""
        def number(v, finite: bool = True) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and (not finite or math.isfinite(v))

        bad = [f"tokens.{k}" for k, v in dataclasses.asdict(self.tokens).items()
               if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        bad += [f"steps[{i}].{k}" for i, s in enumerate(self.steps) for k, v in dataclasses.asdict(s).items()
                if not (number(v, k != "t") or (k == "kd" and v is None))]
        if not isinstance(self.recipe, dict) or not isinstance(self.data, dict):
            bad.append("recipe or data (not a mapping)")
        if bad:
            raise BinarizeError(f"run record: {', '.join(bad[:3])} not a valid number")

    @classmethod
    def _from_dict(cls, d: dict) -> "RunRecord":
        return cls(d["binarize_version"], d["model"], d.get("from_scratch"), d["recipe"], d["quantized_layers"],
                   d.get("data", {}), TokenRecord(**d["tokens"]), [StepRecord.from_dict(s) for s in d["steps"]],
                   BaiRecord(**d["bai"]) if d.get("bai") else None, d.get("wall_s", 0.0), d.get("peak_memory_mib"),
                   BlockwiseRecord(**d["blockwise"]) if d.get("blockwise") else None, d.get("processes", 1),
                   d.get("init_from"), d.get("fsdp", False), d.get("loss_backend", "chunked"), d.get("hessian"),
                   d.get("plan") if isinstance(d.get("plan"), dict) else None)

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> "RunRecord":
        """``run.json`` of a run (or packed) directory, or the file itself."""
        path = Path(path)
        path = path / "run.json" if path.is_dir() else path
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # ValueError: bad UTF-8 too
            raise BinarizeError(f"{path}: unreadable run record ({type(exc).__name__}: {exc})") from None


def plot_loss(record: RunRecord, path: Path) -> None:
    """``loss.png``: the training loss (and KL) against tokens, t on a second axis where it varies,
    BaI losses as lines; every curve in the legend, which sits below the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = record.steps
    fig, ax = plt.subplots(figsize=(8, 4.5))
    handles = []
    if steps:
        tok = [s.tokens for s in steps]
        handles += ax.plot(tok, [s.loss for s in steps], label="QAT loss (CE)", color="tab:blue")
        if any(s.kd is not None for s in steps):
            handles += ax.plot(tok, [s.kd if s.kd is not None else float("nan") for s in steps],
                               label="distillation KL", color="tab:green", alpha=0.7)
        ts = [s.t for s in steps if math.isfinite(s.t)]
        if len(set(ts)) > 1:  # t only where it varies (progressive recipes); STE / BitNet stay hard throughout
            ax2 = ax.twinx()
            handles += ax2.step(tok, [s.t if math.isfinite(s.t) else float("nan") for s in steps], where="post",
                                color="tab:orange", alpha=0.6, label="t (progressive sharpness, right axis)")
            ax2.set_ylabel("t (progressive sharpness)")
    bai = record.bai
    if bai:
        handles.append(ax.axhline(bai.loss_before, ls=":", color="gray", label=f"before BaI {bai.loss_before:.2f}"))
        handles.append(ax.axhline(bai.loss_after, ls="--", color="gray", label=f"after BaI {bai.loss_after:.2f}"))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(f"binarize convert: {record.recipe['name']}")
    if handles:  # below the axes, so it never covers a curve
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=min(3, len(handles)),
                  fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
