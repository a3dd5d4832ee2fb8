"""KittiRawDataset on the real KITTI raw sample (drive 0001, frames 1-4 have both neighbours)."""
import datetime

import numpy as np
import pytest
import torch
from PIL import Image

from diffsql_model.data.augment import AugmentConfig, AugmentDraw, build_sample, draw_augmentation
from diffsql_model.data.kitti import KittiDataError, KittiRawDataset, parse_split_lines

DRIVE = "2011_09_26/2011_09_26_drive_0001_sync"
LINES = [f"{DRIVE} {i} l" for i in range(1, 5)]
FX, CX, CY = 721.5377, 609.5593, 172.854  # P_rect_02 of 2011_09_26, image 1242 x 375


def make(kitti_raw, lines=LINES, **kw):
    kw.setdefault("is_train", False)
    return KittiRawDataset(kitti_raw, lines, 192, 640, **kw)


def test_shapes_and_K_from_real_calibration(kitti_raw):
    ds = make(kitti_raw, stereo=True)
    assert len(ds) == 4
    s = ds[0]
    for fid in (0, -1, 1, "s"):
        assert s[("color", fid)].shape == (3, 192, 640)
        assert s[("color_aug", fid)].dtype == torch.float32
        assert 0 <= s[("color", fid)].min() and s[("color", fid)].max() <= 1
    K = s["K"].double().numpy()
    assert K[0, 0] == pytest.approx(FX * 640 / 1242, rel=1e-6)  # 371.807
    assert K[1, 1] == pytest.approx(FX * 192 / 375, rel=1e-6)  # 369.427
    assert K[0, 2] == pytest.approx((CX + 0.5) * 640 / 1242 - 0.5, rel=1e-6)  # pixel centres on integers
    assert K[1, 2] == pytest.approx((CY + 0.5) * 192 / 375 - 0.5, rel=1e-6)
    assert torch.allclose(s["inv_K"] @ s["K"], torch.eye(4), atol=1e-5)
    # real baseline: (44.85728 + 339.5242) / 721.5377 in x (plus 2.7 mm in y): 0.5327 m, left -> right = -x
    assert s["stereo_T"][0, 3].item() == pytest.approx(-0.53272, abs=2e-5)
    # un-jittered colour is the PNG, resized
    png = np.asarray(Image.open(kitti_raw / DRIVE / "image_02/data/0000000001.png").convert("RGB"))
    ref = torch.nn.functional.interpolate(torch.from_numpy(png.copy()).permute(2, 0, 1)[None].float() / 255,
                                          size=(192, 640), mode="bilinear", antialias=True, align_corners=False)[0]
    assert torch.allclose(s[("color", 0)], ref.clamp(0, 1), atol=1e-5)
    right = ds[0][("color", "s")]
    assert not torch.equal(right, s[("color", 0)])
    # neighbours are the adjacent frames
    assert torch.equal(ds[1][("color", -1)], s[("color", 0)])
    assert torch.equal(ds[0][("color", 1)], ds[1][("color", 0)])


def test_calibration_is_read_once_per_date(kitti_raw, monkeypatch):
    from diffsql_model.data import calib as calib_mod
    from diffsql_model.data import kitti as kitti_mod

    reads = []
    real = calib_mod.load_kitti_calib

    def counted(date_dir, cam):
        reads.append(cam)
        return real(date_dir, cam)

    monkeypatch.setattr(calib_mod, "load_kitti_calib", counted)  # used by stereo_baseline
    monkeypatch.setattr(kitti_mod, "load_kitti_calib", counted)
    ds = make(kitti_raw, stereo=True)
    baselines = [ds[i]["stereo_T"][0, 3].item() for i in range(4)]
    assert baselines == pytest.approx([-0.53272] * 4, abs=2e-5)
    assert sorted(reads) == [2, 2, 3]  # K of image_02 once, the baseline's two cameras once


def test_stamp_from_timestamps_file(kitti_raw):
    s = make(kitti_raw)[0]  # frame 1: "2011-09-26 13:02:26.064785152"
    t = datetime.datetime(2011, 9, 26, 13, 2, 26, tzinfo=datetime.timezone.utc).timestamp()
    assert s["stamp"] == int(t) * 10**9 + 64785152
    assert s["name"] == f"{DRIVE} 0000000001 l"


def test_normalised_intrinsics_without_calibration(kitti_raw):
    K = make(kitti_raw, use_calib=False)[0]["K"]
    assert K[0, 0].item() == pytest.approx(0.58 * 640)
    assert K[1, 1].item() == pytest.approx(1.92 * 192)
    assert K[0, 2].item() == pytest.approx(320) and K[1, 2].item() == pytest.approx(96)


def test_flip_flips_images_cx_stereo_sign_and_depth(kitti_raw):
    plain = make(kitti_raw, stereo=True, load_depth=True)[2]
    flipped = make(kitti_raw, stereo=True, load_depth=True, is_train=True,
                   augment=AugmentConfig(flip_prob=1.0, jitter_prob=0.0))[2]
    assert flipped["do_flip"] is True
    for fid in (0, -1, 1, "s"):
        assert torch.equal(flipped[("color", fid)], plain[("color", fid)].flip(-1))
        assert torch.equal(flipped[("color_aug", fid)], flipped[("color", fid)])
    assert flipped["K"][0, 2].item() == pytest.approx(639 - plain["K"][0, 2].item(), abs=1e-4)
    assert flipped["K"][0, 0].item() == pytest.approx(plain["K"][0, 0].item())
    assert flipped["stereo_T"][0, 3].item() == pytest.approx(-plain["stereo_T"][0, 3].item())
    assert plain["depth_gt"].shape == (1, 375, 1242) and (plain["depth_gt"] > 0).sum() > 10000
    assert torch.equal(flipped["depth_gt"], plain["depth_gt"].flip(-1))


def test_K_follows_the_image_through_resize_and_flip():
    # a bright column on the principal point's column: after the resize (and flip) its intensity
    # centroid must sit at the new K's cx (pixel centres on integers, as geometry.warp samples)
    u0 = 61
    rgb = np.zeros((8, 200, 3), np.uint8)
    rgb[:, u0] = 255
    K = np.array([[100.0, 0, u0], [0, 100, 4], [0, 0, 1]])
    for flip in (False, True):
        s = build_sample({0: rgb}, K, 8, 100, AugmentDraw(flip=flip))
        profile = s[("color", 0)][0, 4].double()
        centroid = (profile * torch.arange(100)).sum() / profile.sum()
        assert s["K"][0, 2].item() == pytest.approx(centroid.item(), abs=0.02)
        assert centroid.item() == pytest.approx(68.75 if flip else 30.25, abs=0.02)  # (61.5 / 2 - 0.5)


def test_brightness_jitter_is_hand_computable_and_colors_untouched(kitti_raw):
    plain = make(kitti_raw)[0]
    fixed = AugmentConfig(flip_prob=0.0, jitter_prob=1.0, brightness=(1.1, 1.1), contrast=(1.0, 1.0),
                          saturation=(1.0, 1.0), hue=(0.0, 0.0))
    s = make(kitti_raw, is_train=True, augment=fixed)[0]
    for fid in (0, -1, 1):
        assert torch.equal(s[("color", fid)], plain[("color", fid)])  # the loss's images stay un-jittered
        assert torch.allclose(s[("color_aug", fid)], (plain[("color", fid)] * 1.1).clamp(0, 1), atol=1e-6)


def test_random_jitter_is_the_same_for_all_frames(kitti_raw):
    cfg = AugmentConfig(flip_prob=0.0, jitter_prob=1.0)
    ds = make(kitti_raw, is_train=True, augment=cfg)
    torch.manual_seed(7)
    s = ds[1]
    torch.manual_seed(7)
    draw = draw_augmentation(cfg, True)  # the same draw the sample used
    b, c, sat, h = draw.jitter[1:]
    assert b != 1.0 and c != 1.0 and sat != 1.0 and h != 0.0
    for fid in (0, -1, 1):
        assert torch.allclose(s[("color_aug", fid)], draw.apply_color(s[("color", fid)]).clamp(0, 1), atol=1e-6)
        assert not torch.allclose(s[("color_aug", fid)], s[("color", fid)], atol=1e-3)
    # a different draw would not reproduce it
    torch.manual_seed(8)
    other = draw_augmentation(cfg, True)
    assert not torch.allclose(s[("color_aug", 0)], other.apply_color(s[("color", 0)]), atol=1e-3)


def test_missing_neighbour_error_names_the_file_or_is_dropped_and_listed(kitti_raw):
    bad = [f"{DRIVE} 0 l", f"{DRIVE} 1 l"]  # frame 0 has no frame -1
    with pytest.raises(KittiDataError, match=r"image_02/data/-000000001\.png"):
        make(kitti_raw, bad)
    ds = make(kitti_raw, bad, on_missing="drop")
    assert len(ds) == 1 and ds.lines == [(DRIVE, 1, "l")]
    assert ds.dropped[0][0] == f"{DRIVE} 0 l" and ds.dropped[0][1][0].endswith("-000000001.png")
    with pytest.raises(KittiDataError, match="image_03/data/0000000024.png"):  # frame 24 absent
        make(kitti_raw, [f"{DRIVE} 25 r"], frame_ids=(0, -1))
    with pytest.raises(KittiDataError, match="velodyne_points/data/0000000050.bin"):  # image, no scan
        make(kitti_raw, [f"{DRIVE} 50 l"], frame_ids=(0,), load_depth=True)
    assert len(make(kitti_raw, [f"{DRIVE} 50 l"], frame_ids=(0,))) == 1


def test_split_file_parsing(splits_dir, tmp_path):
    lines = parse_split_lines((splits_dir / "eigen_zhou/train_files.txt").read_text().splitlines())
    assert len(lines) == 39810
    assert lines[0] == ("2011_09_26/2011_09_26_drive_0022_sync", 473, "r")
    with pytest.raises(KittiDataError, match="split:2"):
        parse_split_lines([f"{DRIVE} 1 l", f"{DRIVE} one l"])
    with pytest.raises(KittiDataError, match="split file not found"):
        KittiRawDataset(splits_dir.parent / "data/kitti/raw", tmp_path / "nope.txt")


def test_dataloader_batches(kitti_raw):
    ds = make(kitti_raw, is_train=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[("color_aug", 0)].shape == (2, 3, 192, 640)
    assert batch["K"].shape == (2, 4, 4) and batch["stamp"].shape == (2,)
