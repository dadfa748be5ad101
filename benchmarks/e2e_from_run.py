"""End-to-end QAT started from a finished run's converted model: what the end-to-end stage's
options buy on top of a block-wise stage that was already paid for (issue 41).

    python benchmarks/e2e_from_run.py RUN OUT -- [binarize convert options]

RUN: a run directory (``binarize convert``'s output: ``model.safetensors`` in the latent
layout). OUT: the new run. The options after ``--`` go to ``binarize convert`` as they are
(give ``--tokens`` and the recipe; the recipe must prepare the same layers and scales as RUN's).
The model in RUN is written as a saved initialisation (``OUT.init/init/``, the layout of
``--save-init``) and the conversion runs with ``--init-from`` on it.

A measurement tool, not a product path: RUN made without ``--save-init`` has no key, so the
check that the initialisation was made with the same calibration set and recipe keys
(``init_state.check_init``) is skipped here; the figures are those of RUN's model under the
end-to-end options given, whatever calibration set the new command line names.

Example (``benchmarks/results/timeplan_cpu.md``, "The end-to-end stage of ternary-distill after
600 block-wise steps"):

    python benchmarks/e2e_from_run.py /work/exp/quality2/runs/tern600-seq256-bf16 /work/exp/e2e/qp3 -- \\
        --recipe ternary-distill --tokens 16384 --set self_tokens=65536 --set self_batch=64 \\
        --set lr=1e-3 --set min_lr=2e-5 --set qat_latent=false --no-progress
    binarize eval /work/exp/e2e/qp3 --quick
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 2:
        print("usage: e2e_from_run.py RUN OUT -- [binarize convert options]", file=sys.stderr)
        return 2
    run, out, rest = Path(argv[0]), Path(argv[1]), argv[3:]
    if not (run / "model.safetensors").is_file():
        print(f"error: {run} holds no model.safetensors", file=sys.stderr)
        return 2
    from binarize.checkpoint import rng_state
    from binarize.cli import main as cli_main
    from binarize.train import run as run_module

    init = out.with_name(out.name + ".init") / "init"
    init.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "model.safetensors", init / "model.safetensors")
    torch.manual_seed(0)
    torch.save(rng_state(), init / "rng.pt")
    wall = json.loads((run / "run.json").read_text()).get("wall_s", 0.0) if (run / "run.json").is_file() else 0.0
    (init / "init.json").write_text(json.dumps({"key": {}, "wall_s": wall, "bai": None, "blockwise": None}))
    run_module.check_init = lambda *a, **k: None  # RUN has no key (see the module docstring)
    cli_main(["convert", *rest, "--init-from", str(init.parent), "--out", str(out)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
