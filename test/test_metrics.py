"""Metrics against numbers worked out by hand (PROTOCOLS.md definitions)."""
import json
import math

import numpy as np
import pytest

from diffsql_model.eval import metrics


def test_metrics_hand_computed_three_values():
    # gt = [1, 2, 4], pred = [1.5, 2, 3]: errors gt - pred = [-0.5, 0, 1]
    m = metrics.compute_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]))
    assert m["abs_rel"] == pytest.approx((0.5 / 1 + 0 / 2 + 1 / 4) / 3)  # 0.25
    assert m["abs_rel"] == pytest.approx(0.25)
    assert m["sq_rel"] == pytest.approx((0.25 / 1 + 0 + 1 / 4) / 3)  # 1/6
    assert m["sq_rel"] == pytest.approx(0.1666667, abs=1e-6)
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3))  # sqrt(5/12)
    assert m["rmse"] == pytest.approx(0.6454972, abs=1e-6)
    # ln 1.5 = 0.4054651, ln(4/3) = 0.2876821
    assert m["rmse_log"] == pytest.approx(math.sqrt((0.4054651 ** 2 + 0.2876821 ** 2) / 3), abs=1e-6)
    assert m["rmse_log"] == pytest.approx(0.2870330, abs=1e-6)
    # log10 1.5 + log10(4/3) = log10 2 = 0.30103
    assert m["log10"] == pytest.approx(0.30103 / 3, abs=1e-6)
    # max ratios 1.5, 1, 1.333: only the middle one < 1.25; all < 1.5625
    assert m["a1"] == pytest.approx(1 / 3)
    assert m["a2"] == 1.0 and m["a3"] == 1.0


def test_delta_thresholds_are_strict():
    # ratio exactly 2 lies above 1.25^3 = 1.953125; ratio 1.5 lies between 1.25 and 1.5625
    m = metrics.compute_metrics(np.array([2.0, 3.0]), np.array([1.0, 2.0]))
    assert (m["a1"], m["a2"], m["a3"]) == (0.0, 0.5, 0.5)


def test_garg_crop_kitti_size():
    # 0.40810811*375 = 153.04, 0.99189189*375 = 371.96, 0.03594771*1242 = 44.65, 0.96405229*1242 = 1197.35
    assert metrics.garg_crop_indices(375, 1242) == (153, 371, 44, 1197)
    mask = metrics.garg_crop_mask(375, 1242)
    assert mask.shape == (375, 1242) and mask.sum() == (371 - 153) * (1197 - 44)
    assert mask[153, 44] and mask[370, 1196] and not mask[152, 500] and not mask[371, 500]
    assert not mask[200, 43] and not mask[200, 1197]


def test_median_scale_hand_checked():
    assert metrics.median_scale(np.array([1.0, 2, 4, 8, 9]), np.array([1.0, 1, 2, 3, 5])) == 2.0  # 4 / 2
    # even count: median gt (3+5)/2 = 4, median pred (1+3)/2 = 2
    assert metrics.median_scale(np.array([1.0, 3, 5, 100]), np.array([0.5, 1, 3, 50])) == 2.0
    with pytest.raises(ValueError, match="median"):
        metrics.median_scale(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0]))


def test_evaluate_frame_scaling_and_clip():
    gt = np.array([[10.0, 20.0], [0.0, 40.0]])
    valid = gt > 0
    # median scaling undoes a global factor exactly
    result, ratio = metrics.evaluate_frame(gt, gt * 4, valid, scaling="median", scale=1.0, clip=(1e-3, 80))
    assert ratio == 0.25 and result["abs_rel"] == pytest.approx(0) and result["a1"] == 1.0
    # fixed scale 1, prediction 100 m is clipped to 80 m: |50 - 80| / 50 = 0.6
    result, ratio = metrics.evaluate_frame(np.array([50.0]), np.array([100.0]), np.array([True]),
                                           scaling="fixed", scale=1.0, clip=(1e-3, 80))
    assert ratio == 1.0 and result["abs_rel"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate_frame(gt, np.full_like(gt, np.nan), valid, scaling="median", scale=1.0, clip=(1e-3, 80))


def test_mean_over_images_not_pixels():
    a = metrics.compute_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]))  # abs_rel 0.25
    b = metrics.compute_metrics(np.array([2.0]), np.array([1.0]))  # abs_rel 0.5
    assert metrics.mean_metrics([a, b])["abs_rel"] == pytest.approx(0.375)  # pooled would be 0.3125


def test_ratio_stats():
    s = metrics.ratio_stats([1.0, 2.0, 3.0])
    assert s["median"] == 2.0
    assert s["std"] == pytest.approx(math.sqrt(2 / 3))
    assert s["std_over_median"] == pytest.approx(math.sqrt(2 / 3) / 2)  # std of [0.5, 1, 1.5]


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="differ"):
        metrics.compute_metrics(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="no values"):
        metrics.compute_metrics(np.ones(0), np.ones(0))
    with pytest.raises(ValueError, match="NaN"):
        metrics.compute_metrics(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError, match="> 0"):
        metrics.compute_metrics(np.array([1.0, 0.0]), np.ones(2))


def test_resize_prediction_bilinear():
    pred = np.array([[1.0, 3.0]], dtype=np.float32)
    same = metrics.resize_prediction(pred, 1, 2)
    assert same is pred or np.array_equal(same, pred)
    up = metrics.resize_prediction(np.full((2, 4), 5.0, np.float32), 6, 12)
    assert up.shape == (6, 12) and np.allclose(up, 5.0)
    # bilinear (half-pixel centres): 1 x 2 -> 1 x 4 gives 1, 1.5, 2.5, 3
    assert np.allclose(metrics.resize_prediction(pred, 1, 4), [[1.0, 1.5, 2.5, 3.0]])


def test_table_and_json(tmp_path):
    m = metrics.compute_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]))
    head, row = metrics.format_table(m).splitlines()
    assert head.split() == ["AbsRel", "SqRel", "RMSE", "RMSElog", "d1", "d2", "d3"]
    assert [float(v) for v in row.split()] == [0.25, 0.167, 0.645, 0.287, 0.333, 1.0, 1.0]
    head, row = metrics.format_table(m, metrics.MAKE3D_COLUMNS).splitlines()
    assert head.split()[-1] == "log10" and float(row.split()[-1]) == 0.100
    path = metrics.write_json({"metrics": m, "n": np.int64(3), "bad": float("nan")}, tmp_path / "r.json")
    back = json.loads(path.read_text())
    assert back["metrics"]["abs_rel"] == 0.25 and back["n"] == 3 and back["bad"] is None
