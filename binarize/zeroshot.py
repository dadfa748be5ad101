"""Zero-shot tasks through lm-evaluation-harness, on a model binarize has already loaded.

The loaded model (FP, converted or packed) is wrapped as lm-eval's ``HFLM``, so the harness
sees exactly the weights perplexity sees. Task names pass through unchanged (the paper's seven:
boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa); ``include`` adds a
folder of task YAMLs, which is how local tasks (and the offline CI test) are defined.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import BinarizeError

def run_tasks(model, tokenizer, tasks: list[str], *, include: str | Path | None = None, limit: int | None = None,
              batch_size: int = 1, num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """{"results": {task: {metric: value}}, "samples": ...} from ``lm_eval.simple_evaluate``."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BinarizeError("zero-shot tasks need lm-eval: pip install 'binarize[eval]'") from None
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if include is not None and not Path(include).is_dir():
        raise BinarizeError(f"--tasks-include {include}: not a directory")
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BinarizeError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=log_samples, bootstrap_iters=0, verbosity="ERROR")
    except Exception as exc:  # dataset download offline, malformed YAML: one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BinarizeError(f"lm-eval failed: {first}") from None
    results = {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))
                      and not k.startswith("alias") and "stderr" not in k}
               for task, metrics in out["results"].items()}
    return {"results": results, "samples": out.get("samples") if log_samples else None}
