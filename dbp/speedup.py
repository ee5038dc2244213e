"""The headline's speed-up, read off each seed's budget curve (docs/protocol.md version 3).

Per seed, T_BP / T_arm is where each arm's budget curve (final loss of fully decayed runs
against training time) reaches the target. Version 3 reads the curve on its running minimum
in log-budget (rule 9), keeps a crossing outside the budgets as the bound it is (rule 8), and
carries the uncertainty of the step-time ratio, one constant shared by every seed, into the
interval and the test (rule 11). Every other reading of the curve is printed beside it
(`SENSITIVITY`), so a reader sees whether the conclusion hangs on the choice.

Why these statistics: with 6 seeds, bounds and a shared constant, a t interval on the mean
is neither valid nor constant-free. The median's order-statistic interval needs only the
order of the seeds' values (a bound that stays on its side cannot move it), and the exact
signed-rank test only their ranks (a miss ranks beyond every value whatever number stands
for it). Pure pandas/numpy on records: no torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from dbp import stats as S
from dbp.analysis import BASELINE, kept_rounds

PRIMARY = ("envelope", "log")  # (rule, scale) of the headline's reading
# Each other reading: (name, rule, scale, step-cost uncertainty in the interval and test)
SENSITIVITY = [("primary", "envelope", "log", True),
               ("without step-cost uncertainty", "envelope", "log", False),
               ("curve as measured, log-budget", "first", "log", True),
               ("non-monotone points skipped, log-budget", "skip", "log", True),
               ("running minimum, linear in budget", "envelope", "linear", True),
               ("protocol v2 (as measured, linear)", "first", "linear", True)]
BOOTSTRAP = 4000   # resamples of the step-cost rounds
GAMMA = 0.01       # Berger-Boos: the test's p is its largest over the step-cost ratio's 99 % interval, + 0.01
HALF_WIDTH = math.log(1.1)  # the power line: seeds for a +-10 % interval


def crossings(bc: pd.DataFrame, target: float, rule: str = PRIMARY[0],
              scale: str = PRIMARY[1]) -> pd.DataFrame:
    """Per arm and seed with two or more budgets: where the budget curve reaches `target`
    (stats.curve_crossing), and the shortest and longest budget's time (a bound's value)."""
    rows = []
    for (arm, seed), g in bc.groupby(["arm", "seed"], sort=True):
        if len(g) < 2:
            continue
        g = g.sort_values("planned_steps")
        t, kind = S.curve_crossing(g["seconds"], g["final_val_loss"], target, scale=scale, rule=rule)
        rows.append({"arm": arm, "seed": seed, "budgets": len(g), "seconds": t, "kind": kind,
                     "first_seconds": float(g["seconds"].iloc[0]), "last_seconds": float(g["seconds"].iloc[-1])})
    return pd.DataFrame(rows, columns=["arm", "seed", "budgets", "seconds", "kind", "first_seconds",
                                       "last_seconds"])


def _span(r) -> tuple[float, float]:
    """(lowest, highest) time to target a crossing allows: exact, at most the shortest
    budget, or beyond the longest."""
    if r.kind == "at most":
        return 0.0, r.first_seconds
    if r.kind == "miss":
        return r.last_seconds, math.inf
    return r.seconds, r.seconds


def seed_values(btt: pd.DataFrame, arm: str, baseline: str = BASELINE) -> pd.DataFrame:
    """Per seed: log(T_baseline / T_arm) and its bound (0 exact, +1 at least, -1 at most);
    NaN where the two crossings leave it open both ways (both at most, or both missed)."""
    b = btt.set_index(["arm", "seed"])
    seeds = sorted(set(btt.loc[btt["arm"] == arm, "seed"]) & set(btt.loc[btt["arm"] == baseline, "seed"]))
    rows = []
    for seed in seeds:
        (b_lo, b_hi), (a_lo, a_hi) = _span(b.loc[(baseline, seed)]), _span(b.loc[(arm, seed)])
        with np.errstate(divide="ignore"):
            lo, hi = np.log(b_lo) - np.log(a_hi), np.log(b_hi) - np.log(a_lo)
        if lo == hi:
            value, bound = lo, 0
        elif np.isfinite(lo) and not np.isfinite(hi):
            value, bound = lo, 1
        elif np.isfinite(hi) and not np.isfinite(lo):
            value, bound = hi, -1
        else:
            value, bound = math.nan, 0
        rows.append({"seed": seed, "value": float(value), "bound": bound})
    return pd.DataFrame(rows, columns=["seed", "value", "bound"])


def step_cost_draws(kept: pd.DataFrame, arm: str, baseline: str = BASELINE, n: int = BOOTSTRAP) -> np.ndarray:
    """Bootstrap of log(the arm's median step-time ratio to the baseline) over the
    undisturbed interleaved rounds (`kept`: analysis.kept_rounds; resampled whole, seeded):
    the ratio's own uncertainty. Empty when the arm has no side-by-side record."""
    if kept.empty or arm not in kept:
        return np.array([])
    ratio = (kept[arm] / kept[baseline]).to_numpy(float)
    idx = np.random.default_rng(0).integers(0, ratio.size, (n, ratio.size))
    return np.log(np.median(ratio[idx], axis=1))


def _shift(draws: np.ndarray, centre: float, alpha: float) -> tuple[float, float]:
    """The interval of the shift log(r / r_hat) at level 1 - alpha (0, 0 without draws)."""
    if draws.size == 0:
        return 0.0, 0.0
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(lo - centre), float(hi - centre)


def _test(v: np.ndarray, b: np.ndarray, shift: tuple[float, float], gamma: float) -> float:
    """Signed-rank p at its largest over shifts s in `shift` (values v - s), + gamma: every
    rank pattern the shift can make is tried (the breakpoints are the values and the
    midpoints of pairs). gamma = 0 and shift (0, 0): the plain test."""
    lo, hi = shift
    points = np.r_[v, (v[:, None] + v[None, :]).ravel() / 2]
    points = np.unique(np.r_[lo, hi, points[(points > lo) & (points < hi)]])
    cands = np.unique(np.r_[points, (points[1:] + points[:-1]) / 2])
    return min(1.0, max(S.signed_rank_test(v - s, b) for s in cands) + gamma)


def summarize(values: pd.DataFrame, draws: np.ndarray, centre: float, level: float = 0.95,
              step_cost: bool = True) -> dict:
    """The paired summary of one arm: the median ratio with its order-statistic interval
    (bounds as bounds), widened by the step-time ratio's interval (the two levels add up to
    `level`), the exact signed-rank test (largest p over bounds and the step-cost interval,
    + GAMMA), and beside them the geometric mean and t interval of the seeds whose crossings
    are exact. `centre`: log of the ratio the times were computed with."""
    d = values.dropna(subset=["value"])
    v, b = d["value"].to_numpy(float), d["bound"].to_numpy(int)
    draws = draws if step_cost else np.array([])
    m = S.median_interval(v, b, level)
    alpha = (m["coverage"] - level) if m["kind"] == "order" else (1 - level)
    lo, hi = S.shifted_interval(m["lo"], m["hi"], *_shift(draws, centre, alpha))
    exact = v[b == 0]
    sd_cost = float(draws.std(ddof=1)) if draws.size > 1 else 0.0
    t_lo, t_hi, t_kind = S.log_interval(exact, level)
    if t_kind == "t":  # the seeds' standard error and the step cost's, added in quadrature
        half = stats.t.ppf(0.5 + level / 2, exact.size - 1) * math.sqrt(exact.var(ddof=1) / exact.size + sd_cost ** 2)
        t_lo, t_hi = exact.mean() - half, exact.mean() + half
    test = _test(v, b, _shift(draws, centre, GAMMA), GAMMA if draws.size else 0.0) if v.size else 1.0
    sd = float(exact.std(ddof=1)) if exact.size > 1 else math.nan
    return {"n": int(len(values)), "n_defined": int(v.size), "n_exact": int(exact.size),
            "n_at_least": int((b > 0).sum()), "n_at_most": int((b < 0).sum()),
            "median": math.exp(m["median"]), "median_lo": math.exp(m["median_lo"]),
            "median_hi": math.exp(m["median_hi"]), "lo": math.exp(lo), "hi": math.exp(hi),
            "coverage": m["coverage"], "interval": m["kind"], "p_value": test,
            "geo_mean": math.exp(exact.mean()) if exact.size else math.nan,
            "t_lo": math.exp(t_lo), "t_hi": math.exp(t_hi), "t_interval": t_kind,
            "step_cost_sd": sd_cost, "sd": sd,
            "min_detectable": math.exp(S.min_detectable(sd, int(v.size))) if v.size > 1 else math.nan,
            "seeds_for_10pct": _seeds_needed(sd)}


def _seeds_needed(sd: float) -> float:
    """Seeds a +-10 % t interval needs at this seed-to-seed spread (NaN if unknown); the step
    cost's share does not shrink with seeds, only with more rounds."""
    if not math.isfinite(sd):
        return math.nan
    try:
        return float(S.seeds_for_halfwidth(sd, HALF_WIDTH))
    except ValueError:
        return math.inf


def conclusion(r: dict) -> str:
    """What the interval says: "faster" (all of it above 1), "slower", or "not resolved"."""
    return "faster" if r["lo"] > 1 else "slower" if r["hi"] < 1 else "not resolved"


def speedups(bc: pd.DataFrame, targets: dict[float, float], rounds: pd.DataFrame, step_ratio: pd.Series,
             arms: Sequence[str], level: float = 0.95, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per target (`targets`: relaxation -> target loss), arm and reading: every
    reading (`SENSITIVITY`) at the strict target, the primary one at the relaxed ones; the
    summary, its conclusion, and the per-seed values in `seeds` (seed -> [log ratio, bound]).
    The step cost's bootstrap runs once per arm, each reading's crossings once per target."""
    kept = kept_rounds(rounds, baseline)
    draws = {arm: step_cost_draws(kept, arm, baseline) for arm in arms}
    rows = []
    for relax, target in targets.items():
        readings = SENSITIVITY if relax == 0 else SENSITIVITY[:1]
        btt = {name: crossings(bc, target, rule, scale) for name, rule, scale, _ in readings}
        for arm in arms:
            centre = math.log(step_ratio[arm]) if arm in step_ratio else 0.0
            for name, rule, scale, cost in readings:
                vals = seed_values(btt[name], arm, baseline)
                if vals.empty:
                    continue
                r = summarize(vals, draws[arm], centre, level, cost)
                rows.append({"arm": arm, "reading": name, "rule": rule, "scale": scale,
                             "step_cost": cost and draws[arm].size > 0,
                             **r, "conclusion": conclusion(r),
                             "seeds": {int(s): [float(x), int(b)] for s, x, b in vals.to_numpy()},
                             "relax": relax})
    return pd.DataFrame(rows)


def stability(runs: pd.DataFrame, curves: pd.DataFrame, rise: float) -> pd.DataFrame:
    """Per arm, over its scored runs of every budget: runs, runs with a spike (validation
    loss more than `rise` above the run's best so far), the seeds they belong to, the worst
    spike and where, and diverged runs."""
    c = curves[curves["role"] == "scored"].sort_values("step")
    status = runs.set_index(["run_id", "seed"])["status"]
    per_run = []
    for (run_id, seed), g in c.groupby(["run_id", "seed"]):
        n, worst = S.spikes(g["val_loss"].to_numpy(float), rise)
        per_run.append({"arm": g["arm"].iloc[0], "run_id": run_id, "seed": seed, "spikes": n,
                        "worst": worst, "diverged": status.get((run_id, seed)) == "diverged"})
    p = pd.DataFrame(per_run)
    rows = []
    for arm, g in p.groupby("arm", sort=False) if len(p) else ():
        w = g.loc[g["worst"].idxmax()]
        rows.append({"arm": arm, "runs": len(g), "runs_spiked": int((g["spikes"] > 0).sum()),
                     "seeds_spiked": sorted(int(s) for s in g.loc[g["spikes"] > 0, "seed"].unique()),
                     "worst": float(w["worst"]), "worst_run": f"{w['run_id']}/seed{w['seed']}",
                     "diverged": int(g["diverged"].sum())})
    return pd.DataFrame(rows, columns=["arm", "runs", "runs_spiked", "seeds_spiked", "worst",
                                       "worst_run", "diverged"])


def clock_check(summary: pd.DataFrame, step_ratio: pd.Series, effect: float, control: str = "identity",
                baseline: str = BASELINE) -> pd.DataFrame:
    """The identity control checks the clock on every seed (rule 11): its whole base run's
    measured time over BP's must sit at its side-by-side step-time ratio. The tolerance is
    half the claimed effect in log terms (at least 5 %): a clock that strays further could
    make or unmake the claim. Per seed: measured, expected, tolerance, flag."""
    s = summary[(summary["role"] == "scored") & (summary["run_id"] == summary["arm"])
                & (summary["status"] == "finished")]
    wide = s.pivot(index="seed", columns="arm", values="total_train_seconds")
    cols = ["seed", "measured", "expected", "tolerance", "flag"]
    if control not in wide or baseline not in wide or control not in step_ratio:
        return pd.DataFrame(columns=cols)
    measured = (wide[control] / wide[baseline]).dropna()
    tol = max(abs(math.log(effect)) / 2, math.log(1.05)) if effect > 0 and math.isfinite(effect) else math.log(1.05)
    off = np.abs(np.log(measured.to_numpy(float) / step_ratio[control]))
    return pd.DataFrame({"seed": measured.index, "measured": measured.to_numpy(float),
                         "expected": step_ratio[control], "tolerance": math.expm1(tol), "flag": off > tol},
                        columns=cols)
