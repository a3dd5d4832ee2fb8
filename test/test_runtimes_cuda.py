"""CUDA runtimes, run where a GPU is present (skipped elsewhere): tensorrt (requirements-gpu.txt;
skipped where torch_tensorrt is not installed) in fp32 / fp16 / bf16 on lite and the tiny-SD
model, its engine cache (the second start loads the engine), one engine for batches 1..N;
torch.compile with CUDA graphs (a frame's result is not overwritten by the next replay); ONNX
Runtime on CUDA. Each against the eager estimator in fp32 on a real KITTI frame.

Tolerances: median relative depth difference to eager fp32, as test_cuda.py's for the eager
precisions (TF32 reads 10-bit mantissas, fp16 / bf16 keep 10 / 7 mantissa bits), and the max
absolute depth difference for the fp32 runtimes that compute the same graph."""
from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import torch

from conftest import KITTI_RAW
from diffsql_model.data.network_input import to_tensor_resized
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.inference import DepthEstimator, predict_depth
from diffsql_model.presets import get_preset
from diffsql_model.runtimes import build_runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_trt = pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None,
                               reason="needs torch_tensorrt (pip install -r requirements-gpu.txt)")
FRAME = KITTI_RAW / "2011_09_26/2011_09_26_drive_0023_sync/image_02/data/0000000000.png"
NET = (192, 640)
MEDIAN_REL = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 5e-2}
MAX_ABS_FP32_M = 5e-2  # TF32 in both: 10-bit mantissas through ~20 layers, on depths up to 80 m


def _model(preset="lite", precision="fp32"):
    torch.manual_seed(0)
    cfg = get_preset(preset, height=NET[0], width=NET[1])
    model = DiffSQLDepth.from_config(cfg, "cuda", precision=precision, sd_seed=0).eval()
    with torch.no_grad():  # as test_cuda.py: depth varies across the image
        for name, p in model.query_layer.named_parameters():
            if not name.startswith("norm_"):
                p.mul_(3.0)
    return model, cfg


def _rgb():
    return cv2.imread(str(FRAME))[..., ::-1].copy()


def _check(depth, ref, precision, max_abs=None):
    assert np.isfinite(depth).all() and depth.shape == ref.shape
    assert ref.max() / ref.min() > 1.5
    assert np.median(np.abs(depth / ref - 1)) < MEDIAN_REL[precision]
    if max_abs is not None:
        assert np.abs(depth - ref).max() < max_abs


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_matches_eager_and_the_second_start_loads_the_engine(precision, tmp_path):
    model, cfg = _model()
    rgb = _rgb()
    ref, _ = DepthEstimator(model, cfg, device="cuda").predict(rgb)
    est = DepthEstimator(model, cfg, device="cuda", precision=precision, runtime="tensorrt", cache_dir=tmp_path)
    assert not est.runtime.from_cache and est.runtime.cache_path.is_file()
    est.warmup()
    depth, unc = est.predict(rgb)
    _check(depth, ref, precision, MAX_ABS_FP32_M if precision == "fp32" else None)
    assert (unc >= 0).all()
    again = DepthEstimator(model, cfg, device="cuda", precision=precision, runtime="tensorrt", cache_dir=tmp_path)
    assert again.runtime.from_cache and again.runtime.cache_path == est.runtime.cache_path
    np.testing.assert_allclose(again.predict(rgb)[0], depth, rtol=1e-3)


@needs_trt
def test_tensorrt_tiny_sd_fp16(tmp_path):
    model, cfg = _model("tiny_sd", "fp16")
    ref_model, _ = _model("tiny_sd", "fp32")
    rgb = _rgb()
    ref, _ = DepthEstimator(ref_model, cfg, device="cuda").predict(rgb)
    est = DepthEstimator(model, cfg, device="cuda", precision="fp16", runtime="tensorrt", cache_dir=tmp_path)
    _check(est.predict(rgb)[0], ref, "fp16")


@needs_trt
def test_tensorrt_one_engine_for_batches_up_to_max_batch(tmp_path):
    model, _ = _model()
    rgb = _rgb()
    images = torch.stack([to_tensor_resized(np.ascontiguousarray(f), *NET) for f in (rgb, rgb[:, ::-1], rgb[::2])])
    rt = build_runtime(model, "tensorrt", NET, "fp16", "cuda", max_batch=3, cache_dir=tmp_path)
    ref = predict_depth(model, images, device=torch.device("cuda"))
    for batch in (images, images[:1]):
        _check(predict_depth(model, batch, device=torch.device("cuda"), runtime=rt), ref[:len(batch)], "fp16")


def test_compile_with_cuda_graphs_matches_eager_and_keeps_each_result():
    model, cfg = _model()
    rgb = _rgb()
    ref_est = DepthEstimator(model, cfg, device="cuda")
    refs = [ref_est.predict(f)[0] for f in (rgb, rgb[:, ::-1].copy())]
    est = DepthEstimator(model, cfg, device="cuda", runtime="compile")
    est.warmup()
    first, _ = est.predict(rgb)
    second, _ = est.predict(rgb[:, ::-1].copy())  # the next CUDA-graph replay
    _check(first, refs[0], "fp32", MAX_ABS_FP32_M)
    _check(second, refs[1], "fp32", MAX_ABS_FP32_M)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx", "onnxscript")),
                    reason="needs onnxruntime, onnx and onnxscript (requirements.txt)")
def test_onnxruntime_on_cuda_matches_eager(tmp_path):
    model, cfg = _model()
    rgb = _rgb()
    ref, _ = DepthEstimator(model, cfg, device="cuda").predict(rgb)
    est = DepthEstimator(model, cfg, device="cuda", runtime="onnxruntime", cache_dir=tmp_path)
    _check(est.predict(rgb)[0], ref, "fp32", MAX_ABS_FP32_M)
