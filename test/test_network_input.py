"""The one owner of frame -> network input (data/network_input.py): the float training resize
(numpy and torch entry points) and the CPU estimator's uint8 resize agree, on hand-computed
stripes and on real KITTI frames."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conftest import KITTI_RAW
from diffsql_model.data.network_input import check_rgb, resize_to_unit, resize_to_unit_uint8, to_tensor_resized

FRAMES = [KITTI_RAW / "2011_09_26/2011_09_26_drive_0023_sync/image_02/data/0000000000.png",
          KITTI_RAW / "2011_09_26/2011_09_26_drive_0001_sync/image_02/data/0000000005.png"]
SIZES = [(96, 320), (192, 640), (64, 192), (384, 1280)]  # the last one upsamples 375 rows


def uint8_input(rgb, size):
    return resize_to_unit_uint8(rgb, torch.empty((1, 3, *size), dtype=torch.float32))


def test_stripes_halved_by_hand():
    """Columns 0, 255, 0, 255, ... halved: antialiased bilinear at scale 2 weighs four columns
    1/8, 3/8, 3/8, 1/8, so inside the image each output is exactly 0.5; at the borders the one
    column outside drops out and the rest renormalise: 3/8 / 7/8 = 3/7 left, 4/8 / 7/8 = 4/7 right."""
    frame = np.zeros((8, 16, 3), np.uint8)
    frame[:, 1::2] = 255
    expected = torch.tensor([3 / 7] + [0.5] * 6 + [4 / 7])
    float_path = to_tensor_resized(frame, 4, 8)
    assert float_path.shape == (3, 4, 8) and float_path.dtype == torch.float32
    torch.testing.assert_close(float_path, expected.expand(3, 4, 8), rtol=0, atol=1e-6)
    # uint8 rounds to whole grey levels: 109.3 -> 109, 127.5 -> 128, 145.7 -> 146
    grey = uint8_input(frame, (4, 8))[0] * 255
    torch.testing.assert_close(grey, torch.tensor([109.0] + [128.0] * 6 + [146.0]).expand(3, 4, 8),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("path", FRAMES, ids=["drive0023", "drive0001"])
def test_uint8_resize_within_one_grey_level_of_the_training_resize(path):
    full = cv2.imread(str(path))[..., ::-1]  # a strided (flipped) view, as frames on ROS messages
    assert full.shape == (375, 1242, 3)
    for size in SIZES:
        reference = to_tensor_resized(full, *size)
        diff = (uint8_input(full, size)[0] - reference).abs()
        assert float(diff.max()) <= 1.0 / 255 + 1e-6, size
        assert float(diff.mean()) < 0.3 / 255, size
        # The CUDA entry point is the same float resize, here on a CPU tensor: bit for bit.
        assert torch.equal(resize_to_unit(torch.from_numpy(full.copy()), size)[0], reference), size


def test_network_sized_frames_are_only_scaled():
    full = cv2.imread(str(FRAMES[0]))[..., ::-1]
    small = cv2.resize(full, (320, 96), interpolation=cv2.INTER_AREA)
    expected = torch.from_numpy(small.astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(to_tensor_resized(small, 96, 320), expected, rtol=0, atol=0)
    planes = [np.empty((96, 320), np.uint8) for _ in range(3)]
    out = torch.empty((1, 3, 96, 320))
    assert resize_to_unit_uint8(small, out, planes) is out
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-7)  # x * (1/255) against x / 255
    np.testing.assert_array_equal(planes[1], small[..., 1])  # the split went into the caller's planes


def test_read_only_frames_and_bad_input():
    frame = cv2.imread(str(FRAMES[1]))[..., ::-1].copy()
    frame.flags.writeable = False  # as a frame viewed on a ROS message buffer
    torch.testing.assert_close(uint8_input(frame, (96, 320)), uint8_input(frame.copy(), (96, 320)), rtol=0, atol=0)
    torch.testing.assert_close(to_tensor_resized(frame, 96, 320), to_tensor_resized(frame.copy(), 96, 320),
                               rtol=0, atol=0)
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                [[0, 0, 0]]):
        with pytest.raises(ValueError, match="H x W x 3 uint8"):
            check_rgb(bad)
        with pytest.raises(ValueError, match="H x W x 3 uint8"):
            to_tensor_resized(bad, 4, 4)
