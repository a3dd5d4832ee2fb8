"""diffsql_model.colormaps: the index arithmetic by hand, OpenCV's tables, invalid pixels black."""
import cv2
import numpy as np
import pytest

from diffsql_model.colormaps import (apply_colormap, colorize_inverse_depth, colorize_percentiles, colormap_table,
                                     depth_picture_bgr, range_index, uncertainty_picture_bgr)


def _cv2_rgb(index, cv2_map):
    """OpenCV's own colour of uint8 `index` in map `cv2_map`, as RGB."""
    return cv2.applyColorMap(np.array([[index]], np.uint8), cv2_map)[0, 0, ::-1]


@pytest.mark.parametrize("name, cv2_map", [("turbo", cv2.COLORMAP_TURBO), ("magma", cv2.COLORMAP_MAGMA),
                                           ("viridis", cv2.COLORMAP_VIRIDIS)])
def test_tables_are_opencvs_in_rgb_or_bgr(name, cv2_map):
    rgb, bgr = colormap_table(name), colormap_table(name, bgr=True)
    assert rgb.shape == (256, 1, 3) and not rgb.flags.writeable
    for i in (0, 77, 255):
        np.testing.assert_array_equal(rgb[i, 0], _cv2_rgb(i, cv2_map))
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])
    idx = np.array([[0, 10], [200, 255]], np.uint8)
    np.testing.assert_array_equal(apply_colormap(idx, name, bgr=True), cv2.applyColorMap(idx, cv2_map))
    np.testing.assert_array_equal(apply_colormap(idx[0], name), rgb[[0, 10], 0])  # 1-D indices too
    assert colormap_table(name, black_zero=True)[0].tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError):
        colormap_table("jet")


def test_range_index_by_hand():
    np.testing.assert_array_equal(range_index(np.array([-1.0, 0.0, 5.0, 10.0, 11.0]), 0.0, 10.0),
                                  [0, 0, 127, 255, 255])  # 0.5 * 255 = 127.5 -> 127
    assert range_index(np.array([3.0]), 3.0, 3.0).tolist() == [0]  # zero span: the low end


def test_inverse_depth_index_by_hand():
    # index = 1 + 254 (1/d - 1/max) / (1/min - 1/max): min -> 255, max -> 1, NaN -> 0 (black);
    # with min 1 and max 4, depth 2 is 1 + 254 * 0.25 / 0.75 = 85.67 -> 85. Outside: clipped.
    depth = np.array([[1.0, 4.0, 2.0, np.nan, 0.5, 100.0]], np.float32)
    col = colorize_inverse_depth(depth, 1.0, 4.0)
    turbo = colormap_table("turbo")[:, 0]
    np.testing.assert_array_equal(col[0], turbo[[255, 1, 85, 0, 255, 1]] * [[1], [1], [1], [0], [1], [1]])
    np.testing.assert_array_equal(colorize_inverse_depth(depth, 1.0, 4.0, bgr=True), col[..., ::-1])


def test_depth_picture_is_the_node_map_in_bgr_with_zero_depth_black_too():
    depth = np.array([[2.0, 30.0, 0.0, -1.0, np.nan]], np.float32)
    pic = depth_picture_bgr(depth, 1.0, 80.0)
    np.testing.assert_array_equal(pic[0, :2], colorize_inverse_depth(depth[:, :2], 1.0, 80.0)[0, :, ::-1])
    assert not pic[0, 2:].any()
    assert not depth_picture_bgr(np.zeros((2, 3), np.float32)).any()


def test_percentile_map_spans_the_1st_to_99th_percentile_and_blacks_out_nan():
    values = np.linspace(0, 99, 100, dtype=np.float32).reshape(10, 10)
    values[0, 0] = np.nan  # finite 1..99: 1st percentile 1 + 0.01 * 98 = 1.98, 99th 98.02
    out = colorize_percentiles(values, "magma")
    magma = colormap_table("magma")[:, 0]
    assert out[0, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(out[0, 1], magma[0])  # value 1 -> (1 - lo) / span * 255 = 0.03 -> 0
    np.testing.assert_array_equal(out[9, 9], magma[255])  # above the 99th percentile: clipped
    np.testing.assert_array_equal(out[3, 0], magma[74])  # (30 - 1.98) / 96.04 * 255 = 74.4
    fixed = colorize_percentiles(values, "magma", lo=0.0, hi=50.0)
    np.testing.assert_array_equal(fixed[2, 5], magma[127])  # 25 of 0..50


def test_uncertainty_picture_is_viridis_bgr_from_zero_to_the_given_top():
    unc = np.array([[0.0, 1.0, 2.0, np.inf]], np.float32)
    pic = uncertainty_picture_bgr(unc, max_value=2.0)
    viridis = colormap_table("viridis", bgr=True)[:, 0]
    np.testing.assert_array_equal(pic[0], [viridis[0], viridis[127], viridis[255], [0, 0, 0]])


def test_tensorboard_grid_tiles_are_input_inverse_depth_magma_and_uncertainty_viridis():
    torch = pytest.importorskip("torch")
    from diffsql_model.train.validate import image_grid

    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 80, (2, 1, 6, 8)).astype(np.float32)
    unc = rng.uniform(0, 2, (2, 1, 6, 8)).astype(np.float32)
    image = torch.rand(2, 3, 6, 8)
    grid = image_grid(image, torch.from_numpy(depth), torch.from_numpy(unc))
    assert grid.shape == (3, 2 + 2 * (6 + 2), 2 + 3 * (8 + 2))  # 2 rows x 3 tiles, padding 2

    def tile(row, col):
        return grid[:, 2 + row * 8:8 + row * 8, 2 + col * 10:10 + col * 10]

    torch.testing.assert_close(tile(1, 0), image[1])
    for col, maps, name in ((1, 1.0 / depth, "magma"), (2, unc, "viridis")):
        expected = colorize_percentiles(maps[1, 0], name).transpose(2, 0, 1) / 255
        np.testing.assert_allclose(tile(1, col).numpy(), expected, atol=1e-7)
    mask = torch.from_numpy((rng.random((2, 1, 6, 8)) > 0.5).astype(np.float32))
    grid = image_grid(image, torch.from_numpy(depth), torch.from_numpy(unc), automask=mask)
    assert grid.shape == (3, 2 + 2 * (6 + 2), 2 + 4 * (8 + 2))  # a fourth tile per row
    torch.testing.assert_close(grid[:, 10:16, 32:40], mask[1].expand(3, -1, -1))  # row 1, tile 3
