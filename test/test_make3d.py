"""Make3D pairs on the real sample files, the protocol's crops and an end-to-end evaluation."""
import json

import numpy as np
import pytest
import scipy.io

from diffsql_model.data import make3d as m3d
from diffsql_model.data.ground_truth import GroundTruthError
from diffsql_model.eval import cli
from diffsql_model.eval import protocols


def test_pairs_found_by_name(make3d_dir):
    pairs = m3d.find_make3d_pairs(make3d_dir)
    assert len(pairs) == 7
    assert [p.name for p in pairs] == sorted(p.name for p in pairs)
    for p in pairs:
        assert p.image_path.name == f"img-{p.name}.jpg"
        assert p.depth_path.name == f"depth_sph_corr-{p.name}.mat"


def test_depth_is_channel_3_in_metres(make3d_dir):
    for pair in m3d.find_make3d_pairs(make3d_dir):
        depth = m3d.load_make3d_depth(pair.depth_path)
        grid = scipy.io.loadmat(str(pair.depth_path))["Position3DGrid"]
        assert depth.shape == (55, 305) and depth.dtype == np.float32
        assert np.array_equal(depth, grid[:, :, 3].astype(np.float32))
        # channel 3 is the range of the laser point: the norm of its x, y, z (channels 0-2)
        assert np.allclose(depth, np.linalg.norm(grid[:, :, :3], axis=-1), atol=0.05)
        assert depth.min() > 0 and depth.max() <= 80.0 + 1e-6  # capped at 80 m
    assert depth.max() > 70  # outdoor scenes reach the cap


def test_image_and_crops(make3d_dir):
    pair = m3d.find_make3d_pairs(make3d_dir)[0]
    image = m3d.load_make3d_image(pair.image_path)
    assert image.shape == (2272, 1704, 3) and image.dtype == np.uint8
    # (2272 - 852) / 2 = 710, (2272 + 852) / 2 = 1562; (55 - 21) / 2 = 17 (int), (55 + 21) / 2 = 38
    assert m3d.image_crop_rows(2272, 1704) == (710, 1562)
    assert m3d.gt_crop_rows(55) == (17, 38)
    cropped = m3d.crop_make3d_image(image)
    assert cropped.shape == (852, 1704, 3) and np.array_equal(cropped, image[710:1562])
    depth = m3d.load_make3d_depth(pair.depth_path)
    assert np.array_equal(m3d.crop_make3d_depth(depth), depth[17:38])


def test_bad_mat_files(tmp_path):
    (tmp_path / "junk.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(GroundTruthError, match="corrupt"):
        m3d.load_make3d_depth(tmp_path / "junk.mat")
    scipy.io.savemat(str(tmp_path / "other.mat"), {"Depth": np.ones((55, 305))})
    with pytest.raises(GroundTruthError, match="Position3DGrid"):
        m3d.load_make3d_depth(tmp_path / "other.mat")
    scipy.io.savemat(str(tmp_path / "small.mat"), {"Position3DGrid": np.ones((10, 10, 4))})
    with pytest.raises(GroundTruthError, match="shape"):
        m3d.load_make3d_depth(tmp_path / "small.mat")


@pytest.fixture
def make3d_copy(make3d_dir, tmp_path):
    """The sample folder as symlinks, with the laser grid of the first pair left out."""
    folder = tmp_path / "make3d"
    folder.mkdir()
    for f in make3d_dir.iterdir():
        (folder / f.name).symlink_to(f)
    first = m3d.find_make3d_pairs(folder)[0]
    first.depth_path.unlink()
    return folder, first.name


def cropped_gts(make3d_dir):
    return [m3d.crop_make3d_depth(m3d.load_make3d_depth(p.depth_path)) for p in m3d.find_make3d_pairs(make3d_dir)]


def test_make3d_eval_end_to_end(make3d_dir, make3d_copy, tmp_path, capsys):
    folder, missing_name = make3d_copy
    gts = cropped_gts(make3d_dir)
    preds = tmp_path / "p.npz"
    np.savez(preds, depth=np.stack(gts) * 3.0)  # 21 x 305 maps, a global factor off
    out = tmp_path / "r.json"
    rc = cli.main(["--protocol", "make3d", "--data", str(folder), "--predictions", str(preds), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_frames_listed"] == 7 and res["n_frames"] == 6
    assert [m["frame"] for m in res["missing"]] == [missing_name]
    assert res["metrics"]["abs_rel"] == pytest.approx(0, abs=1e-6) and res["metrics"]["log10"] == pytest.approx(0, abs=1e-6)
    assert res["scaling"]["median"] == pytest.approx(1 / 3)
    assert res["gt_depth"] == "make3d_laser_range"
    assert res["settings"]["max_depth"] == 70.0 and res["settings"]["garg_crop"] is False
    printed = capsys.readouterr().out
    assert "log10" in printed and missing_name in printed


def test_make3d_fixed_scale_hand_values(make3d_dir, tmp_path):
    gts = cropped_gts(make3d_dir)
    preds = tmp_path / "p.npz"
    np.savez(preds, depth=np.stack(gts) / 1.5)
    out = tmp_path / "r.json"
    assert cli.main(["--protocol", "make3d", "--data", str(make3d_dir), "--predictions", str(preds),
                     "--scaling", "fixed", "--scale", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert m["abs_rel"] == pytest.approx(1 / 3, abs=1e-5)  # |gt - gt/1.5| / gt
    assert m["log10"] == pytest.approx(0.1760913, abs=1e-5)  # log10 1.5
    assert (m["a1"], m["a2"], m["a3"]) == (0.0, 1.0, 1.0)
    # only gt < 70 m counts: pixels per frame equal the count of the cropped grid below 70
    assert [f["n_valid"] for f in res["per_frame"]] == [int(((g > 1e-3) & (g < 70)).sum()) for g in gts]


def test_make3d_frames_follow_split_names(make3d_dir):
    names = [p.name for p in m3d.find_make3d_pairs(make3d_dir)][::-1][:2]
    frames = protocols.make3d_frames(make3d_dir, names)
    assert [f.key for f in frames] == names
    assert frames[0].load_gt().shape == (21, 305)
