"""ImageFolderDataset on a real KITTI image folder (drive 0023, frames 0-6)."""
import pathlib

import numpy as np
import pytest
import torch

from diffsql_model.data.calib import load_kitti_calib
from diffsql_model.data.folder import ImageFolderDataset
from diffsql_model.data.kitti import KittiRawDataset

DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"


def test_folder_samples_equal_kitti_samples(kitti_raw):
    folder = kitti_raw / DRIVE / "image_02" / "data"
    K = load_kitti_calib(kitti_raw / "2011_09_26", 2).K
    ds = ImageFolderDataset(folder, K, 192, 640, (0, -1, 1), is_train=False)
    assert len(ds) == 5 and ds.skipped == [str(folder / "0000000000.png"), str(folder / "0000000006.png")]
    kd = KittiRawDataset(kitti_raw, [f"{DRIVE} {i} l" for i in range(1, 6)], 192, 640, is_train=False)
    for n in (0, 4):
        a, b = kd[n], ds[n]
        for key in [("color", 0), ("color", -1), ("color", 1), "K", "inv_K"]:
            assert torch.equal(a[key], b[key]), key
    assert ds[0]["name"] == "0000000001.png"


def test_fx_fy_cx_cy_and_longer_window(kitti_raw):
    folder = kitti_raw / DRIVE / "image_02" / "data"
    ds = ImageFolderDataset(folder, None, 96, 320, (0, -2, -1, 1, 2), fx=700.0, fy=690.0, cx=620.0, cy=180.0,
                            is_train=False)
    assert len(ds) == 3 and ds[0]["index"] == 2
    assert [pathlib.Path(f).name for f in ds.skipped] == [f"{i:010d}.png" for i in (0, 1, 5, 6)]
    K = ds[0]["K"].double().numpy()
    assert np.allclose(K[:3, :3], [[700 * 320 / 1242, 0, 620.5 * 320 / 1242 - 0.5],
                                   [0, 690 * 96 / 375, 180.5 * 96 / 375 - 0.5], [0, 0, 1]])
    assert torch.equal(ds[0][("color", 2)], ds[2][("color", 0)])


def test_bad_folders_are_clear_errors(tmp_path, kitti_raw):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nope", np.eye(3))
    with pytest.raises(FileNotFoundError, match="no .png"):
        ImageFolderDataset(tmp_path, np.eye(3))
    with pytest.raises(ValueError, match="give K"):
        ImageFolderDataset(tmp_path, None, fx=1.0)
    (tmp_path / "a.png").write_bytes((kitti_raw / DRIVE / "image_02/data/0000000000.png").read_bytes())
    with pytest.raises(ValueError, match="too few"):
        ImageFolderDataset(tmp_path, np.eye(3))
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "c.png").write_bytes((kitti_raw / DRIVE / "image_02/data/0000000001.png").read_bytes())
    ds = ImageFolderDataset(tmp_path, np.eye(3), 96, 320, is_train=False)
    with pytest.raises(Exception, match="b.png is corrupt"):
        ds[0]
