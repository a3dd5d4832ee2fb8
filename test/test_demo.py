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

    from diffsql_model.checkpoint import build_model, load_checkpoint, save_checkpoint
    from diffsql_model.config import ModelConfig
    from diffsql_ros.demo import evaluate_synthetic

    info = json.loads((out / "train" / "demo_done.json").read_text())
    cfg = ModelConfig.from_dict(load_checkpoint(info["checkpoint"])["model_config"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "untrained.pt", {"model_config": cfg.to_dict(),
                                                       "model": build_model(cfg).state_dict()})
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
