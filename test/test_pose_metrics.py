"""Relative pose error against ground truth (eval.pose_metrics), hand-computed, and the
validation set that pairs synthetic drives' frames with their true poses."""
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from diffsql_model.data.synthetic_kitti import make_synthetic_kitti, read_poses
from diffsql_model.eval.pose_metrics import relative_pose_errors
from diffsql_model.pose_net import PoseNet
from diffsql_model.eval.pose_eval import PoseValidationSet, validate_pose


def T(rotvec_deg=(0, 0, 0), t=(0, 0, 0)):
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix()
    out[:3, 3] = t
    return out


def test_errors_match_a_hand_computed_case():
    gt = [T(t=(0, 0, 1)), T(t=(0, 0, 1)), T(t=(0, 0, 0.5)), T()]
    pred = [T((0, 10, 0), (0, 0, 2)),   # 10 deg off, same direction, twice as long
            T(t=(0, 1, 1)),             # 45 deg off in direction, sqrt(2) as long
            T(t=(0, 0, 1)),             # exact up to a factor 2
            T((30, 0, 0), (1, 0, 0))]   # no true translation: rotation term only
    e = relative_pose_errors(np.stack(pred), np.stack(gt))
    assert e["pairs"] == 4
    assert e["rotation_deg"] == pytest.approx((10 + 0 + 0 + 30) / 4)
    assert e["translation_dir_deg"] == pytest.approx((0 + 45 + 0) / 3)
    assert e["translation_scale"] == pytest.approx(2.0)  # median of (2, sqrt 2, 2)
    assert e["translation_mag_err"] == pytest.approx((0 + (1 - math.sqrt(2) / 2) + 0) / 3)
    exact = relative_pose_errors(np.stack(gt[:3]) * 1, np.stack(gt[:3]))
    assert exact["rotation_deg"] == pytest.approx(0, abs=1e-6) and exact["translation_mag_err"] == 0
    with pytest.raises(ValueError, match="4 x 4"):
        relative_pose_errors(np.eye(3)[None], np.eye(3)[None])


def test_pose_validation_pairs_frames_with_their_true_motion(tmp_path):
    data = make_synthetic_kitti(tmp_path, train_seeds=(), val_seed=4, num_frames=4, width=96,
                                height=32, val_frames=5, world="varied")
    pose_set = PoseValidationSet(data["root"], data["val_split"], height=32, width=96)
    assert len(pose_set) == 3  # frames 1-3 of 0-4 have both neighbours
    folder = pose_set.dataset.lines[0][0]
    poses = read_poses(pathlib.Path(data["root"]) / folder / "poses.txt")
    np.testing.assert_allclose(pose_set.true_pose(0, -1), np.linalg.inv(poses[0]) @ poses[1], atol=1e-9)
    np.testing.assert_allclose(pose_set.true_pose(0, 1), np.linalg.inv(poses[2]) @ poses[1], atol=1e-9)
    torch.manual_seed(0)
    metrics = validate_pose(PoseNet(18), pose_set, torch.device("cpu"))
    assert metrics["pose_pairs"] == 6
    assert 0 <= metrics["pose_rotation_deg"] < 180 and 0 <= metrics["pose_translation_dir_deg"] <= 180



def test_monocular_training_reports_pose_error_and_mean_depth(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffsql_model.train.config import TrainConfig
    from diffsql_model.train.trainer import Trainer

    data = make_synthetic_kitti(tmp_path / "syn", train_seeds=(0,), val_seed=9, num_frames=5,
                                width=192, height=64, val_frames=4, world="varied")
    cfg = TrainConfig.from_dict({
        "model": {"preset": "lite", "overrides": {"height": 64, "width": 192}},
        "data": {"kind": "kitti", **data, "frame_ids": [0, -1, 1], "val_crop": "none"},
        "optim": {"batch_size": 2, "max_steps": 2},
        "runtime": {"device": "cpu", "num_workers": 0, "val_every": 0, "log_every": 1,
                    "image_every": 0, "progress": False},
    })
    summary = Trainer(cfg, tmp_path / "out").run()
    val = summary["val"]
    assert val["pose_pairs"] == 4  # validation frames 1 and 2 of 0-3, each with two sources
    for key in ("pose_rotation_deg", "pose_translation_dir_deg", "pose_translation_mag_err"):
        assert math.isfinite(val[key]) and val[key] >= 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["val"]["pose_pairs"] == 4
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    mean_depth = [e.value for e in acc.Scalars("train/mean_depth")]
    assert len(mean_depth) == 2 and all(0.1 <= v <= 80 for v in mean_depth)
    assert [e.value for e in acc.Scalars("val/pose_pairs")] == [4.0]


def test_frame_pair_conventions_on_a_turning_swaying_drive(tmp_path):
    """The trainer's conventions (T maps target points into source f; f = -1 past, +1 future) on
    a drive that sways and turns: the true depth and poses explain the neighbours, the same poses
    swapped between the sources or left at identity do not."""
    from diffsql_model.data.kitti import KittiRawDataset
    from diffsql_model.data.synthetic import render_drive
    from diffsql_model.data.synthetic_kitti import write_kitti_layout
    from diffsql_model.data.synthetic_worlds import drive_config
    from diffsql_model.losses import LossConfig, SelfSupervisedLoss

    # Rendered at twice the training size, as the learning benchmark does (less aliasing).
    cfg = drive_config("varied", 3, width=384, height=128, num_frames=5, yaw_amplitude=0.05, yaw_period=6.0)
    drive = render_drive(cfg)
    write_kitti_layout(drive, tmp_path, "2011_01_01", "2011_01_01_drive_0001_sync")
    sample = KittiRawDataset(tmp_path / "raw", ["2011_01_01/2011_01_01_drive_0001_sync 2 l"], height=64,
                             width=192, frame_ids=[0, -1, 1], is_train=False)[0]
    yaw_step = np.degrees(Rotation.from_matrix(drive.relative_pose(2, 3)[:3, :3]).magnitude())
    assert yaw_step > 0.5  # the camera really turns between frames
    depth = torch.from_numpy(np.where(drive.depth[2] > 0, drive.depth[2], 500.0)).float()[None, None]
    depth = torch.nn.functional.interpolate(depth, (64, 192), mode="nearest")
    sources = {f: sample[("color", f)][None] for f in (-1, 1)}
    loss = SelfSupervisedLoss(LossConfig(depth_normalization="off"))

    def photometric(poses):
        poses = {f: torch.tensor(p, dtype=torch.float32)[None] for f, p in poses.items()}
        return float(loss(sample[("color", 0)][None], sources, depth, sample["K"][None],
                          sample["inv_K"][None], poses)["photometric"])

    true = {f: drive.relative_pose(2, 2 + f) for f in (-1, 1)}
    right = photometric(true)
    assert right < 0.5 * photometric({f: np.eye(4) for f in (-1, 1)})
    assert right < 0.6 * photometric({-1: true[1], 1: true[-1]})
    assert right < 0.65 * photometric({f: np.linalg.inv(p) for f, p in true.items()})


def test_diffsql_eval_pose_grades_the_checkpoints_posenet(tmp_path, capsys):
    """`diffsql-eval --pose` on a synthetic drive: the checkpoint's PoseNet, graded against
    poses.txt, gives validate_pose's numbers; a checkpoint without PoseNet is a clear error."""
    from diffsql_model.checkpoint import save_checkpoint
    from diffsql_model.depth_net import DiffSQLDepth
    from diffsql_model.eval.cli import main
    from diffsql_model.presets import get_preset

    data = make_synthetic_kitti(tmp_path / "w", train_seeds=(), val_seed=4, num_frames=4, width=192,
                                height=64, val_frames=5, world="varied")
    torch.manual_seed(0)
    cfg = get_preset("lite", height=64, width=192)
    pose_net = PoseNet(18).eval()
    state = {"model_config": cfg.to_dict(), "model": DiffSQLDepth(cfg).state_dict()}
    save_checkpoint(tmp_path / "m.pt", {**state, "pose_net": pose_net.state_dict(),
                                        "train_config": {"model": {"pose_layers": 18}}})
    save_checkpoint(tmp_path / "s.pt", state)
    argv = ["--protocol", "eigen_benchmark", "--data", data["root"], "--split-file", data["val_split"],
            "--no-garg-crop", "--device", "cpu", "--pose"]
    assert main(argv + ["--checkpoint", str(tmp_path / "m.pt"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    got = json.loads((tmp_path / "r.json").read_text())["pose"]
    want = validate_pose(pose_net, PoseValidationSet(data["root"], data["val_split"], 64, 192), torch.device("cpu"))
    assert got["pairs"] == want["pose_pairs"] == 6
    for k in ("rotation_deg", "translation_dir_deg", "translation_mag_err", "translation_scale"):
        assert got[k] == pytest.approx(want[f"pose_{k}"], rel=1e-6), k
    assert "pose (6 frame pairs against poses.txt)" in out
    assert main(argv + ["--checkpoint", str(tmp_path / "s.pt")]) == 2
    assert "no PoseNet in this checkpoint" in capsys.readouterr().err
    assert main(["--protocol", "make3d", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "m.pt"), "--pose"]) == 2
    assert "--pose needs" in capsys.readouterr().err
