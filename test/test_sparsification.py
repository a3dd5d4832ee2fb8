"""Sparsification curves, AUSE and AURG against hand-computed values (Poggi et al.'s area convention)."""
import math

import numpy as np
import pytest

from diffsql_model.eval import sparsification as sp

# Four pixels at 10 m; predictions 11, 8, 10, 14 m: AbsRel terms 0.1, 0.2, 0, 0.4, squared errors 1, 4, 0, 16.
GT = np.full(4, 10.0)
PRED = np.array([11.0, 8.0, 10.0, 14.0])
QUARTERS = [0, 0.25, 0.5, 0.75]  # removed fractions: 0, 1, 2, 3 of the 4 pixels


def trapezoids(y):
    """Hand form of the convention: points at 0, .25, .5, .75 and 0 at fraction 1."""
    y = list(y) + [0.0]
    return sum(0.25 * (a + b) / 2 for a, b in zip(y, y[1:]))


def test_model_ranking_hand_computed():
    u = np.array([0.3, 0.1, 0.2, 0.4])  # removes pixel 3 (0.4), then 0, then 2; pixel 1 stays last
    res = sp.metric_curves(GT, PRED, u, QUARTERS)
    ab = res["abs_rel"]
    # kept: all -> 0.7/4; {0,1,2} -> 0.3/3; {1,2} -> 0.2/2; {1} -> 0.2
    np.testing.assert_allclose(ab["curve"], [0.175, 0.1, 0.1, 0.2])
    # oracle removes 0.4, 0.2, 0.1 in that order
    np.testing.assert_allclose(ab["oracle"], [0.175, 0.1, 0.05, 0.0])
    np.testing.assert_allclose(ab["random"], [0.175] * 4)
    # areas: 0.25 * (0.1375 + 0.1 + 0.15 + 0.1) = 0.121875 and 0.25 * (0.1375 + 0.075 + 0.025) = 0.059375
    assert ab["ause"] == pytest.approx(0.121875 - 0.059375) == 0.0625
    assert ab["aurg"] == pytest.approx(0.175 - 0.121875)
    rm = res["rmse"]
    # squared errors kept: {1,4,0,16} {1,4,0} {4,0} {4}; oracle {1,4,0,16} {1,4,0} {1,0} {0}
    np.testing.assert_allclose(rm["curve"], np.sqrt([21 / 4, 5 / 3, 2, 4]))
    np.testing.assert_allclose(rm["oracle"], np.sqrt([21 / 4, 5 / 3, 1 / 2, 0]))
    assert rm["ause"] == pytest.approx(trapezoids(np.sqrt([21 / 4, 5 / 3, 2, 4])) - trapezoids(np.sqrt([21 / 4, 5 / 3, 0.5, 0])))
    assert rm["aurg"] == pytest.approx(math.sqrt(5.25) - trapezoids(np.sqrt([21 / 4, 5 / 3, 2, 4])))


def test_oracle_ranking_scores_zero_ause_and_the_largest_aurg():
    err = np.abs(PRED - GT) / GT
    res = sp.metric_curves(GT, PRED, err, QUARTERS)  # the ranking is the true error
    assert res["abs_rel"]["ause"] == pytest.approx(0, abs=1e-15)
    assert res["rmse"]["ause"] == pytest.approx(0, abs=1e-15)  # same order as the squared error here
    assert res["abs_rel"]["aurg"] == pytest.approx(0.175 - trapezoids([0.175, 0.1, 0.05, 0]))


def test_reversed_ranking_hand_computed():
    err = np.abs(PRED - GT) / GT
    res = sp.metric_curves(GT, PRED, -err, QUARTERS)  # removes the best pixels first
    ab = res["abs_rel"]
    # kept: all; {0.1, 0.2, 0.4}; {0.2, 0.4}; {0.4}
    np.testing.assert_allclose(ab["curve"], [0.175, 0.7 / 3, 0.3, 0.4])
    assert ab["ause"] == pytest.approx(trapezoids([0.175, 0.7 / 3, 0.3, 0.4]) - trapezoids([0.175, 0.1, 0.05, 0]))
    assert ab["aurg"] == pytest.approx(0.175 - trapezoids([0.175, 0.7 / 3, 0.3, 0.4])) and ab["aurg"] < 0


def test_constant_uncertainty_is_random_removal():
    # ties are broken in expectation: the curve stays at the full-set value, and AURG is what the
    # convention's last trapezoid leaves: full / (2 K), here K = 4 steps
    res = sp.metric_curves(GT, PRED, np.full(4, 7.0), QUARTERS)
    np.testing.assert_allclose(res["abs_rel"]["curve"], [0.175] * 4)
    np.testing.assert_allclose(res["rmse"]["curve"], [math.sqrt(5.25)] * 4)
    assert res["abs_rel"]["aurg"] == pytest.approx(0.175 / 8)
    # at the default 50 steps on many pixels: AURG = 0.01 x the full-set AbsRel, ~0
    rng = np.random.default_rng(0)
    gt = rng.uniform(5, 60, 20000)
    pred = gt * rng.lognormal(0, 0.2, gt.size)
    res = sp.metric_curves(gt, pred, np.ones(gt.size))
    full = res["abs_rel"]["curve"][0]
    assert res["abs_rel"]["aurg"] == pytest.approx(full / 100, rel=1e-9) and abs(res["abs_rel"]["aurg"]) < 0.003
    # a random ranking is the same in expectation
    res = sp.metric_curves(gt, pred, rng.random(gt.size))
    assert abs(res["abs_rel"]["aurg"] - full / 100) < 0.002


def test_ties_count_with_their_group_mean():
    # pixels 0 and 3 tie at the top: removing one of them takes away (0.1 + 0.4) / 2 in expectation
    curve = sp.removal_curve([0.1, 0.2, 0.0, 0.4], [5, 1, 2, 5], [0, 0.25, 0.5])
    np.testing.assert_allclose(curve, [0.175, (0.7 - 0.25) / 3, 0.2 / 2])


def test_std_over_depth_ranking_and_frames_mean():
    gt = np.array([10.0, 10.0, 20.0, 20.0])
    pred = np.array([11.0, 10.0, 20.0, 26.0])
    u = np.array([2.0, 1.0, 3.0, 4.0])  # / depth: 0.18, 0.1, 0.15, 0.15
    ranks = sp.rankings(u, pred)
    np.testing.assert_allclose(ranks["std_over_depth"], [2 / 11, 0.1, 0.15, 4 / 26])
    f1 = sp.frame_sparsification(gt, pred, u, QUARTERS)
    f2 = sp.frame_sparsification(GT, PRED, np.array([0.3, 0.1, 0.2, 0.4]), QUARTERS)
    mean = sp.mean_over_frames([f1, f2], QUARTERS)
    for rank in sp.RANKINGS:
        for m in sp.METRICS:
            got = mean[rank][m]
            assert got["ause"] == pytest.approx((f1[rank][m]["ause"] + f2[rank][m]["ause"]) / 2)
            assert got["aurg"] == pytest.approx((f1[rank][m]["aurg"] + f2[rank][m]["aurg"]) / 2)
            # the mean AUSE is the area between the mean curves
            assert got["ause"] == pytest.approx(sp.area(got["curve"], QUARTERS) - sp.area(got["oracle"], QUARTERS))
    assert mean["n_frames"] == 2 and mean["fractions"] == QUARTERS
    assert sp.frame_summary(f2)["std"]["abs_rel"] == {"ause": pytest.approx(0.0625), "aurg": pytest.approx(0.053125)}


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="NaN"):
        sp.rankings(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="fractions"):
        sp.removal_curve([1.0, 2.0], [1.0, 2.0], [0.1, 0.5])
    with pytest.raises(ValueError, match="fractions"):
        sp.area([1.0, 2.0], [0, 1.0])
    with pytest.raises(ValueError, match="as many"):
        sp.removal_curve([1.0, 2.0], [1.0], [0, 0.5])
    with pytest.raises(ValueError, match="no frames"):
        sp.mean_over_frames([])


def test_same_areas_as_the_papers_percentile_subsets():
    """The paper's evaluate.py keeps, per step, the pixels whose uncertainty is at or below the
    (100 - q) percentile and closes each curve with 0 at fraction 1; re-done here independently
    (untied ranks), it gives our AUSE and AURG."""
    rng = np.random.default_rng(1)
    gt = rng.uniform(3, 70, 30000)
    pred = gt * rng.lognormal(0, 0.25, gt.size)
    unc = np.abs(pred - gt) * rng.lognormal(0, 1.0, gt.size)
    x = np.arange(51) / 50

    def area(y):
        return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))

    ours = sp.metric_curves(gt, pred, unc)
    for name, term, reduce in (("abs_rel", np.abs(gt - pred) / gt, np.mean),
                               ("rmse", (gt - pred) ** 2, lambda v: np.sqrt(np.mean(v)))):
        def curve(rank):
            return np.array([reduce(term[-rank >= np.percentile(-rank, q)]) for q in range(0, 100, 2)] + [0.0])
        model, oracle = curve(unc), curve(term)
        assert ours[name]["ause"] == pytest.approx(area(model) - area(oracle), rel=1e-9)
        assert ours[name]["aurg"] == pytest.approx(reduce(term) - area(model), rel=1e-9)
