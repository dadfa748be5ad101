"""Progress bars of ``binarize convert``: one line per stage that fits 80 columns, with an ETA
from the measured time per step.

rich's own TimeRemainingColumn estimates speed over the last 30 s, so a stage whose steps take
longer (BaI and QAT steps take 10 s to 2 min on a CPU) shows ``-:--:--`` throughout. Here the
estimate is the mean step time of this session (a resumed stage counts only the steps it ran
itself) times the steps left.
"""

from __future__ import annotations

from datetime import timedelta


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=max(0, int(seconds))))


def progress_bar(enabled: bool, console=None, get_time=None):
    """A rich Progress with description, a 10-character bar, done/total, the task's ``info`` field
    and ``elapsed<ETA``. Tasks may set ``done_before`` (steps a resumed stage had done before this session)."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
    from rich.text import Text

    class StepTimeColumn(ProgressColumn):
        """``elapsed<remaining``: remaining = elapsed / steps run here x steps left."""

        def render(self, task) -> Text:
            elapsed = (task.finished_time if task.finished else task.elapsed) or 0.0
            ran = task.completed - task.fields.get("done_before", 0)
            if task.finished:
                left = "0:00:00"
            elif ran > 0 and task.total:
                left = _clock(elapsed / ran * (task.total - task.completed))
            else:
                left = "-:--:--"
            return Text(f"{_clock(elapsed)}<{left}", style="progress.remaining")

    columns = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=10),
               TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"), StepTimeColumn()]
    kwargs = {"console": console} if console is not None else {}
    if get_time is not None:
        kwargs["get_time"] = get_time
    return Progress(*columns, disable=not enabled, transient=False, **kwargs)
