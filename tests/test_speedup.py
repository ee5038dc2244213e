"""The headline's budget-curve speed-up (docs/protocol.md version 3) on worked examples whose
values are computed by hand in the comments."""
import math

import numpy as np
import pandas as pd
import pytest

from dbp import analysis as A
from dbp import speedup as SP


def _bc(arm, seed, seconds, losses):
    return pd.DataFrame({"arm": arm, "seed": seed, "planned_steps": range(len(seconds)),
                         "seconds": seconds, "final_val_loss": losses})


def test_crossings_log_budget_running_minimum_and_the_bounds_they_give():
    bc = pd.concat([_bc("bp", 0, [25, 50, 75], [0.60, 0.50, 0.48]),
                    _bc("dbp", 0, [31.25, 62.5, 93.75], [0.50, 0.44, 0.43]),    # below at once
                    _bc("dbp", 1, [40, 80, 120], [0.60, 0.70, 0.51]),          # a spike at 80
                    _bc("bp", 1, [25, 50, 75], [0.60, 0.58, 0.55])])           # never below
    log = SP.crossings(bc, 0.52).set_index(["arm", "seed"])
    # BP 0: w = (0.60 - 0.52) / (0.60 - 0.50) = 0.8 between 25 and 50: 25 x 2^0.8 in log-budget
    assert log.loc[("bp", 0), "seconds"] == pytest.approx(25 * 2 ** 0.8)
    assert log.loc[("dbp", 0), ["seconds", "kind"]].tolist() == [31.25, "at most"]
    # DBP 1 on its running minimum (0.60, 0.60, 0.51): from 80 s at 0.60, w = 0.08 / 0.09
    assert log.loc[("dbp", 1), "seconds"] == pytest.approx(80 * 1.5 ** (0.08 / 0.09))
    assert log.loc[("bp", 1), ["kind", "last_seconds"]].tolist() == ["miss", 75]
    v2 = SP.crossings(bc, 0.52, rule="first", scale="linear").set_index(["arm", "seed"])
    assert v2.loc[("bp", 0), "seconds"] == pytest.approx(45.0)  # 25 + 0.8 x 25
    # as measured, from the spike: w = (0.70 - 0.52) / (0.70 - 0.51) between 80 and 120
    assert v2.loc[("dbp", 1), "seconds"] == pytest.approx(80 + 40 * 0.18 / 0.19)


@pytest.mark.parametrize("base,arm,value,bound", [
    (("interpolated", 40.0), ("interpolated", 20.0), math.log(2), 0),
    (("interpolated", 40.0), ("at most", 10.0), math.log(4), 1),      # arm at most 10 s: >= 4x
    (("interpolated", 40.0), ("miss", 80.0), math.log(0.5), -1),      # arm beyond 80 s: < 0.5x
    (("at most", 10.0), ("interpolated", 20.0), math.log(0.5), -1),   # BP at most 10 s
    (("miss", 80.0), ("interpolated", 20.0), math.log(4), 1),         # BP beyond 80 s
    (("miss", 80.0), ("at most", 10.0), math.log(8), 1),              # both say the arm is faster
    (("at most", 10.0), ("at most", 10.0), math.nan, 0),              # open both ways
    (("miss", 80.0), ("miss", 80.0), math.nan, 0),
])
def test_seed_values_keep_bounds_as_bounds(base, arm, value, bound):
    def row(name, kind, t):
        first, last = (t, 2 * t) if kind == "at most" else (t / 2, t)
        return {"arm": name, "seed": 0, "seconds": {"miss": math.inf}.get(kind, t), "kind": kind,
                "first_seconds": first, "last_seconds": last}
    v = SP.seed_values(pd.DataFrame([row("bp", *base), row("dbp", *arm)]), "dbp").iloc[0]
    assert v["bound"] == bound
    assert (math.isnan(v["value"]) and math.isnan(value)) or v["value"] == pytest.approx(value)


def _values(logs, bounds):
    return pd.DataFrame({"seed": range(len(logs)), "value": logs, "bound": bounds})


def test_summary_median_interval_bound_and_test_on_six_seeds():
    vals = _values([0.05, 0.1, 0.2, 0.3, 0.4, 0.5], [1, 0, 0, 0, 0, 0])  # seed 0: at least 0.05
    r = SP.summarize(vals, np.array([]), 0.0)
    # median of the six (bound at its value) 0.25; with it at +inf the sorted values are
    # 0.1 .. 0.5, inf: median 0.35. n = 6: the interval is [x(1), x(6)] at 1 - 2/64 coverage,
    # the bound at its value below and at +inf above.
    assert r["median"] == pytest.approx(math.exp(0.25)) and r["median_hi"] == pytest.approx(math.exp(0.35))
    assert (r["lo"], r["hi"], r["coverage"]) == (pytest.approx(math.exp(0.05)), math.inf, 0.96875)
    assert r["p_value"] == pytest.approx(2 / 64)  # all six positive, whatever the bound's truth
    assert (r["n_exact"], r["n_at_least"], r["n_at_most"]) == (5, 1, 0)
    # the exact seeds' geometric mean and t interval: mean 0.3, var 0.025, t(0.975, 4) = 2.776445
    half = 2.776445 * math.sqrt(0.025 / 5)
    assert r["geo_mean"] == pytest.approx(math.exp(0.3))
    assert (r["t_lo"], r["t_hi"]) == pytest.approx((math.exp(0.3 - half), math.exp(0.3 + half)), rel=1e-5)
    assert SP.conclusion(r) == "faster"


def test_the_step_cost_uncertainty_widens_the_interval_and_the_test():
    vals = _values([0.05, 0.1, 0.2, 0.3, 0.4, 0.5], [0] * 6)
    draws = math.log(1.2) + np.linspace(-0.05, 0.05, 4001)   # the ratio's log, +-0.05 around 1.2
    r = SP.summarize(vals, draws, math.log(1.2))
    # the seeds' interval holds 96.875 %, the step cost gets the 1.875 % left: its quantiles
    # 0.009375 and 0.990625 of a uniform +-0.05 are -+0.0490625
    assert r["lo"] == pytest.approx(math.exp(0.05 - 0.0490625), rel=1e-4)
    assert r["hi"] == pytest.approx(math.exp(0.5 + 0.0490625), rel=1e-4)
    # Berger-Boos: shifting by up to +-0.05 (99 %) moves no value below zero: p = 2/64 + 0.01
    assert r["p_value"] == pytest.approx(2 / 64 + 0.01)
    without = SP.summarize(vals, draws, math.log(1.2), step_cost=False)
    assert (without["lo"], without["p_value"]) == (pytest.approx(math.exp(0.05)), pytest.approx(2 / 64))
    # a shared shift of 0.1 can turn 0.05 and 0.1 into values at or below 0: the test's p grows
    wide = SP.summarize(vals, math.log(1.2) + np.linspace(-0.12, 0.12, 4001), math.log(1.2))
    assert wide["p_value"] > 0.1 and SP.conclusion(wide) == "not resolved"


def test_power_line_from_the_exact_seeds_spread():
    vals = _values([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0] * 6)
    r = SP.summarize(vals, np.array([]), 0.0)
    sd = float(np.std([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], ddof=1))  # 0.187083
    # (t(0.975, 5) + t(0.8, 5)) x sd / sqrt(6) = (2.570582 + 0.919544) x 0.187083 / 2.449490
    assert r["min_detectable"] == pytest.approx(math.exp(3.490126 * sd / math.sqrt(6)), rel=1e-5)
    # +-10 % (log 1.1 = 0.09531) needs t(0.975, n-1) sd / sqrt(n) <= 0.09531: n = 18
    # (t(0.975, 16) = 2.119905: 0.0935 at 18; t(0.975, 15) = 2.131450: 0.0967 at 17)
    assert r["seeds_for_10pct"] == 18


def test_identity_checks_the_clock_on_every_seed_against_half_the_effect():
    summary = pd.DataFrame({"role": "scored", "run_id": ["bp", "identity"] * 3,
                            "arm": ["bp", "identity"] * 3, "seed": [0, 0, 1, 1, 2, 2],
                            "status": "finished", "total_train_seconds": [100, 125, 100, 140, 100, 115]})
    c = SP.clock_check(summary, pd.Series({"identity": 1.25}), effect=1.2).set_index("seed")
    # tolerance log(1.2) / 2 = 0.0912: 1.40 / 1.25 (log 0.113) is out, 1.15 / 1.25 (0.083) in
    assert c["tolerance"].iloc[0] == pytest.approx(math.sqrt(1.2) - 1)
    assert c["flag"].tolist() == [False, True, False]
    small = SP.clock_check(summary, pd.Series({"identity": 1.25}), effect=1.01)  # floor: 5 %
    assert small["tolerance"].iloc[0] == pytest.approx(0.05) and small["flag"].tolist() == [False, True, True]


def test_stability_counts_spikes_and_divergences_per_arm():
    curves = pd.DataFrame({"role": "scored", "arm": ["dbp"] * 8, "seed": [5] * 4 + [0] * 4,
                           "run_id": ["dbp"] * 8, "step": [0, 10, 20, 30] * 2,
                           "val_loss": [2.4, 0.50, 0.46, 0.68, 2.4, 0.6, 0.5, 0.45]})
    runs = pd.DataFrame({"run_id": ["dbp", "dbp"], "seed": [5, 0], "status": ["finished", "finished"]})
    st = SP.stability(runs, curves, 0.10).set_index("arm").loc["dbp"]
    assert (st["runs"], st["runs_spiked"], st["seeds_spiked"]) == (2, 1, [5])
    assert st["worst"] == pytest.approx(0.68 / 0.46 - 1) and st["worst_run"] == "dbp/seed5"


def test_step_cost_draws_resample_the_kept_rounds():
    rounds = pd.DataFrame({"round": np.repeat(range(40), 2), "arm": ["bp", "dbp"] * 40, "steps": 1,
                           "wall_seconds": np.ravel([[1.0, 1.2 + 0.01 * (i % 5)] for i in range(40)]),
                           "cpu_seconds": np.ravel([[2.0, 2.4] for _ in range(40)]), "threads": 2})
    d = SP.step_cost_draws(A.kept_rounds(rounds), "dbp", n=500)
    assert d.shape == (500,) and np.all((d >= math.log(1.2)) & (d <= math.log(1.24)))
    assert np.median(d) == pytest.approx(math.log(1.22), abs=0.011)
    assert SP.step_cost_draws(A.kept_rounds(rounds), "cadamw").size == 0
