"""DepthEstimator on the CPU: the start-up warm-up leaves results unchanged, timing, the CUDA
branch's preprocessing math (run here on CPU tensors) against the CPU path, the scoped CUDA math
flags, and the node's tf32 parameter. The CUDA branch itself runs in test_cuda.py. The one
prediction path (depth_maps / predict_depth) under the estimator and the batch users, and the
Stopwatch the estimator and the node time their stages with."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from conftest import KITTI_RAW
from diffsql_model.data.network_input import resize_to_unit, to_tensor_resized
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.inference import TIMING_KEYS, DepthEstimator, cuda_math_mode, depth_maps, predict_depth
from diffsql_model.presets import get_preset
from diffsql_model.timing import Stopwatch
from diffsql_model.yaml_config import ConfigError

FRAME = KITTI_RAW / "2011_09_26/2011_09_26_drive_0023_sync/image_02/data/0000000000.png"
NET = (96, 320)


@pytest.fixture(scope="module")
def lite():
    torch.manual_seed(0)
    cfg = get_preset("lite", height=NET[0], width=NET[1])
    return DiffSQLDepth(cfg).eval(), cfg


@pytest.fixture(scope="module")
def frames():
    """A 375 x 1242 KITTI frame as a flipped (strided) view, as frames viewed on ROS messages
    are not plain arrays, and a network-sized copy (the branch without resize)."""
    full = cv2.imread(str(FRAME))[..., ::-1]
    small = np.ascontiguousarray(cv2.resize(full, NET[::-1], interpolation=cv2.INTER_AREA))
    return full, small


def test_warmup_leaves_results_unchanged(lite, frames):
    model, cfg = lite
    cold = DepthEstimator(model, cfg)
    reference = [cold.predict(f) for f in frames]
    warm = DepthEstimator(model, cfg)
    ms = warm.warmup()
    assert ms > 0 and warm.warmup_ms == ms
    warm.warmup(frames[0].shape[:2])  # at a camera size too
    for frame, (ref_d, ref_u) in zip(frames, reference):
        depth, unc = warm.predict(frame)
        assert depth.shape == frame.shape[:2]
        np.testing.assert_array_equal(depth, ref_d)
        np.testing.assert_array_equal(unc, ref_u)
    assert tuple(warm.timing) == TIMING_KEYS
    assert all(v >= 0 for v in warm.timing.values()) and warm.timing["model_ms"] > 0


def test_cuda_preprocessing_math_matches_the_cpu_path(lite, frames):
    """resize_to_unit is what the CUDA branch runs on the uploaded frame; here on CPU tensors."""
    model, cfg = lite
    est = DepthEstimator(model, cfg)
    full, small = frames
    est.predict(full)  # the CPU path's network input stays in est._input
    on_device = resize_to_unit(torch.from_numpy(full.copy()), NET)
    assert on_device.shape == (1, 3, *NET) and on_device.dtype == torch.float32 and on_device.is_contiguous()
    # The CPU path resizes uint8 and rounds; the CUDA one resizes float: within one grey level.
    diff = (on_device - est._input).abs()
    assert float(diff.max()) <= 1.0 / 255 + 1e-6 and float(diff.mean()) < 0.3 / 255
    # It is the training resize itself.
    torch.testing.assert_close(on_device[0], to_tensor_resized(np.ascontiguousarray(full), *NET),
                               rtol=0, atol=1e-6)
    est.predict(small)
    plain = resize_to_unit(torch.from_numpy(small), NET)  # network-sized: no resize, / 255 only
    torch.testing.assert_close(plain, est._input, rtol=0, atol=1e-7)


def test_cuda_math_mode_is_scoped_and_restores_the_callers_flags():
    matmul, conv, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn
    before = (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark)
    for tf32, mode in ((True, "tf32"), (False, "ieee")):
        with cuda_math_mode(tf32):
            assert (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark) == (mode, mode, True)
        assert (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark) == before
    with pytest.raises(KeyError):  # a failed frame restores them too
        with cuda_math_mode(True):
            raise KeyError("frame")
    assert (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark) == before


def test_tf32_applies_only_on_cuda(lite):
    model, cfg = lite
    assert DepthEstimator(model, cfg, device="cpu", tf32=True).tf32 is False


def test_node_tf32_parameter_is_a_read_only_bool_and_validated():
    pytest.importorskip("rclpy")
    from diffsql_ros.node_params import PARAMETERS, check_params

    params = {p.name: p for p in PARAMETERS}
    assert params["tf32"].default is True and params["tf32"].read_only
    values = {p.name: p.default for p in PARAMETERS}
    check_params(values)
    for bad in ("true", 1, None):
        with pytest.raises(ConfigError, match="tf32 must be true or false"):
            check_params({**values, "tf32": bad})


def test_estimator_and_batch_predictions_are_one_path(lite, frames):
    """DepthEstimator is depth_maps on its input plus the resize back; predict_depth (diffsql-eval,
    validation) is depth_maps on a batch: the same network numbers for the same input."""
    model, cfg = lite
    full, small = frames
    est = DepthEstimator(model, cfg)
    depth, unc = est.predict(small)  # network-sized: no resize on either side
    maps = depth_maps(model, est._input, uncertainty=True)
    assert maps.shape == (1, 2, *NET) and maps.dtype == torch.float32
    np.testing.assert_array_equal(depth, maps[0, 0].numpy())
    np.testing.assert_array_equal(unc, maps[0, 1].numpy())
    np.testing.assert_array_equal(depth, predict_depth(model, est._input)[0])
    # The camera frame: the network output on the estimator's input, resized to 375 x 1242
    # (there as depth and uncertainty in one 2-channel cv2 resize, here one plane).
    depth_full, _ = est.predict(full)
    at_net = predict_depth(model, est._input)[0]
    np.testing.assert_allclose(depth_full, cv2.resize(at_net, full.shape[1::-1], interpolation=cv2.INTER_LINEAR),
                               rtol=1e-4)
    # A batch of three (the training resize, as diffsql-eval feeds it) = the frames one at a time.
    images = torch.stack([to_tensor_resized(np.ascontiguousarray(f), *NET) for f in (full, small, full[:, ::2])])
    batch = predict_depth(model, images, device=torch.device("cpu"))
    assert batch.shape == (3, *NET) and batch.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(batch[i], predict_depth(model, images[i:i + 1])[0], rtol=1e-5)
    np.testing.assert_allclose(batch[1], depth, rtol=1e-5)  # x / 255 here, x * (1/255) there


def test_depth_maps_run_without_gradients_on_trainable_weights(lite, frames):
    """Validation runs the path on the model being trained: no graph, and no inference tensors
    (autograd must still take the model's buffers afterwards)."""
    model, _ = lite
    x = to_tensor_resized(np.ascontiguousarray(frames[1]), *NET)[None]
    out = depth_maps(model, x)
    assert not out.requires_grad and not out.is_inference()
    assert any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="precision must be one of"):
        depth_maps(model, x, precision="fp8")


def test_stopwatch_adds_repeated_stages_in_the_order_given():
    watch = Stopwatch(("a", "b"))
    assert watch.ms == {"a": 0.0, "b": 0.0}
    for _ in range(2):
        with watch("b"):
            time.sleep(0.01)
    watch.add("a", 1.5)
    with pytest.raises(KeyError):
        with watch("c"):  # a failing block is timed too
            raise KeyError("c")
    assert list(watch.ms) == ["a", "b", "c"] and watch.ms["a"] == 1.5
    assert 20.0 <= watch.ms["b"] < 2000.0 and 0.0 <= watch.ms["c"] < 1000.0


def test_a_batch_of_frames_of_several_sizes_equals_each_frame_alone(lite, frames):
    """predict_batch (the multi-camera node's one model call): per frame the same maps as
    predict, at each frame's own size or at the network size; the batch bound is enforced."""
    model, cfg = lite
    full, small = frames
    crop = np.ascontiguousarray(full[:300, :900])
    est = DepthEstimator(model, cfg, "cpu", input_size=NET, max_batch=3)
    batch = est.predict_batch([full, small, crop])
    assert [d.shape for d, _ in batch] == [full.shape[:2], NET, crop.shape[:2]]
    for (d, u), rgb in zip(batch, (full, small, crop)):
        d1, u1 = est.predict(rgb)
        np.testing.assert_allclose(d, d1, rtol=1e-5)
        np.testing.assert_allclose(u, u1, rtol=1e-4, atol=1e-6)
        assert d.flags.c_contiguous and u.flags.c_contiguous
    # The network size: no upsample; the maps are the full-size ones before their resize.
    net = est.predict_batch([full, crop], full_size=False)
    assert [d.shape for d, _ in net] == [NET, NET]
    d_full = cv2.resize(net[0][0], full.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(d_full, batch[0][0], rtol=1e-5)
    assert not np.allclose(net[0][0], net[1][0])  # two frames, two depth maps
    with pytest.raises(ValueError, match="1..3"):
        est.predict_batch([small] * 4)
    with pytest.raises(ValueError, match="1..3"):
        est.predict_batch([])
