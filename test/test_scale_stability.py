"""Scale stability of a sequence against hand-computed values, and through the evaluation protocol."""
import math

import numpy as np
import pytest

from diffsql_model.eval import protocols, scale_stability


def test_hand_computed_sequence():
    s = scale_stability.stability([2.0, 2.0, 3.0, 3.0, 2.0])
    # mean 2.4; population std sqrt((3 x 0.4^2 + 2 x 0.6^2) / 5) = sqrt(0.24)
    assert s["ratio_mean"] == pytest.approx(2.4) and s["ratio_median"] == 2.0
    assert s["ratio_cv"] == pytest.approx(math.sqrt(0.24) / 2.4)
    # |r_t / r_t-1 - 1|: 0, 0.5, 0, 1/3 -> median (0 + 1/3) / 2
    assert s["median_change"] == pytest.approx(1 / 6) and s["max_change"] == pytest.approx(0.5)
    assert s["n_frames"] == 5


def test_constant_and_single_frame():
    s = scale_stability.stability([1.7] * 4)
    assert s["ratio_cv"] == pytest.approx(0, abs=1e-15) and s["median_change"] == pytest.approx(0, abs=1e-15)
    one = scale_stability.stability([3.0])
    assert one["ratio_cv"] == 0 and one["median_change"] is None
    assert "n/a" in scale_stability.format_line(one)
    with pytest.raises(ValueError, match="at least one"):
        scale_stability.stability([])
    with pytest.raises(ValueError, match="> 0"):
        scale_stability.stability([1.0, -2.0])


def test_bag_samples_report_the_needed_scale_of_each_frame():
    # frames whose ground truth is 2x, 2x, 3x the prediction's medians; a fixed scale does not
    # change the scale a frame needs
    pred = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    gts = [pred * 2, pred * 2, pred * 3]
    for scaling in ("median", "fixed"):
        cfg = protocols.EvalConfig.for_protocol("bag", scaling=scaling)
        res = protocols.evaluate_bag_samples([(i, g) for i, g in enumerate(gts)], lambda i: pred, cfg)
        assert [f["needed_scale"] for f in res["per_frame"]] == pytest.approx([2, 2, 3])
        st = res["scale_stability"]
        assert st["median_change"] == pytest.approx(0.25)  # changes 0 and 0.5
        assert st["ratio_cv"] == pytest.approx(np.std([2, 2, 3]) / np.mean([2, 2, 3]))


def test_split_lines_of_one_drive_in_order_are_a_sequence():
    from diffsql_model.data.kitti import SplitLine

    drive = "2011_01_01/2011_01_01_drive_0001_sync"
    lines = [SplitLine(drive, f, "l") for f in (0, 1, 5)]
    assert protocols.is_sequence(lines)
    assert not protocols.is_sequence(lines[::-1])
    assert not protocols.is_sequence(lines + [SplitLine(drive.replace("0001", "0002"), 9, "l")])
