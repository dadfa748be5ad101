"""convert's progress bars: one line within 80 columns, an ETA from the measured step time."""

import io

from rich.console import Console

from binarize.progress import progress_bar


def _render(progress) -> list[str]:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(progress.get_renderable())
    return [line for line in console.file.getvalue().splitlines() if line.strip()]


def test_eta_from_the_step_time_and_every_column_fits_80():
    now = [1000.0]
    progress = progress_bar(True, console=Console(file=io.StringIO(), width=80), get_time=lambda: now[0])
    qat = progress.add_task("QAT", total=196, info="")
    blocks = progress.add_task("block 12", total=120, info="")
    resumed = progress.add_task("QAT", total=196, completed=34, done_before=34, info="")  # a --resume at step 34
    assert "0:00:00<-:--:--" in _render(progress)[0]  # no step yet: no estimate, not a guess
    now[0] += 120.0  # two steps of a minute each
    progress.update(qat, completed=2, info="t 0.316 lam 0.5 loss 10.9 58 tok/s")
    progress.update(blocks, completed=120, info="t 83.7 loss 0.1979")
    progress.update(resumed, completed=36, info="t inf loss 5.682 66 tok/s")
    lines = _render(progress)
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines), lines
    assert "…" not in "".join(lines)
    assert "2/196" in lines[0] and "t 0.316 lam 0.5 loss 10.9 58 tok/s" in lines[0]
    assert lines[0].endswith("0:02:00<3:14:00")  # 60 s a step x 194 steps left
    assert lines[1].endswith("0:02:00<0:00:00") and "t 83.7 loss 0.1979" in lines[1]
    assert lines[2].endswith("0:02:00<2:40:00")  # only this session's 2 steps count: 60 s x 160 left
