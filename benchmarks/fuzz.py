"""The long fuzz campaign over every reader (issue 42 item 6): Hypothesis generates CASES mutated
inputs per reader (default 10,000), each run under a time limit and classified (``fuzz_readers``:
success, clean error, traceback, hang, silent accept; ``altered``: accepted changed content of a
format that holds no checksum). Prints one table row per reader and the first details of every
failure kind; exits 1 when any traceback, hang or silent accept was seen.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/fuzz.py [CASES] [--only NAME] [--seed N]

The CI slice of the same targets is ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_readers import OUTCOMES, build_fixtures, classify  # noqa: E402
from fuzz_targets import Target, all_targets  # noqa: E402


def campaign(target: Target, cases: int, seed: int) -> tuple[Counter, dict[str, list[str]], float]:
    """Run ``cases`` Hypothesis examples of ``target``; (counts, details by outcome, seconds)."""
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings

    counts: Counter = Counter()
    details: dict[str, list[str]] = {}

    @hseed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def run(case):
        outcome, detail = classify(target.check, case, target.seconds)
        counts[outcome] += 1
        if outcome not in ("success", "error") and len(details.setdefault(outcome, [])) < 5:
            details[outcome].append(f"{detail}  <- {case!r}"[:400])

    start = time.perf_counter()
    run()
    return counts, details, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="?", type=int, default=10_000, help="cases per reader (default 10000)")
    ap.add_argument("--only", default=None, help="comma list of reader names (substring match)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from binarize.calibration.datasets import DATASETS, local_file

    text = local_file(DATASETS["ptb"].splits["validation"])
    if text is None:
        sys.exit("error: PTB validation (shared data) not found; set BINARIZE_DATA_DIR")
    with tempfile.TemporaryDirectory(prefix="binarize-fuzz-fixtures-") as tmp:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fx = build_fixtures(Path(tmp), text)
        targets = all_targets(fx)
        if args.only:
            wanted = [w.strip() for w in args.only.split(",")]
            targets = [t for t in targets if any(w in t.name for w in wanted)]
        rows, failures = [], []
        for t in targets:
            with contextlib.redirect_stderr(io.StringIO()):
                counts, details, secs = campaign(t, args.cases, args.seed)
            rows.append((t.name, counts, secs))
            print(f"{t.name}: {sum(counts.values())} cases in {secs:.0f} s "
                  f"({', '.join(f'{k} {counts[k]}' for k in OUTCOMES if counts[k])})", file=sys.stderr, flush=True)
            for outcome, lines in details.items():
                failures += [f"{t.name} / {outcome}: {line}" for line in lines]
    head = "| reader | cases | successes | clean errors | tracebacks | hangs | silent accepts | altered (no checksum) | s |"
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, c, secs in rows:
        print(f"| {name} | {sum(c.values())} | {c['success']} | {c['error']} | {c['traceback']} | {c['hang']} | "
              f"{c['silent']} | {c['altered']} | {secs:.0f} |")
    for line in failures:
        print(f"- {line}")
    return 1 if any(c["traceback"] or c["hang"] or c["silent"] for _, c, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
