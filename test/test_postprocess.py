"""The depth node's per-frame arithmetic (diffsql_ros/postprocess.py) on hand-computed values, no ROS."""
from __future__ import annotations

import numpy as np

from diffsql_ros.postprocess import postprocess

SETTINGS = {"min_depth": 1.0, "max_depth": 50.0, "points.min_range": 2.0, "points.max_range": 30.0,
            "points.max_uncertainty": 0.1}


def frame():
    depth = np.array([[0.25, 1.0, 4.0], [10.0, 20.0, 30.0]], np.float32)
    unc = np.array([[0.1, 0.1, 0.2], [3.0, 1.0, 0.5]], np.float32)
    return depth, unc


def test_scale_range_mask_and_point_validity():
    depth, unc = frame()
    out = postprocess(depth, unc, 2.0, SETTINGS, points=True)
    # x2: 0.5 (below min_depth 1: NaN), 2, 8 / 20, 40, 60 (above max_depth 50: NaN)
    np.testing.assert_array_equal(out.depth, np.array([[np.nan, 2, 8], [20, 40, np.nan]], np.float32))
    np.testing.assert_array_equal(out.uncertainty, np.array([[0.2, 0.2, 0.4], [6, 2, 1]], np.float32))
    assert out.depth.dtype == out.uncertainty.dtype == np.float32
    # points: 2 <= depth <= 30 and uncertainty <= 0.1 x depth:
    #   2: 0.2 <= 0.2 yes; 8: 0.4 <= 0.8 yes; 20: 6 > 2 no; 40: beyond 30 no; NaN never
    np.testing.assert_array_equal(out.valid, [[False, True, True], [False, False, False]])
    assert out.depth is depth and out.uncertainty is unc  # in place: no copies per frame


def test_unit_scale_and_uncertainty_filter_off():
    depth, unc = frame()
    out = postprocess(depth, unc, 1.0, {**SETTINGS, "points.max_uncertainty": 0.0}, points=True)
    np.testing.assert_array_equal(out.depth, np.array([[np.nan, 1, 4], [10, 20, 30]], np.float32))
    np.testing.assert_array_equal(out.uncertainty, frame()[1])  # scale 1 leaves it as it was
    # 0.0 switches the uncertainty test off: the range [2, 30] alone (1 is below, 30 is in)
    np.testing.assert_array_equal(out.valid, [[False, False, True], [True, True, True]])


def test_no_cloud_no_validity_mask():
    depth, unc = frame()
    out = postprocess(depth, unc, 0.5, SETTINGS, points=False)
    assert out.valid is None
    np.testing.assert_array_equal(out.depth, np.array([[np.nan, np.nan, 2], [5, 10, 15]], np.float32))
