import math

import pytest

from binarize.schedules import SCHEDULERS, chunk_t, exponential_t, schedule


def test_exponential_formula():
    assert exponential_t(0) == 0.0
    for c in (1, 5, 19):
        assert exponential_t(c) == pytest.approx(1.3 * math.exp(0.22 * c) - 1.3, rel=1e-12)
    # 20 chunks: c = 0..19 exactly as in the paper
    assert schedule("exponential", 20) == pytest.approx([1.3 * math.exp(0.22 * c) - 1.3 for c in range(20)])


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("chunks", [2, 5, 20])
def test_schedulers_share_endpoints_and_increase(name, chunks):
    ts = schedule(name, chunks)
    assert ts[0] == pytest.approx(0.0, abs=1e-9)
    assert ts[-1] == pytest.approx(schedule("exponential", chunks)[-1], rel=1e-6)
    assert all(b > a for a, b in zip(ts, ts[1:]))


def test_scheduler_shapes_differ_as_documented():
    exp, uni, log = schedule("exponential", 20), schedule("uniform", 20), schedule("logarithm", 20)
    diffs = [b - a for a, b in zip(uni, uni[1:])]
    assert max(diffs) == pytest.approx(min(diffs))  # uniform: equal steps
    assert log[5] > uni[5] > exp[5]  # logarithm fast early, exponential slow early
    deg = schedule("degree-uniform", 20)
    angles = [math.degrees(math.atan(t / math.tanh(t))) if t > 0 else 45.0 for t in deg]
    steps = [b - a for a, b in zip(angles, angles[1:])]
    assert max(steps) == pytest.approx(min(steps), rel=1e-6)


def test_bad_scheduler_or_chunk():
    with pytest.raises(ValueError):
        chunk_t("cubic", 0, 20)
    with pytest.raises(ValueError):
        chunk_t("exponential", 20, 20)
