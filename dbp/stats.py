"""Paired statistics for speed-up claims (docs/protocol.md, rules 7 and 8).

Pure numpy/scipy on per-seed numbers; no tables, no I/O. Conventions:
- A cost of inf means "never reached the target": it is counted, never dropped.
- A paired ratio is T_base / T_arm (> 1: the arm is faster). Its logarithm is +inf when only
  the base missed, -inf when only the arm missed, and undefined (NaN) when both missed.
- Below `MIN_INTERVAL_N` defined pairs an interval over seeds says nothing useful, so the
  summary reports the range of the seeds instead, and says so.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

MIN_INTERVAL_N = 5


def crossings(loss: Sequence[float], target: float) -> tuple[int | None, int | None]:
    """(first, sustained) index of a curve against a target: the first point at or below it,
    and the first point after which the curve never rises above it again (None: never).
    A non-finite loss (diverged) is never below the target."""
    below = np.asarray(loss, float) <= target  # NaN compares False
    if not below.any():
        return None, None
    above = np.flatnonzero(~below)
    sustained = None if not below[-1] else int(above[-1] + 1 if above.size else 0)
    return int(np.argmax(below)), sustained


def sign_flip_test(x: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation test that paired values centre on zero.

    The statistic is the mean; every one of the 2^n sign patterns is enumerated (up to
    n = 16; beyond that, 100,000 random patterns). NaN values (undefined pairs) are left
    out; +-inf (one side never reached) become the most extreme value in their direction,
    a magnitude above every finite one. No values: p = 1.
    """
    v = np.asarray(x, float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return 1.0
    finite = np.abs(v[np.isfinite(v)])
    extreme = 2.0 * (finite.max() if finite.size else 1.0) + 1.0
    v = np.where(np.isinf(v), np.sign(v) * extreme, v)
    if v.size == 1 or not v.any():  # one pair: both sign patterns are as extreme
        return 1.0
    n_resamples = np.inf if v.size <= 16 else 100_000
    res = stats.permutation_test((v,), np.mean, permutation_type="samples", alternative="two-sided",
                                 n_resamples=n_resamples, random_state=0)
    return float(min(1.0, res.pvalue))


def log_interval(logs: np.ndarray, level: float) -> tuple[float, float, str]:
    """(lo, hi, kind) of the mean of `logs`: a Student-t interval with n >= MIN_INTERVAL_N,
    else the range of the values (kind "range"); none: NaN."""
    n = logs.size
    if n == 0:
        return math.nan, math.nan, "none"
    if n < MIN_INTERVAL_N:
        return float(logs.min()), float(logs.max()), "range"
    half = stats.t.ppf(0.5 + level / 2, n - 1) * logs.std(ddof=1) / math.sqrt(n)
    return float(logs.mean() - half), float(logs.mean() + half), "t"


def ratio_summary(base: Sequence[float], value: Sequence[float], level: float = 0.95) -> dict:
    """Summary of paired costs (one pair per seed): ratio = base / value.

    geo_mean and its interval cover the pairs where both reached (a t interval on the log
    ratios, or their range below MIN_INTERVAL_N pairs); median covers every defined pair,
    misses included (ratio 0 or inf); the test covers every defined pair (`sign_flip_test`).
    """
    b, v = np.asarray(base, float), np.asarray(value, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(b) - np.log(v)  # inf - inf = NaN: both missed
    both = np.isfinite(b) & np.isfinite(v)
    lo, hi, kind = log_interval(logs[both], level)
    defined = logs[~np.isnan(logs)]
    return {"n": int(b.size), "n_both": int(both.sum()), "n_base_miss": int(np.isinf(b).sum()),
            "n_arm_miss": int(np.isinf(v).sum()), "n_undefined": int(b.size - defined.size),
            "geo_mean": math.exp(logs[both].mean()) if both.any() else math.nan,
            "lo": math.exp(lo), "hi": math.exp(hi), "interval": kind,
            "median": float(np.exp(np.median(defined))) if defined.size else math.nan,
            "p_value": sign_flip_test(defined)}


def diff_summary(diffs: Sequence[float], level: float = 0.95) -> dict:
    """Summary of paired differences (e.g. mIoU arm - base per seed): mean, t interval or
    range (as `log_interval`), and the sign-flip test. NaN pairs are left out."""
    d = np.asarray(diffs, float)
    d = d[~np.isnan(d)]
    lo, hi, kind = log_interval(d, level)
    return {"n": int(d.size), "mean": float(d.mean()) if d.size else math.nan, "lo": lo, "hi": hi,
            "interval": kind, "p_value": sign_flip_test(d)}


def curve_crossing(x: Sequence[float], y: Sequence[float], target: float) -> tuple[float, str]:
    """Where a budget curve (x increasing, y = final loss of a run of that budget) first
    reaches the target: linear interpolation between the last budget above it and the
    first at or below it ("interpolated"); the shortest budget itself when it is already
    below ("at most": an upper bound); inf when no budget reaches it ("miss")."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    hits = np.flatnonzero(ys <= target)
    if hits.size == 0:
        return math.inf, "miss"
    i = int(hits[0])
    if i == 0:
        return float(xs[0]), "at most"
    w = (ys[i - 1] - target) / (ys[i - 1] - ys[i])
    return float(xs[i - 1] + w * (xs[i] - xs[i - 1])), "interpolated"


def value_at(x: Sequence[float], y: Sequence[float], x0: float) -> float:
    """y at x0 by linear interpolation along increasing x; NaN outside [x[0], x[-1]]."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if xs.size == 0 or not (xs[0] <= x0 <= xs[-1]):
        return math.nan
    return float(np.interp(x0, xs, ys))
