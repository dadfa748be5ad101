"""Progressive schedulers: the sharpness t of F(x, t) for each training chunk.

The paper (BinaryLLM, appendix F) gives the exponential scheduler t(c) = 1.3 e^{0.22 c} - 1.3
over 20 chunks and names uniform, logarithm and degree-uniform without formulas. Our
choices, all starting at t = 0 (F is the identity) and ending at the exponential's last
value t_end, so only the *shape* of the path differs between them:

* exponential:    t(c) = 1.3 (e^{0.22 c'} - 1), with c' = span * c / chunks, so with the
                  default 20 chunks c' = c = 0..19 and t_end = 83.7; other chunk counts
                  stretch over the same range (``schedule_span``, default 20).
* uniform:        t grows linearly in c.
* logarithm:      t = t_end * ln(1 + c) / ln(chunks): fast early, slow late.
* degree-uniform: uniform in the *angle* of F's slope at the origin, atan(t / tanh(t)),
                  which runs from 45 degrees (identity) towards 90 degrees (sign).

After the last chunk the model is exported with the hard sign (t = inf).
"""

from __future__ import annotations

import math

SCHEDULERS = ("exponential", "uniform", "logarithm", "degree-uniform")


def exponential_t(c: float) -> float:
    """The paper's scheduler t(c) = 1.3 e^{0.22 c} - 1.3 (t(0) = 0 exactly)."""
    return 1.3 * math.expm1(0.22 * c)


def _slope_to_t(slope: float) -> float:
    """Solve t / tanh(t) = slope for t >= 0 by bisection (the left side is increasing)."""
    if slope <= 1.0:
        return 0.0
    lo, hi = 0.0, max(1.0, slope)  # t/tanh(t) >= t, so t <= slope
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid / math.tanh(mid) < slope:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def chunk_t(scheduler: str, chunk: int, chunks: int, span: float = 20.0) -> float:
    """t for ``chunk`` in 0..chunks-1."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r} (known: {', '.join(SCHEDULERS)})")
    if not 0 <= chunk < chunks:
        raise ValueError(f"chunk {chunk} outside 0..{chunks - 1}")
    t_end = exponential_t(span * (chunks - 1) / chunks)
    if chunks == 1:
        return t_end
    frac = chunk / (chunks - 1)
    if scheduler == "exponential":
        return exponential_t(span * chunk / chunks)
    if scheduler == "uniform":
        return t_end * frac
    if scheduler == "logarithm":
        return t_end * math.log1p(chunk) / math.log(chunks)
    # degree-uniform
    a0, a1 = math.atan(1.0), math.atan(t_end / math.tanh(t_end))
    return _slope_to_t(math.tan(a0 + frac * (a1 - a0)))


def schedule(scheduler: str, chunks: int, span: float = 20.0) -> list[float]:
    return [chunk_t(scheduler, c, chunks, span) for c in range(chunks)]


def bai_path_points(scheduler: str, chunks: int, span: float = 20.0) -> list[float]:
    """The t values binary-aware initialization cycles through with ``bai_path`` (issue 20 item 0).

    Every second chunk of the first half of the QAT schedule, from chunk 2, then the hard sign
    (``math.inf``): for the default exponential schedule over 20 chunks t = 0.72, 1.83, 3.57,
    6.26, 10.43, inf. Chunk 1 (t = 0.32) is left out because its loss at initialisation is
    already below the hard sign's; past the middle of the schedule F(x, t) is within a few
    per cent of the sign. Our choice (the paper fits St at the hard sign only); measured in
    ``benchmarks/progressive_path.py``.
    """
    ts = schedule(scheduler, chunks, span)
    return [ts[c] for c in range(2, chunks // 2 + 1, 2)] + [math.inf]


def bai_step_t(points: list[float], step: int, steps: int) -> float:
    """t of BaI step ``step`` (0-based) of ``steps``: ``points`` in turn, so the last step is at the last point."""
    return points[(step - steps) % len(points)]


# ----------------------------------------------------------------------------- continual switch

PHASE_INS = ("abrupt", "linear", "sigmoid")


def resolve_steps(value: float, steps: int) -> int:
    """A step count given as a whole number of steps (>= 1) or a fraction of ``steps`` (< 1)."""
    return round(value * steps) if value < 1 else int(value)


def phase_lambda(step: int, switch: int, kind: str, length: int, steepness: float = 10.0) -> float:
    """Quantization strength lam at ``step`` for a switch at step ``switch`` (seed 000).

    Seed 000 phases quantization in with a sigmoid but gives no formula; ours, over ``length``
    steps after the switch with x = (step - switch + 1) / length in (0, 1]:

    * abrupt:  lam = 1 from the switch on,
    * linear:  lam = x,
    * sigmoid: lam = (s(k (x - 1/2)) - s(-k/2)) / (s(k/2) - s(-k/2)), s the logistic function and
      k the steepness: an S-curve from 0 to exactly 1 at x = 1, centred on the window.

    Before the switch lam = 0 (full precision); after the window lam = 1.
    """
    if step < switch:
        return 0.0
    x = (step - switch + 1) / max(1, length)
    if kind == "abrupt" or x >= 1:
        return 1.0
    if kind == "linear":
        return x

    def s(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    lo, hi = s(-steepness / 2), s(steepness / 2)
    return (s(steepness * (x - 0.5)) - lo) / (hi - lo)
