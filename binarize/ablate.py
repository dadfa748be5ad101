"""``binarize ablate PLAN``: several recipes on one model, data, budget and seed, side by side.

A plan is a YAML file (shipped ones in ``recipes/ablations/``)::

    name: seed003-scaling
    model: null                  # default model; with from_scratch: whose tokenizer to use
    from_scratch: null           # or a --config shape (tiny | small | medium)
    tokens: 20k
    recipe: binaryllm            # base recipe of every member
    set: {seq_len: 256}          # overrides for every member
    eval: {datasets: wikitext2, seq_len: 1024, limit: 16}
    runs:
      - {name: dual}
      - {name: sa-only, set: {scaling: analytic}}

Every member is validated (recipe, keys, switch point, option clashes) before anything trains.
Each member converts in its own process (``binarize convert``, then ``binarize eval``), so a
crash or an out-of-memory kill loses that member only; its error goes in the table and the
others go on. Re-running the same command resumes: finished members are skipped, an
interrupted conversion continues from its checkpoint, failed ones are retried.

Members that differ only in ``tokens`` and end-to-end keys (same recipe and other keys) share
binary-aware initialization and the block-wise stage, which do not depend on either: the first of
them to convert keeps its initialisation (``--save-init``), the others start from it
(``--init-from``; the result is the model they would have trained themselves,
``train/init_state.py``). Their wall time in the table and plot still counts the shared
stages' time (``wall_s`` = own + the initialisation's).

"Final loss" is the mean training loss over the last tenth of the steps (at least one): single
small-batch losses are too noisy to rank recipes by.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .ablate_report import markdown_table, plot, plot_quality
from .checkpoint import write_json
from .errors import BinarizeError
from .recipe import load_recipe, parse_tokens, recipe_dir
from .train.init_state import INIT, QAT_ONLY
from .train.record import RunRecord

PLAN_KEYS = {"name", "description", "model", "from_scratch", "tokens", "recipe", "set", "eval", "runs"}
MEMBER_KEYS = {"name", "recipe", "set", "tokens", "series"}
EVAL_KEYS = {"datasets", "seq_len", "limit"}


@dataclass
class Member:
    name: str
    recipe: str
    overrides: dict[str, Any]  # the member's own changes (shown in the table)
    tokens: int | None = None  # the member's own budget (else the plan's)
    series: str | None = None  # members of one series are one line of the quality plot (ppl against budget)


@dataclass
class Plan:
    name: str
    members: list[Member]
    tokens: int
    recipe: str = "binaryllm"
    common: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    from_scratch: str | None = None
    eval: dict[str, Any] = field(default_factory=lambda: {"datasets": "wikitext2", "seq_len": 1024, "limit": 16})
    description: str = ""

    def overrides(self, m: Member) -> dict[str, Any]:
        return {**self.common, **m.overrides}

    def tokens_of(self, m: Member) -> int:
        return self.tokens if m.tokens is None else m.tokens  # a member's 0: post-training quantization


def plan_dir() -> Path:
    return recipe_dir() / "ablations"


def find_plan(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a plan (its --out) is not one
        if not path.is_file():
            raise BinarizeError(f"plan file not found: {path}")
        return path
    shipped = plan_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        known = ", ".join(sorted(p.stem for p in plan_dir().glob("*.yaml")))
        raise BinarizeError(f"unknown plan {name_or_path!r} (shipped: {known})")
    return shipped


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BinarizeError(f"{what} must be a mapping of recipe keys to values")
    return value


def load_plan(name_or_path: str, tokens: str | None = None) -> Plan:
    """Parse and fully validate a plan: every member's recipe is loaded and its budget checked."""
    from .train.plan import check_job, fit_chunks

    path = find_plan(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BinarizeError(f"malformed plan {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise BinarizeError(f"malformed plan {path}: expected a mapping")
    unknown = set(raw) - PLAN_KEYS
    if unknown:
        raise BinarizeError(f"plan {path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(PLAN_KEYS))})")
    if "tokens" not in raw and tokens is None:
        raise BinarizeError(f"plan {path}: no token budget (key tokens, or --tokens)")
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise BinarizeError(f"plan {path}: runs must be a non-empty list")
    ev = {"datasets": "wikitext2", "seq_len": 1024, "limit": 16, **_mapping(raw.get("eval"), f"plan {path}: eval")}
    if set(ev) - EVAL_KEYS:
        raise BinarizeError(f"plan {path}: unknown eval key(s) {', '.join(sorted(set(ev) - EVAL_KEYS))}")
    plan = Plan(name=str(raw.get("name") or path.stem), members=[], tokens=parse_tokens(tokens or raw["tokens"]),
                recipe=str(raw.get("recipe", "binaryllm")), common=_mapping(raw.get("set"), f"plan {path}: set"),
                model=raw.get("model"), from_scratch=raw.get("from_scratch"), eval=ev,
                description=str(raw.get("description", "")))
    seen = set()
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or "name" not in r:
            raise BinarizeError(f"plan {path}: run {i + 1} needs at least a name")
        if set(r) - MEMBER_KEYS:
            raise BinarizeError(f"plan {path}: run {r['name']!r}: unknown key(s) {', '.join(sorted(set(r) - MEMBER_KEYS))}")
        name = str(r["name"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in seen:
            raise BinarizeError(f"plan {path}: run name {name!r} is not a unique file-safe name")
        seen.add(name)
        plan.members.append(Member(name, str(r.get("recipe", plan.recipe)), _mapping(r.get("set"), f"run {name}: set"),
                                   parse_tokens(r["tokens"], allow_zero=True) if "tokens" in r else None,
                                   str(r["series"]) if "series" in r else None))
    for m in plan.members:
        try:
            recipe = load_recipe(m.recipe, plan.overrides(m))
            check_job(fit_chunks(recipe, plan.tokens_of(m))[0], plan.tokens_of(m), plan.from_scratch, "none")
        except BinarizeError as exc:
            raise BinarizeError(f"plan {path}: run {m.name!r}: {exc}") from None
    return plan


def _cli_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def init_peers(plan: Plan, m: Member) -> list[Member]:
    """The members (``m`` among them, plan order) that share m's initialisation: same recipe and
    keys but those only end-to-end QAT reads (``init_state.QAT_ONLY``: lr, distillation, ...), any
    budget, where the recipe has BaI or a block-wise stage; [] when m shares with none."""
    def key(x: Member):
        r = load_recipe(x.recipe, plan.overrides(x))
        if plan.from_scratch or not (r.bai or r.blockwise_steps):
            return None
        init_keys = {k: v for k, v in plan.overrides(x).items() if k not in QAT_ONLY}
        return x.recipe, json.dumps(init_keys, sort_keys=True)

    k = key(m)
    peers = [x for x in plan.members if k is not None and key(x) == k]
    return peers if len(peers) > 1 else []


def init_args(plan: Plan, m: Member, runs: Path, planned: bool = False) -> list[str]:
    """``--init-from`` a peer whose run kept its initialisation (``planned``: assume every earlier
    peer did), else ``--save-init`` so that the later peers can start from this one."""
    peers = init_peers(plan, m)
    for p in peers:
        if p is not m and ((runs / p.name / INIT / "init.json").is_file()
                           or (planned and plan.members.index(p) < plan.members.index(m))):
            return ["--init-from", str(runs / p.name)]
    return ["--save-init"] if peers else []


def convert_command(plan: Plan, m: Member, out: Path, resume: bool, planned: bool = False) -> list[str]:
    """``binarize convert`` of member m into ``out`` (a plan's ``runs/NAME``), sharing the
    initialisation with its peers (``init_args``)."""
    cmd = [sys.executable, "-m", "binarize.cli", "convert"]
    if plan.model:
        cmd.append(str(plan.model))
    cmd += ["--tokens", str(plan.tokens_of(m)), "--recipe", m.recipe, "--out", str(out), "--no-progress", "--export", "none",
            "--profile", "recipe"]  # a plan's settings are its own, on any device
    for k, v in plan.overrides(m).items():
        cmd += ["--set", f"{k}={_cli_value(v)}"]
    if plan.from_scratch:
        cmd += ["--from-scratch", "--config", plan.from_scratch]
    if resume:
        cmd.append("--resume")
    return cmd + init_args(plan, m, out.parent, planned)


def eval_command(plan: Plan, run: Path, json_out: Path) -> list[str]:
    e = plan.eval
    cmd = [sys.executable, "-m", "binarize.cli", "eval", str(run), "--datasets", str(e["datasets"]),
           "--seq-len", str(e["seq_len"]), "--json", str(json_out), "--no-progress"]
    if e.get("limit"):
        cmd += ["--limit", str(e["limit"])]
    return cmd


def _run_logged(cmd: list[str], log: Path) -> tuple[int, str]:
    """Run a member's command with its output appended to its log; (exit code, last error line)."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    return rc, err


def run_member(plan: Plan, m: Member, out: Path, echo: Callable[[str], None]) -> dict:
    run, log = out / "runs" / m.name, out / "logs" / f"{m.name}.log"
    eval_json = out / "results" / f"{m.name}.eval.json"
    result = {"name": m.name, "recipe": m.recipe, "changes": m.overrides, "status": "ok", "series": m.series}
    t0 = time.perf_counter()
    if not (run / "run.json").is_file():
        resume = (run.with_name(m.name + ".partial") / "checkpoint" / "state.json").is_file()
        echo(f"[{m.name}] {'resuming' if resume else 'converting'} (log: {log})")
        rc, err = _run_logged(convert_command(plan, m, run, resume), log)
        if rc != 0:
            return {**result, "status": "failed", "error": f"convert exit {rc}: {err}"}
    if not eval_json.is_file():
        echo(f"[{m.name}] evaluating")
        rc, err = _run_logged(eval_command(plan, run, eval_json), log)
        if rc != 0:
            return {**result, "status": "failed", "error": f"eval exit {rc}: {err}"}
    record = RunRecord.read(run)
    rows = json.loads(eval_json.read_text())
    ppl = {k: v["ppl"] for k, v in rows[0]["perplexity"].items()}
    return {**result, "final_loss": record.tail_loss(), "ppl": ppl,
            "tokens": record.tokens.trained, "bai_tokens": record.bai.tokens if record.bai else 0,
            "blockwise_tokens": record.blockwise.tokens * len(record.blockwise.blocks) if record.blockwise else 0,
            "wall_s": record.wall_s + (record.init_from or {}).get("wall_s", 0.0), "init_from": record.init_from,
            "peak_memory_mib": record.peak_memory_mib or {}, "losses": [[s.tokens, s.loss] for s in record.steps],
            "switch_tokens": next((s.tokens for s in record.steps if s.lam > 0), None),
            "member_s": time.perf_counter() - t0}


def check_only(plan: Plan, only: list[str] | None) -> None:
    """BinarizeError naming every ``--only`` name that is not one of the plan's members."""
    if unknown := set(only or []) - {m.name for m in plan.members}:
        raise BinarizeError(f"--only names unknown run(s): {', '.join(sorted(unknown))}")


def resolved_values(plan: Plan, m: Member) -> dict:
    """Every value of member m's recipe as its conversion reads it (the recipe file, then the plan's
    and the member's overrides), JSON-safe: the fingerprint that sees a recipe file's or a default's
    change, which the overrides alone do not."""
    return json.loads(json.dumps(asdict(load_recipe(m.recipe, plan.overrides(m))), default=str))


def plan_fingerprint(plan: Plan) -> dict:
    """What ``out/plan.json`` records of a plan (JSON-safe): budget, model, evaluation, and per
    member its settings, overrides and resolved recipe values (``merged_fingerprint`` compares them)."""
    members = [asdict(m) | {"overrides": plan.overrides(m), "resolved": resolved_values(plan, m)} for m in plan.members]
    return json.loads(json.dumps({"name": plan.name, "tokens": plan.tokens, "model": plan.model,
                                  "from_scratch": plan.from_scratch, "eval": plan.eval, "members": members}))


def _changed_values(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for the recipe values that differ between two members' fingerprints, over
    the keys both recorded (a key added to the recipes since keeps its default's behaviour; a
    fingerprint written before values were recorded has none to compare)."""
    a, b = old.get("resolved") or {}, new.get("resolved") or {}
    return [f"{k} {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def merged_fingerprint(old: dict, new: dict, out: Path) -> dict:
    """A plan may gain members between calls, and a member with no result in ``out/results`` yet may
    change (nothing of it was measured); anything else that changed (the budget, the model, the
    evaluation, the settings of a member with a result, its recipe's values) makes ``out``'s
    results another plan's: BinarizeError naming them. Returns ``new`` remembering the members it dropped."""
    head = lambda fp: {k: v for k, v in fp.items() if k != "members"}  # noqa: E731
    own = lambda m: {k: v for k, v in m.items() if k != "resolved"}  # noqa: E731
    before = {m["name"]: m for m in old.get("members", [])}
    measured = lambda name: (out / "results" / f"{name}.json").is_file()  # noqa: E731
    changed, why = [], []
    for m in new["members"]:
        if m["name"] in before and measured(m["name"]):
            values = _changed_values(before[m["name"]], m)
            if own(before[m["name"]]) != own(m) or values:
                changed.append(m["name"])
                why += values
    if head(old) != head(new) or changed:
        what = f"member(s) {', '.join(changed)} changed" if changed else "a different plan or budget"
        if why:
            what += f" (recipe values {', '.join(why[:4])}{', ...' if len(why) > 4 else ''})"
        raise BinarizeError(f"{out} holds results of {what}: use another --out")
    names = {m["name"] for m in new["members"]}
    return {**new, "members": new["members"] + [m for m in old.get("members", []) if m["name"] not in names]}


def run_plan(plan: Plan, out: Path, echo: Callable[[str], None] = print, only: list[str] | None = None) -> list[dict]:
    """Run (or resume) every member, then write results.json, table.md and plot.png into ``out``."""
    check_only(plan, only)
    for sub in ("runs", "logs", "results"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    fingerprint = plan_fingerprint(plan)
    fp_path = out / "plan.json"
    if fp_path.is_file():
        fingerprint = merged_fingerprint(json.loads(fp_path.read_text()), fingerprint, out)
    write_json(fp_path, fingerprint)
    results = []
    for m in plan.members:
        res_path = out / "results" / f"{m.name}.json"
        if res_path.is_file() and json.loads(res_path.read_text()).get("status") == "ok":
            res = json.loads(res_path.read_text())
            echo(f"[{m.name}] done earlier")
        elif only and m.name not in only:
            res = json.loads(res_path.read_text()) if res_path.is_file() else {"name": m.name, "status": "not run"}
        else:
            res = run_member(plan, m, out, echo)
            write_json(res_path, res)
            echo(f"[{m.name}] {res['status']}" + (f": {res['error']}" if res["status"] == "failed" else ""))
        results.append(res)
    write_json(out / "results.json", results)
    table = markdown_table(plan, results)
    (out / "table.md").write_text(table + "\n")
    plot(plan, results, out / "plot.png")
    if any(m.series for m in plan.members):
        plot_quality(plan, results, out / "quality.png")
    return results
