"""`make demo` end to end (slow: trains for the config's CPU budget): sample, training, evaluation,
bag replays through the real node, report; a second run reuses sample and checkpoint."""
import html.parser
import json
import os
import pathlib
import subprocess
import sys
import time

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
    assert len(page.images) == 16  # 2 frames per bag x (input, depth, uncertainty, point cloud)
    for src in page.images:
        assert (out / src).is_file(), src
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
