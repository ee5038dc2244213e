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


def test_spikes_count_excursions_and_the_worst_rise():
    # running best before each point: 1.0 .8 .8 .8 .7 .7 .6; rises: .83/.8 = 1.0375,
    # .85/.8 = 1.0625 (one excursion), .72/.7 = 1.0286, .9/.6 = 1.5: three spikes, worst 0.5
    curve = [1.0, 0.8, 0.83, 0.85, 0.7, 0.72, 0.6, 0.9]
    assert S.spikes(curve) == (3, pytest.approx(0.5))
    assert S.spikes(curve, rise=0.05) == (2, pytest.approx(0.5))  # 1.0375 and 1.0286 are noise now
    assert S.spikes([1.0, 0.9, 0.91]) == (0, pytest.approx(0.91 / 0.9 - 1))  # a rise below `rise`
    assert S.spikes([1.0, 0.9, math.nan, 0.8]) == (1, math.inf)  # diverged
    assert S.spikes([1.0, 0.9, 0.9, 0.5]) == (0, 0.0) and S.spikes([]) == (0, 0.0)


def test_log_scale_crossing_is_closer_on_a_power_law():
    # y = 0.4 + x^-0.5: y(40) = 0.558113883008419, y(80) = 0.5118033988749895; target 0.53 is
    # reached at x = 0.13^-2 = 59.171597633136. w = (y40 - .53) / (y40 - y80) = 0.6070738307856471;
    # linear: 40 + 40 w = 64.28295323142589 (5.11 late); log: 40 * 2^w = 60.92666746716917 (1.76)
    x = [40, 80, 120]
    y = [0.4 + a ** -0.5 for a in x]
    w = (y[0] - 0.53) / (y[0] - y[1])
    lin, kind = S.curve_crossing(x, y, 0.53)
    log, _ = S.curve_crossing(x, y, 0.53, scale="log")
    assert kind == "interpolated" and S.curve_crossing(x, y, 0.53, scale="linear") == (lin, kind)
    assert lin == pytest.approx(40 + 40 * w, abs=1e-9) and lin == pytest.approx(64.28295323142589)
    assert log == pytest.approx(math.exp(math.log(40) + w * math.log(2)), abs=1e-9)
    assert log == pytest.approx(60.92666746716917)
    exact = 0.13 ** -2
    assert abs(log - exact) < abs(lin - exact)
    with pytest.raises(ValueError):
        S.curve_crossing([0, 10], [0.5, 0.3], 0.4, scale="log")


def test_crossing_rules_on_a_non_monotone_curve():
    x, y = [10, 20, 30], [0.43, 0.447, 0.41]
    # first: from (20, .447) to (30, .41): 20 + 10 * .027 / .037 = 1010 / 37
    assert S.curve_crossing(x, y, 0.42) == (pytest.approx(1010 / 37), "interpolated")
    # envelope .43 .43 .41: from (20, .43): 20 + 10 * .01 / .02 = 25
    assert S.curve_crossing(x, y, 0.42, rule="envelope") == (pytest.approx(25.0), "interpolated")
    # skip drops .447: from (10, .43) to (30, .41): 10 + 20 * .5 = 20
    assert S.curve_crossing(x, y, 0.42, rule="skip") == (pytest.approx(20.0), "interpolated")
    for rule in ("first", "envelope", "skip"):
        assert S.curve_crossing(x, [0.4, 0.5, 0.3], 0.42, rule=rule) == (10.0, "at most")
        assert S.curve_crossing(x, [0.5, math.nan, math.inf], 0.42, rule=rule) == (math.inf, "miss")


def test_signed_rank_test_worked_examples():
    assert S.signed_rank_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx(2 / 64)
    # ranks 3 -1 2 5 4 6: S = 21 - 2 * 1; |S| >= 19 when the flipped ranks sum <= 1 or >= 20: 4 of 64
    assert S.signed_rank_test([0.5, -0.1, 0.3, 0.9, 0.7, 1.1]) == pytest.approx(4 / 64)
    # the zero keeps rank 1 with sign 0: only +-(2+3+4+5+6) reach 20, either sign of the zero
    assert S.signed_rank_test([0.0, 1, 2, 3, 4, 5]) == pytest.approx(4 / 64)
    assert S.signed_rank_test([]) == 1.0 and S.signed_rank_test([math.nan, 0.3]) == 1.0


def test_signed_rank_needs_no_constant_for_a_miss():
    # five -1 (tied rank 3) and a miss (rank 6): S = 6 - 15 = -9. With the miss at +6, sums of
    # five +-3 of 15, 9, 3, -15 (1 + 5 + 10 + 1 patterns) give |S| >= 9: 2 * 17 of 64
    for miss in (math.inf, 1e3, 1e9):
        assert S.signed_rank_test([-1] * 5 + [miss]) == pytest.approx(17 / 32)
    # the mean test puts inf at 2 * 1 + 1 = 3: S = -2; five +-1 summing to -3 (5 patterns) give
    # |3 - 3| < 2: 2 * 27 of 64. At 1e3 every pattern is as extreme: p = 1
    assert S.sign_flip_test([-1] * 5 + [math.inf]) == pytest.approx(27 / 32)
    assert S.sign_flip_test([-1] * 5 + [1e3]) == pytest.approx(1.0)


def test_signed_rank_with_bounds_takes_the_largest_p():
    v = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # the last is only known to be <= 0.6: at -0.65 (rank 6, negative) S = 15 - 6, |S| >= 9 when
    # the flipped ranks sum <= 6 or >= 15: 14 + 14 of 64. Lower down: rank 5 gives 20/64, rank 3
    # 10/64, rank 1 4/64; at 0 4/64; tied with -0.5 22/64; positive 2/64 or less
    assert S.signed_rank_test(v, [0, 0, 0, 0, 0, -1]) == pytest.approx(28 / 64)
    assert S.signed_rank_test(v, [0, 0, 0, 0, 0, 1]) == pytest.approx(2 / 64)  # still rank 6, positive
    assert S.signed_rank_test(v, [0, 0, 0, 0, 0, 0]) == S.signed_rank_test(v)
    with pytest.raises(ValueError):
        S.signed_rank_test([1.0] * 7, [1] * 7)


def test_median_interval_order_statistics():
    six = S.median_interval([0.3, 0.1, 0.6, 0.2, 0.5, 0.4])
    assert (six["k"], six["kind"], six["coverage"]) == (1, "order", pytest.approx(1 - 2 / 64))
    assert (six["lo"], six["hi"], six["median"]) == pytest.approx((0.1, 0.6, 0.35))
    ten = [0.3, 0.1, 0.9, 0.5, 0.2, 0.7, 0.4, 1.0, 0.6, 0.8]
    s = S.median_interval(ten)
    # k = 2: 1 - 2 * (1 + 10) / 1024 = 0.978515625; k = 3 would give 1 - 2 * 56 / 1024 = 0.890625
    assert (s["k"], s["coverage"], s["n"], s["n_bounds"]) == (2, pytest.approx(0.978515625), 10, 0)
    assert (s["lo"], s["hi"]) == pytest.approx((0.2, 0.9))
    five = S.median_interval([0.1, 0.2, 0.3, 0.4, math.inf])  # 1 - 2/32 < 0.95: the range
    assert five["kind"] == "range" and math.isnan(five["coverage"])
    assert (five["lo"], five["hi"]) == (0.1, math.inf)


def test_median_interval_with_bounds():
    ten = [0.3, 0.1, 0.9, 0.5, 0.2, 0.7, 0.4, 1.0, 0.6, 0.8]
    # 0.3 only known <= 0.3, 0.9 only >= 0.9. Lower end: 0.3 at -inf, x_(2) of
    # -inf .1 .2 .4 .5 .6 .7 .8 .9 1 = 0.1; upper end: 0.9 at inf, x_(9) of
    # .1 .2 .3 .4 .5 .6 .7 .8 1 inf = 1
    s = S.median_interval(ten, [-1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    assert (s["lo"], s["hi"], s["k"], s["n_bounds"]) == (0.1, 1.0, 2, 2)
    assert (s["median"], s["median_lo"], s["median_hi"]) == pytest.approx((0.55, 0.55, 0.55))
    # 0.6 only known <= 0.6 reaches the median: at -inf the middle pair is .4 .5
    s = S.median_interval(ten, [0, 0, 0, 0, 0, 0, 0, 0, -1, 0])
    assert (s["median_lo"], s["median"], s["median_hi"]) == pytest.approx((0.45, 0.55, 0.55))
    assert (s["lo"], s["hi"]) == pytest.approx((0.1, 0.9))
    up = S.median_interval([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 0, 0, 0, 0, 1])
    assert (up["lo"], up["hi"]) == (0.1, math.inf)  # an open interval


def test_shifted_interval():
    assert S.shifted_interval(0.1, 0.3, -0.02, 0.05) == pytest.approx((0.05, 0.32))
    assert S.shifted_interval(0.1, 0.3, 0.0, 0.0) == (0.1, 0.3)


def test_min_detectable_and_seeds_for_halfwidth():
    # t(0.975, 5) = 2.570582, t(0.8, 5) = 0.919544 (table): (2.570582 + 0.919544) * 0.1 / sqrt(6)
    assert S.min_detectable(0.1, 6) == pytest.approx(3.490126 * 0.1 / math.sqrt(6), rel=1e-6)
    assert math.isnan(S.min_detectable(0.1, 1)) and math.isnan(S.min_detectable(math.inf, 6))
    # n = 6: 2.570582 * 0.1 / sqrt(6) = 0.10494 > 0.1; n = 7: t(0.975, 6) = 2.446912 -> 0.09248
    assert S.seeds_for_halfwidth(0.1, 0.1) == 7
    # n = 17: t(0.975, 16) = 2.119905 -> 0.05141; n = 18: t(0.975, 17) = 2.109816 -> 0.04973
    assert S.seeds_for_halfwidth(0.1, 0.05) == 18
    with pytest.raises(ValueError):
        S.seeds_for_halfwidth(0.1, 0.05, max_n=17)
