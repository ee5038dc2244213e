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


def spikes(loss: Sequence[float], rise: float = 0.02) -> tuple[int, float]:
    """(count, worst) instability of a validation-loss curve. Point i >= 1 is a spike when
    loss[i] > (1 + rise) * min(loss[:i]): it undoes progress already made, beyond noise of
    size `rise`. count = the number of maximal runs of consecutive spike points (one
    excursion is one spike, however many evaluations it spans); worst = the largest
    loss[i] / min(loss[:i]) - 1 (0.0 if the curve never rises). A non-finite point
    (diverged) is a spike and makes worst inf; NaN points never set the running best."""
    v = np.asarray(loss, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        best, now = np.fmin.accumulate(v)[:-1], v[1:]
        bad = ~np.isfinite(now)
        spike = bad | (now > (1 + rise) * best)
        jump = np.where(bad, np.inf, now / best - 1)
    count = int(np.count_nonzero(spike & ~np.r_[False, spike[:-1]]))
    return count, float(np.max(jump, initial=0.0, where=~np.isnan(jump)))


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


def _signed_rank_p(v: np.ndarray) -> float:
    """Exact two-sided p of the signed-rank sum of `v` (no NaN) over all 2^n sign patterns.
    Doubled average ranks are integers, so the null distribution is built exactly, one entry
    at a time (each adds -r or +r with probability 1/2), and compared without rounding."""
    r2 = np.rint(2 * stats.rankdata(np.abs(v))).astype(int) * (v != 0)  # a zero has sign 0
    observed = abs(int(np.sign(v) @ r2))
    dist = np.ones(1)  # P(sum = s) for s = -total .. total
    for r in r2:
        dist = (np.r_[dist, np.zeros(2 * r)] + np.r_[np.zeros(2 * r), dist]) / 2
    total = int(r2.sum())
    return float(dist[np.abs(np.arange(-total, total + 1)) >= observed].sum())


def _placements(c: np.ndarray, j: int, bound: int) -> np.ndarray:
    """Values for bounded entry j of configuration c (j still at its reported value), one per
    (sign, place among the magnitudes of 0, inf and c) on its side of c[j]: every place is a
    point or a gap, so any feasible truth has the same sign and order as one of them."""
    ref = np.unique(np.abs(np.r_[0.0, np.inf, c]))
    fin = ref[np.isfinite(ref)]
    mag = np.r_[ref, (fin[:-1] + fin[1:]) / 2, 2 * fin[-1] + 1]
    cand = np.unique(np.r_[mag, -mag])
    return cand[cand >= c[j]] if bound > 0 else cand[cand <= c[j]]


def signed_rank_test(values: Sequence[float], bounds: Sequence[int] | None = None) -> float:
    """Exact two-sided Wilcoxon signed-rank test that paired values centre on zero.

    A sign-flip permutation test on signed ranks: under the null each sign is + or - with
    probability 1/2 given the magnitudes, so p = the share of all 2^n sign patterns whose
    |sum of signed ranks| >= the observed one (computed exactly for any n). Ranks of |v| are
    averaged over ties; +-inf (one side never reached) rank above every finite value, tied
    among themselves, so p needs no stand-in constant for a miss. NaN (undefined) is left
    out; an exact 0 keeps its rank but has sign 0. No values: p = 1.

    bounds[i]: 0 exact, +1 the truth is >= v[i], -1 the truth is <= v[i]. p depends only on
    the signs and ranks, so every truth the bounds allow gives the p of one of finitely many
    sign-and-order configurations; they are enumerated (placing bounded entries one at a
    time, merging equivalent ones) and the largest p is returned: valid whatever the truth.
    At most 6 bounded entries (the configurations grow fast).
    """
    v = np.asarray(values, float)
    b = np.zeros(v.shape, int) if bounds is None else np.asarray(bounds, int)
    if b.shape != v.shape or not np.isin(b, (-1, 0, 1)).all():
        raise ValueError("bounds: one of 0, +1, -1 per value")
    v, b = v[~np.isnan(v)], b[~np.isnan(v)]
    if np.count_nonzero(b) > 6:
        raise ValueError("signed_rank_test: at most 6 bounded entries")
    states, free = [v], b != 0  # free: bounded entries not yet placed
    for j in np.flatnonzero(b):
        free[j], nxt = False, {}
        for c in states:
            t = _placements(c, j, b[j])
            d = np.repeat(c[None], t.size, 0)
            d[:, j] = t
            ends = np.tile([0.0, np.inf], (t.size, 1))
            rank = stats.rankdata(np.abs(np.c_[ends, d]), axis=1)[:, 2:]
            # only free entries keep their identity (their bound); the rest count as a multiset
            key = np.c_[rank[:, free], np.sort(np.sign(d[:, ~free]) * rank[:, ~free] + 0.0, axis=1)]
            for k, row in zip(key, d):
                nxt.setdefault(k.tobytes(), row)
        states = list(nxt.values())
    return max(_signed_rank_p(c) for c in states)


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


def median_interval(values: Sequence[float], bounds: Sequence[int] | None = None,
                    level: float = 0.95) -> dict:
    """Distribution-free interval for the median of paired (log) values, bounds allowed.

    For independent values with median m, P(x_(k) <= m <= x_(n+1-k)) >= 1 - 2 BinomCDF(k-1;
    n, 1/2); the largest k >= 1 reaching `level` is used ("order"). If k = 1 falls short
    (n < 6 at 0.95), the range [x_(1), x_(n)] is returned ("range", coverage NaN). NaN is
    left out; +-inf (a miss) is a value like any other, so an end can be infinite.

    bounds[i]: 0 exact, +1 the truth is >= v[i], -1 the truth is <= v[i]. Order statistics
    are monotone in every entry, so the lower end is taken with -1 entries at -inf (each
    truth is >= its entry there) and the upper end with +1 entries at +inf: the interval
    contains the one the truths would give. median is the sample median with bounded entries
    at their values; median_lo/median_hi its range under the same two imputations.
    """
    v = np.asarray(values, float)
    b = np.zeros(v.shape, int) if bounds is None else np.asarray(bounds, int)
    v, b = v[~np.isnan(v)], b[~np.isnan(v)]
    n = v.size
    if n == 0:
        return {"median": math.nan, "median_lo": math.nan, "median_hi": math.nan, "lo": math.nan,
                "hi": math.nan, "k": 0, "coverage": math.nan, "kind": "none", "n": 0, "n_bounds": 0}
    low, high = np.sort(np.where(b < 0, -np.inf, v)), np.sort(np.where(b > 0, np.inf, v))
    ks = np.arange(1, (n + 1) // 2 + 1)
    cover = 1 - 2 * stats.binom.cdf(ks - 1, n, 0.5)
    ok = np.flatnonzero(cover >= level)
    k = int(ok[-1]) + 1 if ok.size else 1
    return {"median": float(np.median(v)), "median_lo": float(np.median(low)),
            "median_hi": float(np.median(high)), "lo": float(low[k - 1]), "hi": float(high[n - k]),
            "k": k, "coverage": float(cover[k - 1]) if ok.size else math.nan,
            "kind": "order" if ok.size else "range", "n": n, "n_bounds": int(np.count_nonzero(b))}


def shifted_interval(lo: float, hi: float, shift_lo: float, shift_hi: float) -> tuple[float, float]:
    """[lo, hi] (log values) minus a shared shift known only to lie in [shift_lo, shift_hi]:
    the widest result, (lo - shift_hi, hi - shift_lo). It carries e.g. the step-time ratio's
    uncertainty, one constant for all seeds, into the seeds' interval (Bonferroni-style:
    the levels of the two intervals add)."""
    return lo - shift_hi, hi - shift_lo


def min_detectable(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean log effect that a two-sided paired t-test at `alpha` detects with
    probability `power` with n seeds of seed-to-seed standard deviation sd (planning:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)); NaN for n < 2 or a non-finite sd."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    t = stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(t * sd / math.sqrt(n))


def seeds_for_halfwidth(sd: float, halfwidth: float, level: float = 0.95, max_n: int = 10_000) -> int:
    """Smallest n >= 2 seeds whose t interval on paired log values of standard deviation sd
    has half-width t_{(1+level)/2, n-1} sd / sqrt(n) <= halfwidth (it shrinks with n); a
    ValueError if no n <= max_n does."""
    ns = np.arange(2, max_n + 1)
    ok = np.flatnonzero(stats.t.ppf((1 + level) / 2, ns - 1) * sd / np.sqrt(ns) <= halfwidth)
    if ok.size == 0:
        raise ValueError(f"no n <= {max_n} reaches half-width {halfwidth} with sd {sd}")
    return int(ns[ok[0]])


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


def curve_crossing(x: Sequence[float], y: Sequence[float], target: float, scale: str = "linear",
                   rule: str = "first") -> tuple[float, str]:
    """Where a budget curve (x increasing, y = final loss of a run of that budget) first
    reaches the target: interpolation between the last budget above it and the first at or
    below it ("interpolated"); the shortest budget itself when it is already below ("at
    most": an upper bound); inf when no budget reaches it ("miss"). A non-finite y (diverged)
    counts as +inf: never at or below the target.

    scale "linear" draws a straight line in x; "log" a straight line in log x (x > 0), closer
    to a loss falling as a power of the budget. rule "first" takes the curve as it is;
    "envelope" its running minimum (the best final loss any schedule up to that budget
    reached), so a noisy budget that does worse than a shorter one cannot delay the crossing;
    "skip" drops each point above the running minimum of the earlier points (a non-monotone
    point, taken as noise) before "first".
    """
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    ys = np.where(np.isfinite(ys), ys, np.inf)
    if scale not in ("linear", "log") or rule not in ("first", "envelope", "skip"):
        raise ValueError(f"unknown scale {scale!r} or rule {rule!r}")
    if scale == "log" and (xs <= 0).any():
        raise ValueError("scale 'log' needs every x > 0")
    if rule == "envelope":
        ys = np.minimum.accumulate(ys)
    elif rule == "skip":
        keep = ys <= np.r_[np.inf, np.minimum.accumulate(ys)[:-1]]
        xs, ys = xs[keep], ys[keep]
    hits = np.flatnonzero(ys <= target)
    if hits.size == 0:
        return math.inf, "miss"
    i = int(hits[0])
    if i == 0:
        return float(xs[0]), "at most"
    u = np.log(xs[i - 1:i + 1]) if scale == "log" else xs[i - 1:i + 1]
    with np.errstate(invalid="ignore"):  # a diverged left point: inf / inf = NaN, as before
        w = (ys[i - 1] - target) / (ys[i - 1] - ys[i])
    at = u[0] + w * (u[1] - u[0])
    return float(np.exp(at) if scale == "log" else at), "interpolated"


def value_at(x: Sequence[float], y: Sequence[float], x0: float) -> float:
    """y at x0 by linear interpolation along increasing x; NaN outside [x[0], x[-1]]."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if xs.size == 0 or not (xs[0] <= x0 <= xs[-1]):
        return math.nan
    return float(np.interp(x0, xs, ys))
