"""Start-up time of the command line: ``binarize --help``, an argument error and ``import binarize``,
each the median wall time of ``--repeat`` fresh processes (target: < 1 s for help and argument errors).

    python benchmarks/startup_time.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "binarize --help": [sys.executable, "-m", "binarize", "--help"],
    "binarize convert --help": [sys.executable, "-m", "binarize", "convert", "--help"],
    "argument error (--tokens abc)": [sys.executable, "-m", "binarize", "convert", "--tokens", "abc"],
    "import binarize": [sys.executable, "-c", "import binarize"],
    "python alone": [sys.executable, "-c", "pass"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print("| command | median s | min s |\n|---|---|---|")
    for name, cmd in CASES.items():
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True)
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
