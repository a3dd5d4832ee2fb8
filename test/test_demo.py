"""`make demo` end to end (slow: trains for the config's CPU budget): sample, training, evaluation,
bag replays through the real node, report; a second run reuses sample and checkpoint."""
import html.parser
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _png_of(src):
    import base64

    import cv2
    import numpy as np

    data = base64.b64decode(src.split(",", 1)[1])
    assert src.startswith("data:image/png;base64,") and data[:8] == b"\x89PNG\r\n\x1a\n"
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _demo(out, shared, env):
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "diffsql_ros.demo", "--shared", str(shared), "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, time.monotonic() - t


def _untrained_abs_rel(out, tmp_path) -> float:
    import torch

    from diffsql_model.checkpoint import load_checkpoint, save_checkpoint
    from diffsql_model.depth_net import DiffSQLDepth
    from diffsql_model.config import ModelConfig
    from diffsql_ros.demo import evaluate_synthetic

    info = json.loads((out / "train" / "demo_done.json").read_text())
    cfg = ModelConfig.from_dict(load_checkpoint(info["checkpoint"])["model_config"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "untrained.pt", {"model_config": cfg.to_dict(),
                                                       "model": DiffSQLDepth.from_config(cfg).state_dict()})
    sample = json.loads((out / "sample" / "sample.json").read_text())
    (tmp_path / "untrained").mkdir()
    return evaluate_synthetic(ckpt, sample, tmp_path / "untrained")["metrics"]["abs_rel"]


@pytest.mark.slow
@pytest.mark.ros
def test_demo_end_to_end_and_rerun(tmp_path, shared_dir):
    pytest.importorskip("rclpy")
    env = {k: v for k, v in os.environ.items() if k != "CHECKPOINT"}
    out = tmp_path / "demo_out"
    stdout, seconds = _demo(out, shared_dir, env)
    print(f"demo took {seconds:.0f} s")
    offline = json.loads((out / "eval_synthetic.json").read_text())
    syn = json.loads((out / "replay_synthetic" / "bag_eval.json").read_text())
    kitti = json.loads((out / "replay_kitti" / "bag_eval.json").read_text())
    assert offline["n_frames"] == 20 and offline["n_missing"] == 0
    # trained, not random: better than the same architecture untrained on the same frames (the
    # number reached depends on how many steps the CPU budget allowed on a loaded machine)
    untrained = _untrained_abs_rel(out, tmp_path)
    print(f"held-out synthetic AbsRel {offline['metrics']['abs_rel']:.3f} (untrained {untrained:.3f})")
    assert offline["metrics"]["abs_rel"] < 0.8 * untrained
    assert (syn["frames_played"], syn["frames_evaluated"], syn["frames_dropped"]) == (20, 20, 0)
    # 12 real KITTI frames, 2 of them (50, 100) without a velodyne scan
    assert (kitti["frames_played"], kitti["frames_evaluated"], kitti["frames_without_lidar"]) == (12, 10, 2)
    page = _Page()
    page.feed((out / "report.html").read_text())
    files = [s for s in page.images if not s.startswith("data:")]
    assert len(files) == 16  # 2 frames per bag x (input, depth, uncertainty, point cloud)
    for src in files:
        assert (out / src).is_file(), src
    plots = [_png_of(s) for s in page.images if s.startswith("data:")]
    assert len(plots) == 4 and all(p.shape == (320, 560, 3) for p in plots)  # learning, sparsification, scale, latency
    for r in (offline, syn, kitti):
        assert set(r["uncertainty"]) >= {"std", "std_over_depth"} and r["scale_stability"]["n_frames"] >= 10
    ch = json.loads((out / "replay_camera_height" / "bag_eval.json").read_text())
    assert ch["scale_mode"] == "camera_height" and ch["scale_stability"]["n_frames"] == 20
    text = " ".join(page.text)
    assert f"{offline['metrics']['abs_rel']:.3f}" in text
    assert "never saw a real image" in text  # the domain-gap note next to the KITTI rows
    # second run: sample and checkpoint reused, same offline numbers
    stdout2, seconds2 = _demo(out, shared_dir, env)
    assert "sample: reusing" in stdout2 and "reusing the checkpoint" in stdout2
    again = json.loads((out / "eval_synthetic.json").read_text())
    assert again["metrics"] == pytest.approx(offline["metrics"], rel=1e-6)
    print(f"rerun took {seconds2:.0f} s")


def test_sample_builder_small(tmp_path, shared_dir):
    """diffsql-make-sample with small settings: split files, both bags readable, reuse, errors."""
    from diffsql_model.data import bag_reader
    from diffsql_model.data.sample_cli import SampleSettings, main, make_sample

    s = SampleSettings(width=64, height=32, train_drives=2, train_frames=4, val_frames=2, test_frames=3,
                       bag_format="sqlite3")
    logs = []
    m = make_sample(tmp_path / "s", shared_dir, s, log=logs.append)
    syn = m["synthetic"]
    # 2 drives x 2 inner frames x (l, r) training lines; validation and test frames as asked
    assert syn["frames"] == {"train": 8, "val": 2, "test": 3}
    assert pathlib.Path(syn["test_split"]).read_text().split("\n")[0] == f"2011_01_01/{syn['test_drive']} 0 l"
    with bag_reader.open_bag(syn["test_bag"]) as r:
        counts = {c.topic: c.msgcount for c in r.connections}
    assert counts == {"/camera/left/image_raw": 3, "/camera/left/camera_info": 3, "/lidar/points": 3,
                      "/tf_static": 1}
    frames = list(bag_reader.read_camera_stream(syn["test_bag"]))
    assert frames[0].rgb.shape == (32, 64, 3) and frames[1].stamp_ns - frames[0].stamp_ns == 100_000_000
    with bag_reader.open_bag(m["kitti"]["bag"]) as r:
        counts = {c.topic: c.msgcount for c in r.connections}
    # the 12 real frames of drive 0001; 10 of them have a velodyne scan
    assert counts["/kitti/camera_color_left/image_raw"] == 12 and counts["/kitti/velo/pointcloud"] == 10
    # a second call with the same settings reuses everything; other settings rebuild
    t = time.monotonic()
    assert make_sample(tmp_path / "s", shared_dir, s, log=logs.append) == m
    assert time.monotonic() - t < 2 and logs[-1].startswith("sample: reusing")
    assert main(["--out", str(tmp_path / "x"), "--shared", str(tmp_path / "nowhere"), "--train-frames", "3",
                 "--train-drives", "1", "--test-frames", "2", "--width", "64", "--height", "32"]) == 2


def _replay_summary(result: dict, scale_mode: str, latencies: list) -> dict:
    """The parts of a diffsql-bag-eval summary the demo report reads, around a real protocol result."""
    return {"metrics": result["metrics"], "frames_evaluated": result["n_frames"], "frames_played": result["n_frames"],
            "frames_dropped": 0, "frames_without_lidar": 0, "latencies_ms": latencies,
            "latency_ms": {"p50": float(np.median(latencies))}, "throughput_fps": 5.0, "pictures": [],
            "scale_mode": scale_mode, "scale_stability": result["scale_stability"], "per_frame": result["per_frame"],
            "uncertainty": result.get("uncertainty")}


def test_demo_report_has_the_four_plots_and_the_trust_tables(tmp_path):
    """write_demo_report on real protocol results of a small sequence (depth maps whose error the
    uncertainty knows): the learning curve, sparsification, scale-ratio and latency plots are in the
    page as PNGs, and the AUSE / stability numbers in its tables."""
    from diffsql_model.eval import protocols
    from diffsql_ros.demo import write_demo_report

    rng = np.random.default_rng(0)
    gts = [rng.uniform(5, 60, (24, 32)).astype(np.float32) for _ in range(6)]
    noise = [rng.lognormal(0, 0.2, (24, 32)).astype(np.float32) for _ in range(6)]
    samples = [(i, g) for i, g in enumerate(gts)]

    def predict(i):  # scale drifting 2 % a frame; uncertainty = the true error, plus noise
        depth = gts[i] * noise[i] * (1 + 0.02 * i)
        return depth, np.abs(depth - gts[i] * (1 + 0.02 * i)) + rng.uniform(0, 1, depth.shape).astype(np.float32)

    offline = protocols.evaluate_bag_samples(samples, predict)
    replays = {"synthetic": _replay_summary(offline, "relative", [110.0, 120.0, 150.0, 115.0]),
               "kitti": _replay_summary(offline, "relative", [300.0, 310.0, 290.0]),
               "camera_height": _replay_summary(offline, "camera_height", [120.0])}
    train_info = {"checkpoint": "run/best.pt", "curve": {"points": [(50, 0.3), (100, 0.2), (150, 0.21)],
                                                         "seconds_per_step": 0.4, "train_seconds": 60}}
    sample = {"synthetic": {"frames": {"train": 8, "val": 2, "test": 6}}}
    page = write_demo_report(tmp_path, sample, train_info, offline, replays, {"total": 1.0})
    parsed = _Page()
    parsed.feed(page.read_text())
    pngs = [_png_of(s) for s in parsed.images]
    assert len(pngs) == 4 and all(p.shape == (320, 560, 3) for p in pngs)
    text = " ".join(parsed.text)
    unc = offline["uncertainty"]["std"]["abs_rel"]
    assert f"{unc['ause']:.3f}" in text and f"{unc['aurg']:.3f}" in text
    cv = offline["scale_stability"]["ratio_cv"]
    assert 0.02 < cv < 0.1 and f"{100 * cv:.2f}" in text and "camera_height" in text
    assert unc["aurg"] > 0.05  # the uncertainty knows the error: far better than random removal
