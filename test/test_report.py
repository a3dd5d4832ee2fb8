"""HTML report and point-cloud rendering: pixel positions by hand, z-buffer, page parsed back."""
import html.parser
import math

import cv2
import numpy as np

from diffsql_model.camera import depth_to_points
from diffsql_model.colormaps import colorize_inverse_depth, depth_picture_bgr
from diffsql_ros import report


def _on_view_axis(distance, height=6.0, back=8.0, pitch_deg=25.0):
    """A point on the optical axis of report.render_point_cloud's virtual camera, `distance` away."""
    th = math.radians(pitch_deg)
    return np.array([0.0, -height + distance * math.sin(th), -back + distance * math.cos(th)], np.float32)


def test_point_on_the_view_axis_lands_in_the_centre():
    img = report.render_point_cloud(_on_view_axis(20.0)[None], np.array([[255, 0, 0]], np.uint8),
                               size=(64, 48), point_px=1, max_range=100)
    ys, xs = np.nonzero(img.sum(axis=2) != 3 * 24)  # background is grey 24
    assert list(zip(ys, xs)) == [(24, 32)]
    assert tuple(img[24, 32]) == (0, 0, 255)  # RGB red written as BGR


def test_point_one_metre_right_projects_by_the_focal_length():
    # Virtual camera: fov 70 deg over 640 px -> f = 320 / tan(35 deg) = 457.0 px; a point 1 m to
    # the right at view depth 20 m lands 457.0 / 20 = 22.85 -> 23 px right of the centre.
    p = _on_view_axis(20.0) + np.array([1.0, 0, 0], np.float32)
    img = report.render_point_cloud(p[None], np.array([[0, 255, 0]], np.uint8), size=(640, 360), point_px=1,
                               max_range=100)
    ys, xs = np.nonzero(img[..., 1] == 255)
    assert (int(ys[0]), int(xs[0])) == (180, 320 + round(320 / math.tan(math.radians(35)) / 20))


def test_nearest_point_wins_whatever_the_order():
    near, far = _on_view_axis(10.0), _on_view_axis(30.0)
    colours = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    for pts, cols in (([near, far], colours), ([far, near], colours[::-1])):
        img = report.render_point_cloud(np.stack(pts), cols, size=(64, 48), point_px=1, max_range=100)
        assert tuple(img[24, 32]) == (0, 0, 255)  # the near point is red


def test_points_behind_or_out_of_range_are_not_drawn():
    pts = np.array([[0, 0, -1.0], [0, 0, 500.0], [np.nan, 0, 5.0]], np.float32)
    img = report.render_point_cloud(pts, size=(64, 48))
    empty = report.render_point_cloud(np.zeros((0, 3), np.float32), size=(64, 48))  # "no points" caption
    np.testing.assert_array_equal(img, empty)
    assert (empty[30:] == 24).all()  # nothing drawn below the caption


def test_depth_colours_are_the_nodes_map_in_bgr_invalid_black():
    depth = np.array([[2.0, 50.0, 0.0, np.nan]], np.float32)
    img = depth_picture_bgr(depth, 1.0, 80.0)  # BGR for cv2.imwrite
    node = colorize_inverse_depth(np.array([[2.0, 50.0]], np.float32), 1.0, 80.0)  # RGB, what rviz shows
    np.testing.assert_array_equal(img[0, :2], node[0, :, ::-1])
    assert img[0, 0, 2] > img[0, 0, 0] and img[0, 1, 0] > img[0, 1, 2]  # near warm (red), far blue
    assert not img[0, 2:].any()  # depth 0 and NaN: black
    flat = depth_picture_bgr(np.full((2, 2), 7.0, np.float32))  # percentile range of one value
    assert flat.any() and (flat == flat[0, 0]).all()


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.headings = [], [], []
        self._tag = None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._tag == "td" and data.strip():
            self.cells.append(data.strip())
        if self._tag in ("h1", "h2"):
            self.headings.append(data.strip())


def test_report_page_parses_and_references_written_pictures(tmp_path):
    rgb = np.zeros((40, 120, 3), np.uint8)
    rgb[:, :60] = (200, 30, 10)
    depth = np.linspace(2, 40, 40 * 120, dtype=np.float32).reshape(40, 120)
    unc = 0.1 * depth
    K = np.array([[100.0, 0, 60], [0, 100, 20], [0, 0, 1]])
    xyz, pix = depth_to_points(depth, K, stride=2)
    entries = report.frame_pictures(tmp_path / "pics", "f0", rgb, depth, unc, xyz, rgb[pix[:, 0], pix[:, 1]])
    assert [e[0] for e in entries] == ["input", "depth", "uncertainty", "point cloud"]
    rows = [report.FrameRow("frame 0", [(lbl, f"pics/{src}") for lbl, src in entries])]
    scores = {"abs_rel": 0.1234, "sq_rel": 0.5, "rmse": 4.0, "rmse_log": 0.2, "a1": 0.9, "a2": 0.95,
               "a3": 0.99, "count": 7}
    summary = {"frames_played": 12, "frames_evaluated": 10, "frames_dropped": 0, "frames_without_lidar": 2,
               "latency_ms": {"p50": 150.04, "p90": 200.0, "p99": 250.0, "max": 260.0}, "throughput_fps": 5.5}
    page = report.write_report(tmp_path / "report.html", "T <&> test", [
        report.Section("Frames", frames=rows),
        report.Section("Metrics", paragraphs=["Note: <synthetic> training"],
                       tables=[report.metrics_table([("run A", scores, "n"), ("run B", None, "no data")]),
                          report.latency_table([("bag", summary)])])])
    parser = _Collect()
    parser.feed(page.read_text())
    assert parser.headings[0] == "T <&> test"  # escaped in the file, text again once parsed
    assert len(parser.images) == 4
    for src in parser.images:
        img = cv2.imread(str(page.parent / src))
        assert img is not None and img.ndim == 3, src
    assert cv2.imread(str(page.parent / parser.images[0])).shape == (40, 120, 3)
    # the input picture is the RGB image written as BGR: left half red
    assert tuple(cv2.imread(str(page.parent / parser.images[0]))[5, 5]) == (10, 30, 200)
    assert "0.123" in parser.cells and "150.0" in parser.cells and "7" in parser.cells
    b_row = parser.cells[parser.cells.index("run B"):][:8]
    assert b_row[1:8] == ["–"] * 7  # absent metrics are shown as such, not as zeros


def test_backproject_inverts_the_pinhole_projection():
    depth = np.full((10, 20), 5.0, np.float32)
    K = np.array([[50.0, 0, 10], [0, 50, 5], [0, 0, 1]])
    xyz, pix = depth_to_points(depth, K, stride=1)
    u = K[0, 0] * xyz[:, 0] / xyz[:, 2] + K[0, 2]
    v = K[1, 1] * xyz[:, 1] / xyz[:, 2] + K[1, 2]
    np.testing.assert_allclose(u, pix[:, 1], atol=1e-4)  # integer pixel centres, as the node's cloud
    np.testing.assert_allclose(v, pix[:, 0], atol=1e-4)


def _decode_data_uri(src):
    import base64

    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_plots_are_embedded_pngs_of_sensible_size(tmp_path):
    from diffsql_model.eval import sparsification
    from diffsql_ros import plots

    rng = np.random.default_rng(0)
    gt = rng.uniform(5, 60, 5000)
    pred = gt * rng.lognormal(0, 0.2, gt.size)
    frame = sparsification.frame_sparsification(gt, pred, np.abs(pred - gt) + rng.uniform(0, 5, gt.size))
    figs = [report.Figure("learning", plots.learning_curve([(50, 0.3), (100, 0.2), (150, 0.18)], 0.15, 150)),
            report.Figure("sparsification", plots.sparsification_curves(sparsification.mean_over_frames([frame]))),
            report.Figure("scale", plots.scale_ratios({"a": [1.0, 1.1, 0.9], "b": [3.0, 3.1, 3.0]})),
            report.Figure("latency", plots.latency_histogram({"bag": [100, 120, 130, 110], "other": []}))]
    page = report.write_report(tmp_path / "r.html", "plots", [report.Section("Plots", figures=figs)])
    parser = _Collect()
    parser.feed(page.read_text())
    assert len(parser.images) == 4 and not list(tmp_path.glob("*.png"))  # in the page, no files
    for src in parser.images:
        img = _decode_data_uri(src)
        assert img.shape == (320, 560, 3)
        assert (img < 250).any(axis=2).mean() > 0.02  # something is drawn on the white canvas
    import pytest

    with pytest.raises(ValueError, match="latencies"):
        plots.latency_histogram({"bag": []})
    with pytest.raises(ValueError, match="at least one"):
        plots.learning_curve([])


def test_uncertainty_and_stability_tables():
    unc = {"n_frames": 3, "std": {"abs_rel": {"ause": 0.135, "aurg": -0.047}, "rmse": {"ause": 2.5, "aurg": 0.25}},
           "std_over_depth": {"abs_rel": {"ause": 0.094, "aurg": -0.005}, "rmse": {"ause": 1.5, "aurg": 1.25}}}
    t = report.uncertainty_table([("run", unc), ("none", None)])
    assert t.rows[0] == ["run", "std", "0.135", "-0.047", "2.500", "0.250", "3"]
    assert t.rows[1][1] == "std/depth" and t.rows[2][2:] == ["–"] * 5
    st = {"n_frames": 20, "ratio_median": 1.02, "ratio_cv": 0.031, "median_change": 0.0049, "max_change": None}
    row = report.stability_table([("bag", "camera_height", st)]).rows[0]
    assert row == ["bag", "camera_height", "20", "1.020", "3.10", "0.49", "–"]
