"""Conversion as training: where a training change goes.

* ``plan.py``: the token budget as optimizer steps (``check_job``), the lr and t schedules;
* ``data.py``: the training stream and the BaI calibration set;
* ``bai.py``: binary-aware initialization of St;
* ``loop.py``: the QAT loop over one ``TrainState`` (loss, distillation, optimizer groups);
* ``record.py``: ``RunRecord``, the schema of run.json, and loss.png;
* ``run.py``: ``convert(job)``, the whole job from model to run directory and export, with resume.
"""

from .loop import Distill, Interrupted
from .plan import Budget, check_job, plan_budget
from .record import RunRecord
from .run import ConvertJob, ConvertResult, convert, convert_run

__all__ = ["Budget", "ConvertJob", "ConvertResult", "Distill", "Interrupted", "RunRecord", "check_job", "convert",
           "convert_run", "plan_budget"]
