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


def test_bai_path_points_sample_the_first_half_of_the_schedule_then_the_sign():
    from binarize.schedules import bai_path_points

    ts = schedule("exponential", 20)
    pts = bai_path_points("exponential", 20)
    assert pts[:-1] == [ts[2], ts[4], ts[6], ts[8], ts[10]] and pts[-1] == math.inf
    assert pts[0] == pytest.approx(0.7185, abs=1e-4)  # 1.3 e^0.44 - 1.3
    assert all(a < b for a, b in zip(pts, pts[1:]))
    assert bai_path_points("uniform", 8)[:-1] == [schedule("uniform", 8)[c] for c in (2, 4)]
    assert bai_path_points("exponential", 2) == [math.inf]  # too short a schedule: the paper's hard-sign BaI
