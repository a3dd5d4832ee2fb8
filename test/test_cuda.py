"""CUDA paths, run where a GPU is present (skipped elsewhere): inference in fp32 / fp16 / bf16
against the CPU on a real KITTI frame, Stable Diffusion features on the GPU, fp16 training with
loss scaling, and its resume."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conftest import KITTI_RAW
from diffsql_model.checkpoint import load_checkpoint
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.inference import DepthEstimator
from diffsql_model.presets import get_preset
from diffsql_model.train.config import TrainConfig
from test_train import kitti_config, one_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FRAME = KITTI_RAW / "2011_09_26/2011_09_26_drive_0023_sync/image_02/data/0000000000.png"


def _lite(h=192, w=640):
    torch.manual_seed(0)
    cfg = get_preset("lite", height=h, width=w)
    model = DiffSQLDepth(cfg).eval()
    with torch.no_grad():  # as the node test's checkpoint: depth varies across the image
        for name, p in model.query_layer.named_parameters():
            if not name.startswith("norm_"):
                p.mul_(3.0)
    return model, cfg


# Median relative depth difference to the CPU fp32 result. fp32 on CUDA is not bit-exact (cuDNN
# kernels, TF32 where PyTorch allows it); fp16 / bf16 keep 10 / 7 mantissa bits.
TOLERANCE = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 5e-2}


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
def test_estimator_on_cuda_matches_cpu(precision):
    model, cfg = _lite()
    rgb = cv2.imread(str(FRAME))[..., ::-1].copy()  # 375 x 1242: resized inside
    ref_d, ref_u = DepthEstimator(model, cfg, device="cpu").predict(rgb)
    est = DepthEstimator(model, cfg, device="cuda", precision=precision)
    for _ in range(2):  # the second call reuses the pinned staging and input buffers
        depth, unc = est.predict(rgb)
    assert depth.shape == unc.shape == rgb.shape[:2] and depth.dtype == unc.dtype == np.float32
    assert np.isfinite(depth).all() and np.isfinite(unc).all() and (unc >= 0).all()
    assert cfg.min_depth <= depth.min() and depth.max() <= cfg.max_depth
    assert ref_d.max() / ref_d.min() > 1.5  # a depth map with structure, not a constant
    assert np.median(np.abs(depth / ref_d - 1)) < TOLERANCE[precision]
    assert np.median(np.abs(unc - ref_u)) < 4 * TOLERANCE[precision] * np.median(ref_u) + 1e-6
    # Network-sized input skips the resize: the other preprocessing branch.
    small = cv2.resize(rgb, (640, 192), interpolation=cv2.INTER_AREA)
    d_small, _ = est.predict(small)
    ref_small, _ = DepthEstimator(model, cfg, device="cpu").predict(small)
    assert np.median(np.abs(d_small / ref_small - 1)) < TOLERANCE[precision]


def test_stable_diffusion_features_on_cuda_match_cpu():
    torch.manual_seed(0)
    cfg = get_preset("tiny_sd", weights="none", height=192, width=640)
    model = DiffSQLDepth(cfg).eval()
    image = torch.rand(1, 3, 192, 640, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(image)
        out = model.cuda()(image.cuda())
    for key in ("depth", "uncertainty"):
        got = out[key].cpu()
        assert got.shape == ref[key].shape and torch.isfinite(got).all()
        assert (got - ref[key]).abs().median() <= 5e-3 * ref[key].abs().median() + 1e-6, key


def test_fp16_training_on_cuda_scales_the_loss_and_resumes(tmp_path):
    from diffsql_model.train.cli import main
    from diffsql_model.train.trainer import Trainer

    cfg = TrainConfig.load_yaml(kitti_config(tmp_path, runtime={"device": "cuda", "precision": "fp16"}))
    trainer = Trainer(cfg, tmp_path / "one")
    assert trainer.scaler.is_enabled()
    seen, losses, changed = one_step(trainer)
    assert seen == [torch.float16]  # the network ran in half precision
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    # With loss scaling the small gradients survive: most tensors move (on the CPU without
    # scaling, 70 of 167 did), unless the first step overflowed and was skipped.
    assert changed > 0.5 or trainer.scaler.get_scale() < 65536.0
    # The CLI run: the scaler state travels in the checkpoint and comes back on --resume.
    config = kitti_config(tmp_path, runtime={"device": "cuda", "precision": "fp16"}, optim={"max_steps": 2})
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 0
    first = load_checkpoint(out / "last.pt")
    assert first["grad_scaler"]["scale"] > 0
    assert main(["--config", str(config), "--out", str(out), "--resume", "--set", "optim.max_steps=4"]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 4 and state["grad_scaler"]["scale"] > 0
    # _growth_tracker counts clean steps since the last scale change: resumed, not reset to 0 + 2.
    assert state["grad_scaler"]["_growth_tracker"] in (first["grad_scaler"]["_growth_tracker"] + 2, 0)
    # Adam counts the steps the scaler let through (an overflow skips one): 2 more than before.
    (adam_before,) = {float(s["step"]) for s in first["optimizer"]["state"].values()}
    (adam_after,) = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_before <= 2 and adam_before < adam_after <= adam_before + 2
