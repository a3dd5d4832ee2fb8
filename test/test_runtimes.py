"""Inference runtimes on the CPU against eager, on a real KITTI frame: onnxruntime on lite by
default; its batch form used by evaluation, the tiny-SD model and torch.compile behind `slow`
(minutes of export / compilation on 2 cores); the runtime cache (a second start loads, another
weights, input size or precision builds anew), and the clear errors for unknown or unavailable
runtimes. The CUDA runtimes (tensorrt, compile with CUDA graphs, onnxruntime-gpu) are in
test_runtimes_cuda.py.

Tolerance against eager fp32, the same for every runtime here: max |depth difference| <= 1e-3 m
and max |uncertainty difference| <= 1e-3 (measured: 2e-5 m for ONNX Runtime and torch.compile on
depths of 0.1..80 m: other kernels and summation orders, not other math)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import KITTI_RAW
from diffsql_model.data.network_input import to_tensor_resized
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.inference import DepthEstimator, predict_depth
from diffsql_model.presets import get_preset
from diffsql_model.runtimes import (RUNTIMES, RuntimeUnavailable, build_runtime, cache_entry,
                                    weights_hash)

FRAME = KITTI_RAW / "2011_09_26/2011_09_26_drive_0023_sync/image_02/data/0000000000.png"
NET = (64, 128)
TOL_M = 1e-3


def _model(preset: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = get_preset(preset, height=NET[0], width=NET[1], **overrides)
    model = DiffSQLDepth(cfg).eval()
    with torch.no_grad():  # as the node test's checkpoint: depth varies across the image
        for name, p in model.query_layer.named_parameters():
            if not name.startswith("norm_"):
                p.mul_(3.0)
        if model.uncertainty_head is not None:  # a head whose std varies over the image
            torch.nn.init.normal_(model.uncertainty_head.net[-1].weight, std=1.0)
    return model, cfg


@pytest.fixture(scope="module")
def lite():
    return _model("lite")


@pytest.fixture(scope="module")
def frame():
    return cv2.imread(str(FRAME))[..., ::-1].copy()  # 375 x 1242 RGB: resized inside


def _matches_eager(model, cfg, frame, runtime, cache_dir, structure=1.5):
    ref_d, ref_u = DepthEstimator(model, cfg).predict(frame)
    est = DepthEstimator(model, cfg, runtime=runtime, cache_dir=cache_dir)
    assert est.runtime.name == runtime
    est.warmup()
    depth, unc = est.predict(frame)
    assert depth.shape == unc.shape == frame.shape[:2] and depth.dtype == np.float32
    assert ref_d.max() / ref_d.min() > structure  # a depth map with structure, not a constant
    assert np.abs(depth - ref_d).max() <= TOL_M
    assert np.abs(unc - ref_u).max() <= TOL_M
    return est, depth


def test_onnxruntime_matches_eager_and_the_second_start_loads_the_cache(lite, frame, tmp_path):
    model, cfg = lite
    est, depth = _matches_eager(model, cfg, frame, "onnxruntime", tmp_path)
    assert not est.runtime.from_cache and est.runtime.cache_path.is_file()
    entry = est.runtime.cache_path.parent
    key = json.loads((entry / "key.json").read_text())
    assert key["input"] == list(NET) and key["precision"] == "fp32" and key["weights_sha256"] == weights_hash(model)
    again = DepthEstimator(model, cfg, runtime="onnxruntime", cache_dir=tmp_path)
    assert again.runtime.from_cache and again.runtime.cache_path == est.runtime.cache_path
    np.testing.assert_array_equal(again.predict(frame)[0], depth)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temporary folder left


def test_onnxruntime_exports_the_trained_uncertainty_head(frame, tmp_path):
    model, cfg = _model("lite", uncertainty="head")
    _, depth = _matches_eager(model, cfg, frame, "onnxruntime", tmp_path)
    unc = DepthEstimator(model, cfg).predict(frame)[1]
    rel = unc / depth
    assert rel.max() / rel.min() > 1.5  # the head's std, not a constant multiple of depth


def test_cache_key_follows_weights_size_and_precision(lite):
    model, _ = lite
    folder, key = cache_entry(model, "onnxruntime", NET, 1, "fp32", torch.device("cpu"), "/c")
    assert cache_entry(model, "onnxruntime", NET, 1, "fp32", torch.device("cpu"), "/c")[0] == folder
    for other in (((96, 128), 1, "fp32"), (NET, 2, "fp32"), (NET, 1, "bf16")):
        assert cache_entry(model, "onnxruntime", *other, torch.device("cpu"), "/c")[0] != folder
    changed, _ = _model("lite")
    assert weights_hash(changed) == key["weights_sha256"]  # same seed, same weights
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert weights_hash(changed) != key["weights_sha256"]


@pytest.mark.slow
def test_onnxruntime_batch_form_for_evaluation(lite, frame, tmp_path):
    """predict_depth with a runtime built for batches up to 3: the last, smaller batch of an
    evaluation runs on the same export; another image size is refused."""
    model, _ = lite
    images = torch.stack([to_tensor_resized(np.ascontiguousarray(f), *NET)
                          for f in (frame, frame[:, ::-1], frame[::2, ::2])])
    rt = build_runtime(model, "onnxruntime", NET, max_batch=3, cache_dir=tmp_path)
    ref = predict_depth(model, images)
    for batch in (images, images[:2]):
        out = predict_depth(model, batch, runtime=rt)
        assert out.shape == (len(batch), *NET)
        assert np.abs(out - ref[:len(batch)]).max() <= TOL_M
    with pytest.raises(ValueError, match="built for 1..3 x 3 x 64 x 128"):
        rt(torch.rand(1, 3, 96, 128))
    with pytest.raises(ValueError, match="built for"):
        rt(torch.rand(4, 3, *NET))


def test_unknown_and_unavailable_runtimes_are_clear_errors(lite):
    model, cfg = lite
    for bad in ("tflite", "TensorRT", ""):
        with pytest.raises(ValueError, match="runtime must be one of eager, compile, onnxruntime, tensorrt"):
            DepthEstimator(model, cfg, runtime=bad)
    assert RUNTIMES == ("eager", "compile", "onnxruntime", "tensorrt")
    with pytest.raises(RuntimeUnavailable, match="onnxruntime runs fp32 only"):
        build_runtime(model, "onnxruntime", NET, precision="bf16")
    with pytest.raises(ValueError, match="multiples of 32"):
        build_runtime(model, "eager", (60, 128))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeUnavailable, match="requirements-gpu.txt"):
            DepthEstimator(model, cfg, runtime="tensorrt")


def test_eager_runtime_is_the_default(lite):
    model, cfg = lite
    est = DepthEstimator(model, cfg)
    assert est.runtime.name == "eager" and est.runtime.module is model and est.runtime.cache_path is None


@pytest.mark.slow
def test_compile_matches_eager(lite, frame):
    model, cfg = lite
    _matches_eager(model, cfg, frame, "compile", None)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "compile"])
def test_tiny_sd_runtimes_match_eager(runtime, frame, tmp_path):
    model, cfg = _model("tiny_sd")
    _matches_eager(model, cfg, frame, runtime, tmp_path, structure=1.1)  # measured 1.17
    # Export left the eager model whole (its SD hooks still fill the extractor's store).
    img = to_tensor_resized(np.ascontiguousarray(frame), *NET)[None]
    assert predict_depth(model, img).shape == (1, *NET)
