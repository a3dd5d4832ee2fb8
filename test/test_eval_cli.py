"""diffsql-eval end to end on the real KITTI drive-0001 frames (eigen, eigen_benchmark, bag)."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from diffsql_model.data import ground_truth
from diffsql_model.data.calib import load_kitti_calib
from diffsql_model.eval import cli
from diffsql_model.eval import metrics, protocols

DRIVE = "2011_09_26/2011_09_26_drive_0001_sync"
EIGEN_FRAMES = (5, 25, 50, 45, 65, 85)  # 50 has an image and improved GT but no velodyne scan


@pytest.fixture(scope="module")
def kitti_shared_root(kitti_raw):
    """The KITTI root holding raw/ and depth/ side by side."""
    return kitti_raw.parent


def write_split(tmp_path, frames, side="l", padded=True):
    """Eigen lists pad frames to 10 digits, eigen_benchmark lists do not: both are read."""
    path = tmp_path / "split.txt"
    path.write_text("".join(f"{DRIVE} {f'{f:010d}' if padded else f} {side}\n" for f in frames))
    return path


def velo_gt(kitti_raw, frame, depth="velo_x"):
    calib = load_kitti_calib(kitti_raw / "2011_09_26", 2)
    scan = ground_truth.read_velodyne_bin(ground_truth.kitti_velodyne_path(kitti_raw, DRIVE, frame))
    return ground_truth.velodyne_depth_map(scan, calib, depth=depth)


def eigen_preds(kitti_raw, factor, depth="velo_x"):
    """GT-derived predictions, one per split line; frame 50 (no scan) gets a constant map."""
    return np.stack([velo_gt(kitti_raw, f, depth) * factor if f != 50 else np.full((375, 1242), 10.0, np.float32)
                     for f in EIGEN_FRAMES])


def run(tmp_path, *args):
    out = tmp_path / "result.json"
    rc = cli.main([*map(str, args), "--json", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_eigen_median_scaling_recovers_gt(kitti_shared_root, kitti_raw, tmp_path, capsys):
    split = write_split(tmp_path, EIGEN_FRAMES)
    np.savez(tmp_path / "p.npz", depth=eigen_preds(kitti_raw, 2.0))
    rc, res = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                  "--predictions", tmp_path / "p.npz")
    assert rc == 0
    assert res["gt_depth"] == "velo_x" and res["n_frames_listed"] == 6 and res["n_frames"] == 5
    assert res["missing"] == [{"frame": f"{DRIVE} 50 l", "reason": res["missing"][0]["reason"]}]
    assert "velodyne scan not found" in res["missing"][0]["reason"]
    m = res["metrics"]
    assert m["abs_rel"] == pytest.approx(0, abs=1e-6) and m["rmse"] == pytest.approx(0, abs=1e-4)
    assert (m["a1"], m["a2"], m["a3"]) == (1.0, 1.0, 1.0)
    assert res["scaling"]["median"] == pytest.approx(0.5) and res["scaling"]["std"] == pytest.approx(0, abs=1e-7)
    # every valid pixel: inside the Garg crop and 1e-3 < gt < 80
    crop = metrics.garg_crop_mask(375, 1242)
    expected = [int(((g > 1e-3) & (g < 80) & crop).sum()) for g in (velo_gt(kitti_raw, f) for f in EIGEN_FRAMES if f != 50)]
    assert [f["n_valid"] for f in res["per_frame"]] == expected
    printed = capsys.readouterr().out
    assert "5 of 6 frames" in printed and "missing" in printed and "AbsRel" in printed


def test_eigen_fixed_scale_hand_values(kitti_shared_root, kitti_raw, tmp_path):
    split = write_split(tmp_path, EIGEN_FRAMES)
    np.savez(tmp_path / "p.npz", depth=eigen_preds(kitti_raw, 1 / 1.5))
    rc, res = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                  "--predictions", tmp_path / "p.npz", "--scaling", "fixed", "--scale", "1")
    assert rc == 0 and res["scaling"] == {"mode": "fixed", "scale": 1.0}
    m = res["metrics"]
    # pred = gt / 1.5: |gt - p| / gt = 1/3, log ratio = ln 1.5, ratio 1.5 in (1.25, 1.5625)
    assert m["abs_rel"] == pytest.approx(1 / 3, abs=1e-5)
    assert m["rmse_log"] == pytest.approx(math.log(1.5), abs=1e-5)
    assert (m["a1"], m["a2"], m["a3"]) == (0.0, 1.0, 1.0)
    # (gt - gt/1.5)^2 / gt = gt / 9: SqRel per frame = mean valid gt / 9
    crop = metrics.garg_crop_mask(375, 1242)
    for row, f in zip(res["per_frame"], (f for f in EIGEN_FRAMES if f != 50)):
        g = velo_gt(kitti_raw, f)
        assert row["sq_rel"] == pytest.approx(g[(g > 1e-3) & (g < 80) & crop].mean() / 9, rel=1e-4)


def test_eigen_low_res_prediction_is_resized(kitti_raw, tmp_path):
    # raw-only --data; constant 7 m maps at 96 x 320: after resizing and median scaling the
    # prediction equals median(valid gt) everywhere
    split = write_split(tmp_path, (5, 25))
    np.savez(tmp_path / "p.npz", depth=np.full((2, 1, 96, 320), 7.0, np.float32))
    rc, res = run(tmp_path, "--protocol", "eigen", "--data", kitti_raw, "--split-file", split,
                  "--predictions", tmp_path / "p.npz")
    assert rc == 0 and res["n_frames"] == 2
    crop = metrics.garg_crop_mask(375, 1242)
    for row, f in zip(res["per_frame"], (5, 25)):
        g = velo_gt(kitti_raw, f)
        g = g[(g > 1e-3) & (g < 80) & crop]
        med = np.median(g)
        assert row["ratio"] == pytest.approx(med / 7.0, rel=1e-5)
        assert row["abs_rel"] == pytest.approx(np.mean(np.abs(g - med) / g), rel=1e-4)
        assert row["a1"] == pytest.approx(np.mean(np.maximum(g / med, med / g) < 1.25), abs=1e-6)


def test_eigen_cam_z_option_is_reported(kitti_shared_root, kitti_raw, tmp_path):
    split = write_split(tmp_path, (5, 85))
    np.savez(tmp_path / "p.npz", depth=np.stack([velo_gt(kitti_raw, f, "cam_z") for f in (5, 85)]))
    args = ["--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
            "--predictions", tmp_path / "p.npz", "--scaling", "fixed"]
    rc, res = run(tmp_path, *args, "--gt-depth", "cam_z")
    assert rc == 0 and res["gt_depth"] == "cam_z" and res["metrics"]["abs_rel"] == pytest.approx(0, abs=1e-6)
    rc, res = run(tmp_path, *args)  # the same maps against the standard velo_x ground truth
    assert res["gt_depth"] == "velo_x"
    assert 0.005 < res["metrics"]["abs_rel"] < 0.03  # ~0.28 m on depths of ~5-80 m


def test_eigen_benchmark_improved_gt(kitti_shared_root, kitti_depth, tmp_path):
    frames = (5, 50, 3, 100)  # frame 3 has no improved ground truth
    split = write_split(tmp_path, frames, padded=False)
    base = kitti_depth / "train" / DRIVE.split("/")[1] / "proj_depth" / "groundtruth" / "image_02"
    preds = [ground_truth.read_depth_png(base / f"{f:010d}.png") * 2 if f != 3 else np.ones((375, 1242), np.float32)
             for f in frames]
    np.savez(tmp_path / "p.npz", depth=np.stack(preds))
    rc, res = run(tmp_path, "--protocol", "eigen_benchmark", "--data", kitti_shared_root, "--split-file", split,
                  "--predictions", tmp_path / "p.npz")
    assert rc == 0 and res["n_frames"] == 3 and res["n_frames_listed"] == 4
    assert res["gt_depth"].startswith("kitti_depth_png")
    assert [m["frame"] for m in res["missing"]] == [f"{DRIVE} 3 l"]
    assert "improved ground truth" in res["missing"][0]["reason"]
    assert res["metrics"]["abs_rel"] == pytest.approx(0, abs=1e-6) and res["scaling"]["median"] == pytest.approx(0.5)
    # the depth folder itself is accepted as --data too
    rc, res2 = run(tmp_path, "--protocol", "eigen_benchmark", "--data", kitti_depth, "--split-file", split,
                   "--predictions", tmp_path / "p.npz")
    assert rc == 0 and res2["n_frames"] == 3


def test_object_array_predictions_of_mixed_sizes(kitti_shared_root, kitti_raw, tmp_path):
    split = write_split(tmp_path, (5, 25))
    maps = np.empty(2, dtype=object)
    maps[0] = velo_gt(kitti_raw, 5) * 3
    maps[1] = np.full((192, 640), 4.0, np.float32)
    np.savez(tmp_path / "p.npz", depth=maps)
    rc, res = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                  "--predictions", tmp_path / "p.npz")
    assert rc == 0 and res["per_frame"][0]["abs_rel"] == pytest.approx(0, abs=1e-6)
    assert res["per_frame"][1]["ratio"] > 0


def test_errors_are_clear(kitti_shared_root, kitti_raw, tmp_path, capsys):
    split = write_split(tmp_path, (5, 25))
    np.savez(tmp_path / "three.npz", depth=np.ones((3, 10, 10), np.float32))
    base = ["--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split]
    assert cli.main([*map(str, base), "--predictions", str(tmp_path / "three.npz")]) == 2
    assert "3 depth maps" in capsys.readouterr().err
    np.savez(tmp_path / "nodepth.npz", disp=np.ones((2, 10, 10)))
    assert cli.main([*map(str, base), "--predictions", str(tmp_path / "nodepth.npz")]) == 2
    assert "no array 'depth'" in capsys.readouterr().err
    (tmp_path / "cut.npz").write_bytes((tmp_path / "three.npz").read_bytes()[:100])
    assert cli.main([*map(str, base), "--predictions", str(tmp_path / "cut.npz")]) == 2
    assert "truncated" in capsys.readouterr().err
    np.savez(tmp_path / "nan.npz", depth=np.full((2, 375, 1242), np.nan, np.float32))
    assert cli.main([*map(str, base), "--predictions", str(tmp_path / "nan.npz")]) == 2
    assert "NaN" in capsys.readouterr().err
    # missing calibration: a raw folder holding the drive but not the day's calibration files
    raw = tmp_path / "raw" / "2011_09_26"
    raw.mkdir(parents=True)
    (raw / DRIVE.split("/")[1]).symlink_to(kitti_raw / DRIVE)
    np.savez(tmp_path / "two.npz", depth=np.ones((2, 10, 10), np.float32))
    assert cli.main(["--protocol", "eigen", "--data", str(tmp_path / "raw"), "--split-file", str(split),
                     "--predictions", str(tmp_path / "two.npz")]) == 2
    assert "calib_cam_to_cam.txt" in capsys.readouterr().err
    (tmp_path / "bad_split.txt").write_text(f"{DRIVE} 5\n")
    assert cli.main([*map(str, base[:4]), "--split-file", str(tmp_path / "bad_split.txt"),
                     "--predictions", str(tmp_path / "two.npz")]) == 2
    assert "bad_split.txt:1" in capsys.readouterr().err


def test_console_script_subprocess(kitti_shared_root, kitti_raw, tmp_path):
    split = write_split(tmp_path, (5, 50))
    np.savez(tmp_path / "p.npz", depth=np.stack([velo_gt(kitti_raw, 5) * 2, np.ones((375, 1242), np.float32)]))
    out = tmp_path / "r.json"
    script = pathlib.Path(sys.executable).parent / "diffsql-eval"  # the installed console script
    proc = subprocess.run([str(script), "--protocol", "eigen", "--data",
                           str(kitti_shared_root), "--split-file", str(split), "--predictions",
                           str(tmp_path / "p.npz"), "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 frames" in proc.stdout and "0000000050.bin" in proc.stdout
    header, row = [ln for ln in proc.stdout.splitlines() if "AbsRel" in ln or ln.strip().startswith("0.000")][:2]
    assert header.split() == ["AbsRel", "SqRel", "RMSE", "RMSElog", "d1", "d2", "d3"]
    assert [float(v) for v in row.split()] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert json.loads(out.read_text())["n_frames"] == 1


def test_bag_samples_protocol(kitti_raw):
    images = {f: np.full((375, 1242, 3), f, np.uint8) for f in (5, 25)}  # tagged so predict_fn knows the frame
    gts = {f: velo_gt(kitti_raw, f, "cam_z") for f in (5, 25)}
    samples = [(images[5], gts[5], "t=0.5"), (images[25], None, "t=2.5"), (images[25], gts[25])]
    res = protocols.evaluate_bag_samples(samples, lambda img: gts[int(img[0, 0, 0])] * 5.0)
    assert res["protocol"] == "bag" and res["n_frames_listed"] == 3 and res["n_frames"] == 2
    assert res["missing"][0]["frame"] == "t=2.5" and res["per_frame"][1]["frame"] == "sample 2"
    assert res["metrics"]["abs_rel"] == pytest.approx(0, abs=1e-6) and res["scaling"]["median"] == pytest.approx(0.2)
    assert res["settings"]["garg_crop"] is False  # a robot camera: no KITTI crop


def test_checkpoint_inference(kitti_shared_root, tmp_path):
    """--checkpoint: a small real DiffSQL network (lite preset, 64 x 192 input) run on the images."""
    import torch

    from diffsql_model.checkpoint import save_checkpoint
    from diffsql_model.depth_net import DiffSQLDepth
    from diffsql_model.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset("lite")
    cfg.height, cfg.width = 64, 192
    model = DiffSQLDepth.from_config(cfg)
    save_checkpoint(tmp_path / "m.pt", {"model_config": cfg.to_dict(), "model": model.state_dict()})
    split = write_split(tmp_path, (5, 50, 25))
    rc, res = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                  "--checkpoint", tmp_path / "m.pt", "--device", "cpu", "--batch-size", "2")
    assert rc == 0 and res["n_frames"] == 2 and res["checkpoint"].endswith("m.pt")
    assert [m["frame"] for m in res["missing"]] == [f"{DRIVE} 50 l"]
    m = res["metrics"]
    assert all(np.isfinite(v) for v in m.values()) and 0 < m["abs_rel"] < 10 and 0 <= m["a1"] <= 1
    # the same network run by hand on the training resize gives the same numbers via --predictions
    from diffsql_model.data.network_input import to_tensor_resized
    from diffsql_model.data.images import load_rgb

    model.eval()
    maps = []
    for f in (5, 50, 25):
        rgb = load_rgb(kitti_shared_root / "raw" / DRIVE / "image_02" / "data" / f"{f:010d}.png")
        with torch.inference_mode():
            maps.append(model(to_tensor_resized(rgb, 64, 192)[None])["depth"][0, 0].numpy())
    np.savez(tmp_path / "p.npz", depth=np.stack(maps))
    rc, res2 = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                   "--predictions", tmp_path / "p.npz")
    assert rc == 0 and res2["metrics"] == pytest.approx(m, rel=1e-5)
    # --runtime onnxruntime (the exported graph, run in batches of up to 2): the same scores
    rc, res3 = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                   "--checkpoint", tmp_path / "m.pt", "--device", "cpu", "--batch-size", "2",
                   "--runtime", "onnxruntime")
    assert rc == 0 and res3["metrics"] == pytest.approx(m, rel=1e-4)
    # a corrupt checkpoint is a clear error, not a traceback
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    rc, _ = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                "--checkpoint", tmp_path / "bad.pt", "--device", "cpu")
    assert rc == 2


def test_bag_protocol_cli(kitti_raw, tmp_path):
    """A real bag written from drive 0001 (frames 5 and 50; 50 has no scan), evaluated through
    BagDataset's pairing. Its LiDAR maps use ROS 0-based pixels (camera z): our devkit cam_z map
    shifted by one pixel right and down."""
    from diffsql_model.data.bag_writer import kitti_drive_to_bag

    bag = kitti_drive_to_bag(kitti_raw, "2011_09_26", "0001", tmp_path / "d.bag", frames=[5, 50])
    shifted = np.zeros((375, 1242), np.float32)
    shifted[1:, 1:] = velo_gt(kitti_raw, 5, "cam_z")[:-1, :-1]
    np.savez(tmp_path / "p.npz", depth=np.stack([shifted * 2, np.ones((375, 1242), np.float32)]))
    rc, res = run(tmp_path, "--protocol", "bag", "--data", bag, "--image-topic", "/kitti/camera_color_left/image_raw",
                  "--predictions", tmp_path / "p.npz")
    assert rc == 0 and res["n_frames_listed"] == 2 and res["n_frames"] == 1
    assert res["missing"][0]["reason"].startswith("no LiDAR scan")
    assert res["lidar_topic"] == "/kitti/velo/pointcloud" and res["gt_depth"] == "lidar_cam_z"
    # same points, same nearest-wins: the maps agree wherever both have a point (the bag's map
    # also keeps row/column 0, which the devkit convention drops: ~15 pixels of ~17k)
    assert res["metrics"]["a1"] > 0.99 and res["metrics"]["abs_rel"] < 0.01
    assert res["scaling"]["median"] == pytest.approx(0.5, rel=5e-3)


def test_truncated_scan_stops_the_run_with_its_name(kitti_raw, tmp_path, capsys):
    day = tmp_path / "raw" / "2011_09_26"
    scans = day / DRIVE.split("/")[1] / "velodyne_points" / "data"
    scans.mkdir(parents=True)
    for name in ("calib_cam_to_cam.txt", "calib_velo_to_cam.txt"):
        (day / name).symlink_to(kitti_raw / "2011_09_26" / name)
    full = ground_truth.kitti_velodyne_path(kitti_raw, DRIVE, 5).read_bytes()
    (scans / "0000000005.bin").write_bytes(full[: len(full) // 2 + 5])
    split = write_split(tmp_path, (5,))
    np.savez(tmp_path / "p.npz", depth=np.ones((1, 375, 1242), np.float32))
    assert cli.main(["--protocol", "eigen", "--data", str(tmp_path / "raw"), "--split-file", str(split),
                     "--predictions", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err
    assert "0000000005.bin" in err and "truncated" in err


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory):
    """A random-init lite network at 64 x 192 and its checkpoint."""
    import torch

    from diffsql_model.checkpoint import save_checkpoint
    from diffsql_model.depth_net import DiffSQLDepth
    from diffsql_model.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset("lite", height=64, width=192)
    model = DiffSQLDepth.from_config(cfg).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("unc") / "m.pt",
                           {"model_config": cfg.to_dict(), "model": model.state_dict()})
    return model, path


SEQUENCE = (5, 25, 45, 50, 65)  # drive 0001 in order: improved ground truth for all of them
IMAGE = "/kitti/camera_color_left/image_raw"


def test_uncertainty_and_scale_stability_eigen_benchmark(kitti_shared_root, kitti_depth, tiny_net, tmp_path, capsys):
    """--uncertainty with --checkpoint: the JSON's AUSE/AURG are the sparsification functions'
    on the network's own depth and uncertainty (run here by hand), the frames a sequence."""
    import torch

    from diffsql_model.data.images import load_rgb
    from diffsql_model.data.network_input import to_tensor_resized
    from diffsql_model.eval import scale_stability, sparsification
    from diffsql_model.inference import depth_maps

    model, ckpt = tiny_net
    split = write_split(tmp_path, SEQUENCE, padded=False)
    # batch size 1, as the hand run below: batched convolutions differ in the last bits, which
    # reorders near-ties of a random network's uncertainty
    rc, res = run(tmp_path, "--protocol", "eigen_benchmark", "--data", kitti_shared_root, "--split-file", split,
                  "--checkpoint", ckpt, "--device", "cpu", "--batch-size", "1", "--uncertainty")
    assert rc == 0 and res["n_frames"] == 5 and res["sequence"] is True
    printed = capsys.readouterr().out
    assert "AbsRel AUSE" in printed and "std/depth" in printed and "scale stability" in printed
    crop = metrics.garg_crop_mask(375, 1242)
    maps, frames = [], []
    for f, row in zip(SEQUENCE, res["per_frame"]):
        rgb = load_rgb(kitti_shared_root / "raw" / DRIVE / "image_02" / "data" / f"{f:010d}.png")
        out = depth_maps(model, to_tensor_resized(rgb, 64, 192)[None], uncertainty=True)[0].numpy()
        maps.append(out)
        gt = ground_truth.read_depth_png(
            kitti_depth / "train" / DRIVE.split("/")[1] / "proj_depth/groundtruth/image_02" / f"{f:010d}.png")
        valid = (gt > 1e-3) & (gt < 80) & crop
        d, u = (metrics.resize_prediction(m, 375, 1242)[valid].astype(np.float64) for m in out)
        ratio = np.median(gt[valid]) / np.median(d)
        frame = sparsification.frame_sparsification(gt[valid].astype(np.float64), np.clip(d * ratio, 1e-3, 80), u)
        frames.append(frame)
        assert row["needed_scale"] == pytest.approx(row["ratio"]) and row["ratio"] == pytest.approx(ratio, rel=1e-5)
        for rank in sparsification.RANKINGS:
            for m in sparsification.METRICS:
                for k in ("ause", "aurg"):
                    assert row["uncertainty"][rank][m][k] == pytest.approx(frame[rank][m][k], rel=1e-4, abs=1e-6)
    mean = sparsification.mean_over_frames(frames)
    unc = res["uncertainty"]
    assert unc["n_frames"] == 5 and len(unc["fractions"]) == 50 and "Poggi" in unc["convention"]
    for rank in sparsification.RANKINGS:
        for m in sparsification.METRICS:
            got, ref = unc[rank][m], mean[rank][m]
            assert got["ause"] == pytest.approx(ref["ause"], rel=1e-4, abs=1e-6) and got["ause"] >= 0
            assert got["aurg"] == pytest.approx(ref["aurg"], rel=1e-4, abs=1e-6)
            assert len(got["curve"]) == len(got["oracle"]) == len(got["random"]) == 50
            assert got["random"][0] == pytest.approx(res["metrics"][m])  # flat at the full-set value
    st = res["scale_stability"]
    assert st == pytest.approx(scale_stability.stability([r["ratio"] for r in res["per_frame"]]))
    # the same maps through --predictions (arrays 'depth' and 'uncertainty') give the same numbers
    np.savez(tmp_path / "p.npz", depth=np.stack([m[0] for m in maps]), uncertainty=np.stack([m[1] for m in maps]))
    rc, res2 = run(tmp_path, "--protocol", "eigen_benchmark", "--data", kitti_shared_root, "--split-file", split,
                   "--predictions", tmp_path / "p.npz", "--uncertainty")
    assert rc == 0 and res2["uncertainty"]["std"]["abs_rel"]["aurg"] == pytest.approx(unc["std"]["abs_rel"]["aurg"],
                                                                                     rel=1e-5)
    # --uncertainty without the array is a clear error; without the flag the array is not needed
    np.savez(tmp_path / "d.npz", depth=np.stack([m[0] for m in maps]))
    rc, _ = run(tmp_path, "--protocol", "eigen_benchmark", "--data", kitti_shared_root, "--split-file", split,
                "--predictions", tmp_path / "d.npz", "--uncertainty")
    assert rc == 2 and "no array 'uncertainty'" in capsys.readouterr().err
    rc, res3 = run(tmp_path, "--protocol", "eigen_benchmark", "--data", kitti_shared_root, "--split-file", split,
                   "--predictions", tmp_path / "d.npz")
    assert rc == 0 and "uncertainty" not in res3 and "uncertainty" not in res3["per_frame"][0]


def test_uncertainty_eigen_not_a_sequence(kitti_shared_root, tiny_net, tmp_path):
    split = write_split(tmp_path, (25, 5))  # frames out of order: no stability
    rc, res = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                  "--checkpoint", tiny_net[1], "--device", "cpu", "--uncertainty")
    assert rc == 0 and res["sequence"] is False and "scale_stability" not in res
    for rank in ("std", "std_over_depth"):
        for m in ("abs_rel", "rmse"):
            v = res["uncertainty"][rank][m]
            assert np.isfinite(v["ause"]) and v["ause"] >= 0 and np.isfinite(v["aurg"])


def test_uncertainty_bag_protocol_ranked_by_the_true_error(kitti_raw, tmp_path):
    """Bag of real frames 0-2 and 5: a constant depth map, ranked once by its true AbsRel error
    (computed here on the devkit map; the bag's map differs on ~15 of ~17k pixels) and once
    reversed. The bag frames are a sequence: the stability is that of the needed scales."""
    from diffsql_model.data.bag_writer import kitti_drive_to_bag
    from diffsql_model.eval import scale_stability

    frames = (0, 1, 2, 5)
    bag = kitti_drive_to_bag(kitti_raw, "2011_09_26", "0001", tmp_path / "d.bag", frames=list(frames))
    depth, unc = [], []
    for f in frames:
        g = np.zeros((375, 1242), np.float32)
        g[1:, 1:] = velo_gt(kitti_raw, f, "cam_z")[:-1, :-1]  # the bag's ROS 0-based pixels
        m = np.median(g[(g > 1e-3) & (g < 80)])
        depth.append(np.full((375, 1242), 10.0, np.float32))
        unc.append(np.where(g > 0, np.abs(m - g) / np.maximum(g, 1e-3), 0).astype(np.float32))
    results = {}
    for name, sign in (("oracle", 1), ("reversed", -1)):
        np.savez(tmp_path / f"{name}.npz", depth=np.stack(depth), uncertainty=sign * np.stack(unc))
        rc, results[name] = run(tmp_path, "--protocol", "bag", "--data", bag, "--image-topic", IMAGE, "--predictions",
                                tmp_path / f"{name}.npz", "--uncertainty")
        assert rc == 0 and results[name]["n_frames"] == 4
    good, bad = results["oracle"]["uncertainty"]["std"]["abs_rel"], results["reversed"]["uncertainty"]["std"]["abs_rel"]
    full = results["oracle"]["metrics"]["abs_rel"]
    assert good["ause"] < 0.01 * full and good["aurg"] > 0.3 * full  # ranks (almost) like the oracle
    assert bad["aurg"] < -0.3 * full and bad["ause"] > good["ause"] + 0.6 * full
    st = results["oracle"]["scale_stability"]
    ratios = [r["needed_scale"] for r in results["oracle"]["per_frame"]]
    assert st == pytest.approx(scale_stability.stability(ratios)) and st["n_frames"] == 4
    assert ratios == pytest.approx([r["ratio"] for r in results["oracle"]["per_frame"]])


def test_no_garg_crop_scores_every_valid_pixel(kitti_shared_root, kitti_raw, tmp_path):
    split = write_split(tmp_path, (5,))
    np.savez(tmp_path / "p.npz", depth=np.full((1, 96, 320), 7.0, np.float32))
    rc, res = run(tmp_path, "--protocol", "eigen", "--data", kitti_shared_root, "--split-file", split,
                  "--predictions", tmp_path / "p.npz", "--no-garg-crop")
    g = velo_gt(kitti_raw, 5)
    assert rc == 0 and res["settings"]["garg_crop"] is False
    assert res["per_frame"][0]["n_valid"] == int(((g > 1e-3) & (g < 80)).sum()) > int(
        ((g > 1e-3) & (g < 80) & metrics.garg_crop_mask(375, 1242)).sum())
