"""Paired statistics against hand-computed values."""
import math

import numpy as np
import pytest

from dbp import stats as S


def test_six_pairs_one_way_give_p_two_in_64():
    assert S.sign_flip_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx(2 / 64)
    assert S.sign_flip_test([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]) == pytest.approx(2 / 64)
    # one sign against: the flipped subsets with sum <= 3 or >= 18 of {1..6}: 10 of 64
    assert S.sign_flip_test([1, 2, -3, 4, 5, 6]) == pytest.approx(10 / 64)
    assert S.sign_flip_test([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # 3 seeds can never say more


def test_geometric_mean_and_t_interval_worked_example():
    base, arm = [12, 15, 11, 13, 14], [10, 10, 10, 10, 10]  # ratios 1.2 1.5 1.1 1.3 1.4
    s = S.ratio_summary(base, arm)
    logs = [math.log(r) for r in (1.2, 1.5, 1.1, 1.3, 1.4)]
    mean = sum(logs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 4)
    half = 2.776445 * sd / math.sqrt(5)  # t(0.975, 4 df), from a table
    assert s["geo_mean"] == pytest.approx(math.exp(mean))
    assert s["geo_mean"] == pytest.approx((1.2 * 1.5 * 1.1 * 1.3 * 1.4) ** 0.2)
    assert (s["lo"], s["hi"]) == pytest.approx((math.exp(mean - half), math.exp(mean + half)), rel=1e-5)
    assert s["interval"] == "t" and s["median"] == pytest.approx(1.3)
    assert s["p_value"] == pytest.approx(2 / 32)


def test_too_few_pairs_give_the_range():
    s = S.ratio_summary([12, 15, 11], [10, 10, 10])
    assert s["interval"] == "range"
    assert (s["lo"], s["hi"]) == pytest.approx((1.1, 1.5))


def test_a_miss_is_counted_and_the_most_extreme_value():
    s = S.ratio_summary([10] * 6, [5, 5, 5, 5, 5, math.inf])
    assert (s["n"], s["n_both"], s["n_arm_miss"], s["n_base_miss"], s["n_undefined"]) == (6, 5, 1, 0, 0)
    assert s["geo_mean"] == pytest.approx(2.0) and (s["lo"], s["hi"]) == pytest.approx((2.0, 2.0))
    # log ratios: five ln 2, and the miss as -(2 ln 2 + 1). Sign patterns with |sum| >= the
    # observed: all five kept with the miss negative, or at most three kept (26), each with
    # either sign of the miss mirrored: 2 x 27 of 64.
    assert s["p_value"] == pytest.approx(54 / 64)
    assert s["median"] == pytest.approx(2.0)


def test_both_missed_is_undefined_and_left_out():
    s = S.ratio_summary([10, 10, math.inf, 10, 10, 10, 10], [5, 5, math.inf, 5, 5, 5, 5])
    assert (s["n"], s["n_undefined"], s["n_both"]) == (7, 1, 6)
    assert s["p_value"] == pytest.approx(2 / 64)
    nothing = S.ratio_summary([math.inf], [math.inf])
    assert math.isnan(nothing["geo_mean"]) and nothing["p_value"] == 1.0


def test_identical_pairs_give_p_one():
    assert S.sign_flip_test([0.0] * 8) == 1.0
    assert S.ratio_summary([3.0] * 8, [3.0] * 8)["p_value"] == 1.0


def test_diff_summary():
    d = S.diff_summary([0.01, 0.02, 0.03, np.nan])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.02) and d["interval"] == "range"
    assert (d["lo"], d["hi"]) == pytest.approx((0.01, 0.03)) and d["p_value"] == pytest.approx(0.25)


def test_first_and_sustained_crossing():
    assert S.crossings([0.5, 0.4, 0.3, 0.45, 0.29, 0.28], 0.35) == (2, 4)
    assert S.crossings([0.5, 0.3, 0.2], 0.35) == (1, 1)
    assert S.crossings([0.5, 0.3, 0.4], 0.35) == (1, None)  # ends above: never sustained
    assert S.crossings([0.5, float("nan"), 0.4], 0.35) == (None, None)
    assert S.crossings([0.35], 0.35) == (0, 0)  # a tie counts as reached


def test_budget_curve_crossing_and_value_at():
    assert S.curve_crossing([10, 20, 30], [0.5, 0.4, 0.3], 0.35) == (pytest.approx(25.0), "interpolated")
    assert S.curve_crossing([10, 20, 30], [0.3, 0.2, 0.1], 0.35) == (10.0, "at most")
    assert S.curve_crossing([10, 20, 30], [0.5, 0.45, 0.4], 0.35) == (math.inf, "miss")
    assert S.value_at([10, 20, 30], [0.5, 0.4, 0.3], 15) == pytest.approx(0.45)
    assert math.isnan(S.value_at([10, 20, 30], [0.5, 0.4, 0.3], 35))
