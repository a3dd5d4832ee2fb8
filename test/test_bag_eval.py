"""diffsql-bag-eval: bags replayed through the real depth node (a subprocess), scored like diffsql-eval."""
import dataclasses
import html.parser
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.ros
rclpy = pytest.importorskip("rclpy")

from diffsql_model.data.bag_reader import open_bag, read_camera_stream, read_lidar  # noqa: E402
from diffsql_model.data.bag_types import INFO_TYPE  # noqa: E402
from diffsql_model.data.bag_writer import BagFrame, kitti_drive_to_bag, write_bag  # noqa: E402
from diffsql_model.data.calib import load_kitti_calib  # noqa: E402
from diffsql_model.data.lidar import lidar_depth_map, parse_extrinsic  # noqa: E402
from diffsql_model.data.sample_cli import synthetic_drive_to_bag  # noqa: E402
from diffsql_ros.bag_player import choose_topics, index_camera, stream_images, to_rclpy  # noqa: E402



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A random-init lite checkpoint at 64 x 192 and a 4-frame synthetic drive of that size."""
    import torch

    from diffsql_model.checkpoint import save_checkpoint
    from diffsql_model.depth_net import DiffSQLDepth
    from diffsql_model.data.synthetic import SyntheticConfig, render_drive
    from diffsql_model.presets import get_preset

    d = tmp_path_factory.mktemp("bag_eval")
    torch.manual_seed(0)
    cfg = get_preset("lite", height=64, width=192)
    save_checkpoint(d / "tiny.pt", {"model_config": cfg.to_dict(), "model": DiffSQLDepth.from_config(cfg).state_dict()})
    drive = render_drive(SyntheticConfig(width=192, height=64, num_frames=4, seed=5))
    synthetic_drive_to_bag(drive, d / "syn_mcap", "mcap")
    synthetic_drive_to_bag(drive, d / "syn_sqlite", "sqlite3")
    return d


@pytest.fixture
def bag_eval(capsys):
    """Run diffsql-bag-eval's main in this process (the depth node is still its own process)."""
    from diffsql_ros.bag_eval import main

    def run(*args):
        rc = main([*map(str, args), "--timeout", "20", "--first-timeout", "60"])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    return run


def diffsql_eval(*args) -> dict:
    from diffsql_model.eval import cli

    out = pathlib.Path(args[args.index("--json") + 1])
    assert cli.main(["--protocol", "bag", "--device", "cpu", *map(str, args)]) == 0
    return json.loads(out.read_text())


def test_replay_scores_equal_diffsql_eval_bag_protocol(work, bag_eval):
    res = bag_eval(work / "syn_mcap", "--checkpoint", work / "tiny.pt", "--max-rate", "--uncertainty",
                   "--json", work / "replay.json", "--report", work / "report", "--report-frames", "2")
    assert res.returncode == 0, res.stderr + res.stdout
    got = json.loads((work / "replay.json").read_text())
    ref = diffsql_eval("--data", work / "syn_mcap", "--checkpoint", work / "tiny.pt", "--uncertainty",
                       "--json", work / "ref.json")
    assert got["frames_played"] == got["frames_received"] == got["frames_evaluated"] == 4
    assert got["frames_dropped"] == 0 and got["errors"] == []
    assert ref["n_frames"] == 4
    # same frames (by stamp), same ground truth pixels, same numbers
    assert [f["frame"] for f in got["per_frame"]] == [f["frame"] for f in ref["per_frame"]]
    assert [f["n_valid"] for f in got["per_frame"]] == [f["n_valid"] for f in ref["per_frame"]]
    for k, v in ref["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    # --uncertainty: the node's published uncertainty scores as the network's own output does. The
    # random network's uncertainty spans 0.6 % of its value over a frame (std 0.16 m around 27 m):
    # the node's uint8 input path moves it by ~1e-5 m, which reorders near-ties (~1e-3 relative)
    assert got["frames_with_uncertainty"] == 4 and "AbsRel AUSE" in res.stdout and "std/depth" in res.stdout
    for rank in ("std", "std_over_depth"):
        for m in ("abs_rel", "rmse"):
            for k in ("ause", "aurg"):
                assert got["uncertainty"][rank][m][k] == pytest.approx(ref["uncertainty"][rank][m][k], rel=3e-3,
                                                                       abs=1e-5), (rank, m, k)
                assert [f["uncertainty"][rank][m][k] for f in got["per_frame"]] == pytest.approx(
                    [f["uncertainty"][rank][m][k] for f in ref["per_frame"]], rel=3e-3, abs=1e-5)
    # scale stability of the frames in stamp order, for the node's scale.mode (depth.yaml: relative)
    assert got["scale_mode"] == "relative" and "scale stability (scale.mode relative)" in res.stdout
    assert got["scale_stability"].pop("scale_mode") == "relative"
    # abs: the changes are differences of ratios near 1 (1e-7 apart when the node and this process
    # sum convolutions in another order, e.g. with other thread counts)
    assert got["scale_stability"] == pytest.approx(ref["scale_stability"], rel=1e-5, abs=1e-6)
    assert len(got["latencies_ms"]) == 4 and got["latency_ms"]["max"] == pytest.approx(max(got["latencies_ms"]))
    assert got["topics"]["lidar"] == "/lidar/points" and got["extrinsic_source"].startswith("/tf_static")
    lat = got["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["max"]
    assert "input_qos:=reliable" in " ".join(got["node"]["command"]) and got["node"]["exit_code"] == 0
    assert "points.rgb:=true" in got["node"]["command"]  # the report's cloud in the camera's colours
    # The replay ran under local_dds_environment's profile (tested below), which is gone after it.
    used = pathlib.Path(got["node"]["fastdds_profile"])
    assert used.name == "profile.xml" and used.parent.name.startswith("diffsql_dds_") and not used.exists()
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in os.environ
    # the report: parses, and every picture it names exists and decodes
    srcs = []

    class P(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                srcs.append(dict(attrs)["src"])

    page = (work / "report" / "index.html").read_text()
    P().feed(page)
    assert len(srcs) == 8  # 2 frames x input, depth, uncertainty, point cloud
    assert "sparsification" in page and "std/depth" in page and "scale stability" in page
    import cv2

    for s in srcs:
        assert cv2.imread(str(work / "report" / s)) is not None, s
    # the depth picture is the node's depth: 64 x 192 like the bag's images
    assert cv2.imread(str(work / "report" / srcs[1])).shape == (64, 192, 3)


def test_fixed_scale_mode_halves_the_needed_scale_not_its_stability(work, bag_eval):
    """scale.mode fixed (factor 0.5; the random network's depth is ~4x too far, 2x would leave
    max_depth): the node's depth is half the relative mode's, so each frame needs twice the
    scale; CV and frame-to-frame change are scale-free and stay."""
    ref = json.loads((work / "ref.json").read_text()) if (work / "ref.json").exists() else diffsql_eval(
        "--data", work / "syn_mcap", "--checkpoint", work / "tiny.pt", "--json", work / "ref.json")
    res = bag_eval(work / "syn_mcap", "--checkpoint", work / "tiny.pt", "--node-param", "scale.mode:=fixed",
                   "--node-param", "scale.factor:=0.5", "--json", work / "fixed.json")
    assert res.returncode == 0, res.stderr + res.stdout
    got = json.loads((work / "fixed.json").read_text())
    assert got["scale_mode"] == "fixed" and "uncertainty" not in got
    assert got["frames_evaluated"] == ref["n_frames"] == 4, (got["frames_dropped"], got["errors"], res.stdout[-1500:])
    assert [f["needed_scale"] for f in got["per_frame"]] == pytest.approx(
        [f["needed_scale"] * 2 for f in ref["per_frame"]], rel=1e-5)
    for k in ("ratio_cv", "median_change", "max_change"):
        assert got["scale_stability"][k] == pytest.approx(ref["scale_stability"][k], rel=1e-4, abs=1e-9)


def test_node_scale_mode_from_params_file_and_overrides(tmp_path):
    from diffsql_ros.bag_eval import node_scale_mode
    from diffsql_ros.replay import ReplaySettings

    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("/**:\n  ros__parameters:\n    scale:\n      mode: camera_height\n")
    flat.write_text("depth_node:\n  ros__parameters:\n    scale.mode: stereo\n")
    settings = ReplaySettings(tmp_path / "b", tmp_path / "c.pt", nested)
    assert node_scale_mode(settings) == "camera_height"
    assert node_scale_mode(dataclasses.replace(settings, params_file=flat)) == "stereo"
    assert node_scale_mode(dataclasses.replace(settings, node_params=("scale.mode:=fixed",))) == "fixed"
    (tmp_path / "none.yaml").write_text("/**:\n  ros__parameters:\n    device: cpu\n")
    assert node_scale_mode(dataclasses.replace(settings, params_file=tmp_path / "none.yaml")) == "relative"


def test_local_dds_environment_is_shared_memory_only_and_restored(monkeypatch):
    from diffsql_ros.replay import local_dds_environment

    monkeypatch.delenv("FASTDDS_DEFAULT_PROFILES_FILE", raising=False)
    with local_dds_environment():
        path = pathlib.Path(os.environ["FASTDDS_DEFAULT_PROFILES_FILE"])
        profile = path.read_text()
        assert "<type>SHM</type>" in profile and "UDP" not in profile  # nothing leaves the machine
        assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in os.environ and not path.exists()
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", "/robot/own.xml")
    with local_dds_environment():  # a profile the user chose wins
        assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == "/robot/own.xml"
    assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == "/robot/own.xml"


def test_rate_mode_keeps_recorded_timing_on_sqlite3_bag(work, bag_eval):
    res = bag_eval(work / "syn_sqlite", "--checkpoint", work / "tiny.pt", "--rate", "1.0", "--json", work / "rate.json")
    assert res.returncode == 0, res.stderr + res.stdout
    got = json.loads((work / "rate.json").read_text())
    assert got["mode"] == "rate x1" and got["frames_played"] == 4
    # 4 frames recorded at 10 Hz: the last is published 0.3 s after the first
    assert 0.28 <= got["replay_s"] < 1.0
    assert got["frames_received"] + got["frames_dropped"] == 4
    assert got["frames_evaluated"] == got["frames_received"] >= 1


def test_real_kitti_ros1_bag_with_kitti2bag_names(work, bag_eval, kitti_raw):
    bag = kitti_drive_to_bag(kitti_raw, "2011_09_26", "0001", work / "kitti.bag", frames=[0, 1, 50])
    res = bag_eval(bag, "--checkpoint", work / "tiny.pt", "--json", work / "kitti.json")
    assert res.returncode == 0, res.stderr + res.stdout
    got = json.loads((work / "kitti.json").read_text())
    assert got["topics"] == {"image": "/kitti/camera_color_left/image_raw",
                             "camera_info": "/kitti/camera_color_left/camera_info",
                             "lidar": "/kitti/velo/pointcloud"}
    # frame 50 has no velodyne scan: played and received, listed as without LiDAR
    assert (got["frames_played"], got["frames_evaluated"], got["frames_without_lidar"]) == (3, 2, 1)
    # ground truth through /tf_static (imu -> velo, imu -> camera) equals the calibration files'
    calib = load_kitti_calib(kitti_raw / "2011_09_26", 2)
    scan = np.fromfile(kitti_raw / "2011_09_26/2011_09_26_drive_0001_sync/velodyne_points/data/0000000000.bin",
                       np.float32).reshape(-1, 4)
    gt = lidar_depth_map(scan, calib.T_velo_to_cam, calib.K, calib.image_size)
    n_valid = int(((gt > 1e-3) & (gt < 80)).sum())
    assert abs(got["per_frame"][0]["n_valid"] - n_valid) <= 0.002 * n_valid
    # diffsql-eval on the same bag: same frames; both resize 1242x375 -> 192x64 with antialiased
    # bilinear, the node on uint8 (within rounding), hence a small tolerance
    ref = diffsql_eval("--data", bag, "--image-topic", "/kitti/camera_color_left/image_raw",
                       "--checkpoint", work / "tiny.pt", "--json", work / "kitti_ref.json")
    assert [f["frame"] for f in got["per_frame"]] == [f["frame"] for f in ref["per_frame"]]
    assert got["metrics"]["abs_rel"] == pytest.approx(ref["metrics"]["abs_rel"], rel=0.005)


def bag_without_tf(kitti_raw, path: pathlib.Path, fmt: str) -> pathlib.Path:
    """Real KITTI frames 0-2 (all with a scan) as a bag without /tf_static, as many robot bags are."""
    src = kitti_drive_to_bag(kitti_raw, "2011_09_26", "0001", path.with_name(path.stem + "_src.bag"), frames=[0, 1, 2])
    pairs = zip(read_camera_stream(src, "/kitti/camera_color_left/image_raw"), read_lidar(src))
    return write_bag(path, [BagFrame(c.stamp_ns, c.rgb, c.K, points=s.points, lidar_stamp_ns=s.stamp_ns)
                            for c, s in pairs], fmt)


@pytest.mark.parametrize("fmt", ["ros1", "sqlite3"])
def test_bag_without_tf_static_is_a_clear_error_in_both_evaluators(work, bag_eval, kitti_raw, capsys, fmt):
    # it was AttributeError: '<the bag's first message type>' object has no attribute 'transforms'
    bag = bag_without_tf(kitti_raw, work / ("notf.bag" if fmt == "ros1" else "notf_sqlite"), fmt)
    res = bag_eval(bag, "--checkpoint", work / "tiny.pt")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no /tf_static topic" in res.stderr and "--extrinsic" in res.stderr
    from diffsql_model.eval import cli

    assert cli.main(["--protocol", "bag", "--data", str(bag), "--checkpoint", str(work / "tiny.pt"),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no /tf_static topic" in err and "--extrinsic" in err


def test_replay_with_extrinsic_equals_diffsql_eval_on_bag_without_tf(work, bag_eval, kitti_raw):
    bag = bag_without_tf(kitti_raw, work / "notf_mcap", "mcap")
    T = load_kitti_calib(kitti_raw / "2011_09_26", 2).T_velo_to_cam
    extrinsic = "--extrinsic=" + " ".join(map(repr, T[:3].ravel().tolist()))
    res = bag_eval(bag, "--checkpoint", work / "tiny.pt", extrinsic, "--json", work / "notf.json")
    assert res.returncode == 0, res.stderr + res.stdout
    got = json.loads((work / "notf.json").read_text())
    ref = diffsql_eval("--data", bag, "--checkpoint", work / "tiny.pt", extrinsic, "--json", work / "notf_ref.json")
    assert got["extrinsic_source"] == "--extrinsic" and got["frames_evaluated"] == ref["n_frames"] == 3
    assert [f["frame"] for f in got["per_frame"]] == [f["frame"] for f in ref["per_frame"]]
    assert [f["n_valid"] for f in got["per_frame"]] == [f["n_valid"] for f in ref["per_frame"]]
    # both resize 1242x375 -> 192x64 antialiased, the node on uint8 (as for the kitti2bag bag above)
    assert got["metrics"]["abs_rel"] == pytest.approx(ref["metrics"]["abs_rel"], rel=0.005)


def test_clear_errors_for_missing_truncated_bags_and_bad_checkpoints(work, bag_eval, tmp_path):
    res = bag_eval(tmp_path / "nope.bag", "--checkpoint", work / "tiny.pt")
    assert res.returncode == 2 and "bag not found" in res.stderr
    good = work / "syn_mcap"
    cut = tmp_path / "cut_mcap"
    cut.mkdir()
    for f in good.iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".mcap" else data)
    res = bag_eval(cut, "--checkpoint", work / "tiny.pt")
    assert res.returncode == 2 and "diffsql-bag-eval: error" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = bag_eval(good, "--checkpoint", bad, "--startup-timeout", "60")
    assert res.returncode == 2
    assert "depth node did not start" in res.stderr and "corrupt or not a torch file" in res.stderr


def test_ros1_camera_info_becomes_the_ros2_message(work, kitti_raw):
    bag = work / "kitti.bag"
    if not bag.exists():
        kitti_drive_to_bag(kitti_raw, "2011_09_26", "0001", bag, frames=[0, 1, 50])
    with open_bag(bag) as reader:
        topics = choose_topics(reader)
        index = index_camera(reader, topics)
    assert [f.image for f in index] == [None] * 3  # the index holds no pixels
    frames = list(stream_images(bag, topics, index))
    info = to_rclpy(frames[0].info, INFO_TYPE)
    calib = load_kitti_calib(kitti_raw / "2011_09_26", 2)
    np.testing.assert_allclose(np.reshape(info.p, (3, 4)), calib.P_rect)
    assert (info.width, info.height) == calib.image_size
    assert info.header.frame_id == "camera_color_left"
    img = to_rclpy(frames[0].image, frames[0].image_type)
    assert (img.width, img.height, len(img.data)) == (1242, 375, img.step * 375)
    assert img.header.stamp.sec * 10**9 + img.header.stamp.nanosec == frames[0].stamp_ns


def test_extrinsic_from_the_command_line():
    T = parse_extrinsic("1 2 3 0 0 0.7071067811865476 0.7071067811865476")  # 90 deg about z
    np.testing.assert_allclose(T[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-9)
    np.testing.assert_allclose(T[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(parse_extrinsic(" ".join(map(str, np.eye(4)[:3].ravel()))), np.eye(4))
    with pytest.raises(ValueError, match="7, 12 or 16"):
        parse_extrinsic("1 2 3")


def test_replay_settings_come_from_the_command_line_and_stay_fixed(work):

    from diffsql_ros.bag_eval import default_params_file, parse_args
    from diffsql_ros.replay import ReplaySettings

    bag, ckpt = str(work / "syn_mcap"), str(work / "tiny.pt")
    given = ReplaySettings.from_args(parse_args([bag, "--checkpoint", ckpt, "--rate", "2", "--timeout", "5",
                                                 "--node-param", "device:=cpu", "--node-param", "tf32:=false",
                                                 "--report", "out", "--max-frames", "3"]))
    assert (given.rate, given.timeout, given.max_frames) == (2.0, 5.0, 3)
    assert given.node_params == ("device:=cpu", "tf32:=false") and given.report == pathlib.Path("out")
    assert given.bag == pathlib.Path(bag) and given.checkpoint == pathlib.Path(ckpt)
    default = ReplaySettings.from_args(parse_args([bag, "--checkpoint", ckpt]))
    assert default.rate is None and default.report is None and default.node_params == ()
    assert default.params_file == default_params_file() and default.params_file.is_file()
    # the command line's defaults are the settings' own
    assert default == ReplaySettings(pathlib.Path(bag), pathlib.Path(ckpt), default_params_file())
    assert (default.timeout, default.first_timeout, default.startup_timeout, default.lidar_tolerance) == (
        20.0, 120.0, 120.0, 0.05)
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.rate = None  # a replay cannot change what it was asked to do
