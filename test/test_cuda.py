"""CUDA paths, run where a GPU is present (skipped elsewhere), each a few seconds on one H200:
the node's estimator (fp32 with and without TF32, fp16, bf16; lite, tiny SD and the SD v1.5
architecture, loaded as the node loads them) against the CPU or fp32 on a real KITTI frame; SD
v1.5-size features in every precision; bf16 training of the full-size model; fp16 loss scaling
through overflowing first steps and its resume; NCCL DDP where 2+ GPUs are visible."""
from __future__ import annotations

import os
import socket

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import KITTI_RAW
from diffsql_model.checkpoint import load_checkpoint, load_model, model_state, save_checkpoint
from diffsql_model.config import SDConfig
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.device import PRECISIONS, sd_dtypes
from diffsql_model.inference import TIMING_KEYS, DepthEstimator, cuda_math_mode
from diffsql_model.presets import get_preset
from diffsql_model.train.config import TrainConfig
from test_train import DRIVE, kitti_config, one_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FRAME = KITTI_RAW / DRIVE / "image_02/data/0000000000.png"

# Median relative depth difference to the CPU fp32 result. fp32 on CUDA is not bit-exact (cuDNN
# kernels, summation order); TF32 reads 10-bit mantissas; fp16 / bf16 keep 10 / 7 mantissa bits.
TOLERANCE = {"fp32": 5e-3, "fp32-ieee": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def _rgb() -> np.ndarray:
    return cv2.imread(str(FRAME))[..., ::-1].copy()  # 375 x 1242: resized inside


def _sharpen(model):
    """As the node test's checkpoint: depth varies across the image instead of near-constant."""
    with torch.no_grad():
        for name, p in model.query_layer.named_parameters():
            if not name.startswith("norm_"):
                p.mul_(3.0)
    return model


def _lite(h=192, w=640):
    torch.manual_seed(0)
    cfg = get_preset("lite", height=h, width=w)
    return _sharpen(DiffSQLDepth(cfg).eval()), cfg


def _flags():
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.benchmark)


def _close(depth, ref, unc, ref_u, tol):
    assert np.isfinite(depth).all() and np.isfinite(unc).all() and (unc >= 0).all()
    assert np.median(np.abs(depth / ref - 1)) < tol
    assert np.median(np.abs(unc - ref_u)) < 4 * tol * np.median(ref_u) + 1e-6


@pytest.mark.parametrize("mode", sorted(TOLERANCE))
def test_estimator_on_cuda_matches_cpu(mode):
    precision, tf32 = mode.split("-")[0], not mode.endswith("ieee")
    model, cfg = _lite()
    rgb = _rgb()
    ref_d, ref_u = DepthEstimator(model, cfg, device="cpu").predict(rgb)
    flags = _flags()
    est = DepthEstimator(model, cfg, device="cuda", precision=precision, tf32=tf32)
    assert est.tf32 == (tf32 and torch.cuda.get_device_capability() >= (8, 0))
    est.warmup()
    for _ in range(2):  # the second call reuses the pinned staging and input buffers
        depth, unc = est.predict(rgb)
    assert _flags() == flags  # TF32 and cuDNN autotuning were scoped to the estimator's forwards
    assert depth.shape == unc.shape == rgb.shape[:2] and depth.dtype == unc.dtype == np.float32
    assert cfg.min_depth <= depth.min() and depth.max() <= cfg.max_depth
    assert ref_d.max() / ref_d.min() > 1.5  # a depth map with structure, not a constant
    _close(depth, ref_d, unc, ref_u, TOLERANCE[mode])
    # Network-sized input skips the resize: the other preprocessing branch.
    small = cv2.resize(rgb, (640, 192), interpolation=cv2.INTER_AREA)
    d_small, u_small = est.predict(small)
    ref_small, ref_us = DepthEstimator(model, cfg, device="cpu").predict(small)
    _close(d_small, ref_small, u_small, ref_us, TOLERANCE[mode])


def test_estimator_reuses_pinned_buffers_and_times_with_events(monkeypatch):
    model, cfg = _lite()
    est = DepthEstimator(model, cfg, device="cuda")
    est.warmup()
    syncs = []
    real_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (syncs.append(a), real_sync(*a)))
    rgb = _rgb()
    first, _ = est.predict(rgb)
    (key, (host, _, frame)), = est._staging.items()
    ptrs = (host.data_ptr(), frame.data_ptr())
    assert host.is_pinned() and est._out_host.is_pinned() and key == (0, rgb.shape)
    view = rgb.view()
    view.flags.writeable = False  # as a frame viewed on a ROS message's buffer
    for _ in range(3):
        again, _ = est.predict(view)
        host, _, frame = est._staging[key]
        assert (host.data_ptr(), frame.data_ptr()) == ptrs and len(est._staging) == 1
        np.testing.assert_allclose(again, first, rtol=1e-5)
    assert tuple(est.timing) == TIMING_KEYS and all(v > 0 for v in est.timing.values())
    est.predict(rgb[:200, :600].copy())  # another camera size: new staging buffer of that size
    assert (0, (200, 600, 3)) in est._staging
    assert syncs == []  # timing came from CUDA events; the wait for the result is the event's


def _seeded_checkpoint(tmp_path, cfg, sharpen=True):
    torch.manual_seed(0)
    model = DiffSQLDepth(cfg).eval()
    if sharpen:
        _sharpen(model)
    return save_checkpoint(tmp_path / "model.pt", {"model_config": cfg.to_dict(), **model_state(model)})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_tiny_sd_estimator_loaded_as_the_node_does_matches_cpu(tmp_path, precision):
    path = _seeded_checkpoint(tmp_path, get_preset("tiny_sd", height=192, width=640))
    rgb = _rgb()
    cpu_model, cfg = load_model(path, "cpu")
    ref_d, ref_u = DepthEstimator(cpu_model, cfg, device="cpu").predict(rgb)
    model, cfg = load_model(path, "cuda", precision=precision)
    assert (model.sd.vae.dtype, model.sd.unet.dtype) == sd_dtypes(precision)  # frozen SD in the run dtype
    est = DepthEstimator(model, cfg, device="cuda", precision=precision)
    est.warmup()
    depth, unc = est.predict(rgb)
    assert depth.shape == rgb.shape[:2]
    _close(depth, ref_d, unc, ref_u, TOLERANCE[precision])


# SD v1.5-size extractor (random weights) against IEEE fp32: median absolute difference over the
# median magnitude. Emulated on the CPU (every layer's weights and outputs rounded, 128 x 384) the
# latent, features and tokens were off by 1.1-2.1e-2 in bf16 and 1.3-2.4e-3 in fp16; the bounds
# leave 5-8x for what the GPU kernels round besides. A broken path is off by ~1.
SD_TOLERANCE = {"bf16": 1e-1, "fp16": 2e-2}


def test_sd15_features_finite_in_every_precision_and_close_to_fp32():
    from diffsql_model.sd_features import DiffusionFeatureExtractor

    cfg = SDConfig(enabled=True, arch="v1.5", allow_random_weights=True)
    image = torch.rand(2, 3, 192, 640, generator=torch.Generator().manual_seed(1)).cuda()
    outs = {}
    for precision in ("fp32", "bf16", "fp16"):
        torch.manual_seed(0)  # the weights' seed is drawn from the RNG: the same SD each time
        ext = DiffusionFeatureExtractor.from_config(cfg, "cuda", precision).eval()
        assert (ext.vae.dtype, ext.unet.dtype) == sd_dtypes(precision)
        dtype = PRECISIONS[precision]
        with torch.no_grad(), cuda_math_mode(tf32=False), \
                torch.autocast("cuda", dtype=dtype, enabled=precision != "fp32"):
            latent = ext.encode_latent(image)
            out = ext(image)
        assert latent.dtype == torch.float32 and out["features"].dtype == dtype
        outs[precision] = {"latent": latent.float(), **{k: v.float() for k, v in out.items()}}
        assert all(torch.isfinite(v).all() for v in outs[precision].values()), precision
        del ext
        torch.cuda.empty_cache()
    ref = outs["fp32"]
    assert ref["features"].shape == (2, cfg.channels, 24, 80) and ref["tokens"].shape[-1] == 1280
    # fp16 keeps the VAE in fp32 (its fp16 activations overflow): the same latent as fp32.
    torch.testing.assert_close(outs["fp16"]["latent"], ref["latent"], rtol=1e-4, atol=1e-5)
    for precision, tol in SD_TOLERANCE.items():
        for key in ("latent", "features", "tokens"):
            err = (outs[precision][key] - ref[key]).abs().median() / ref[key].abs().median()
            assert err < tol, (precision, key, float(err))


def test_sd15_estimator_in_low_precision_close_to_fp32(tmp_path):
    """The paper's model size (SD v1.5 UNet + VAE, random weights) through the node's loader."""
    cfg = get_preset("diffsql_r50", weights="none", height=192, width=640,
                     sd={"allow_random_weights": True})
    path = _seeded_checkpoint(tmp_path, cfg)
    rgb = _rgb()
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        model, mcfg = load_model(path, "cuda", precision=precision)
        est = DepthEstimator(model, mcfg, device="cuda", precision=precision, tf32=False)
        est.warmup()
        results[precision] = est.predict(rgb)
        assert est.timing["model_ms"] > 0
        del model, est
        torch.cuda.empty_cache()
    ref_d, ref_u = results["fp32"]
    assert np.isfinite(ref_d).all() and cfg.min_depth <= ref_d.min() and ref_d.max() <= cfg.max_depth
    for precision in ("bf16", "fp16"):
        depth, unc = results[precision]
        _close(depth, ref_d, unc, ref_u, SD_TOLERANCE[precision])


def test_stable_diffusion_features_on_cuda_match_cpu():
    torch.manual_seed(0)
    cfg = get_preset("tiny_sd", weights="none", height=192, width=640)
    model = DiffSQLDepth(cfg).eval()
    image = torch.rand(1, 3, 192, 640, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(image)
        with cuda_math_mode(tf32=False):
            out = model.cuda()(image.cuda())
    for key in ("depth", "uncertainty"):
        got = out[key].cpu()
        assert got.shape == ref[key].shape and torch.isfinite(got).all()
        assert (got - ref[key]).abs().median() <= 5e-3 * ref[key].abs().median() + 1e-6, key


def test_full_size_model_trains_in_bf16(tmp_path):
    """diffsql_r50 (SD v1.5 arch, random frozen SD in bf16): 5 steps on one real KITTI batch."""
    from diffsql_model.train.trainer import Trainer

    model = {"preset": "diffsql_r50", "overrides": {"height": 128, "width": 416, "weights": "none",
                                                    "sd": {"allow_random_weights": True}}}
    cfg = TrainConfig.load_yaml(kitti_config(tmp_path, model=model, optim={"lr": 5e-4, "batch_size": 2},
                                             runtime={"device": "cuda", "precision": "bf16"}))
    trainer = Trainer(cfg, tmp_path / "out")
    assert trainer.model.sd.unet.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in trainer.params)
    batch = trainer._to_device(next(iter(trainer.loader)))
    losses = []
    for _ in range(5):
        _, out, _, _ = trainer.train_step(batch)
        losses.append(float(out["loss"].detach()))
    assert np.isfinite(losses).all()
    assert min(losses[-2:]) < 0.97 * losses[0], losses


def test_fp16_steps_survive_overflowing_first_steps(tmp_path):
    """A loss scale far too high: the first steps overflow and are skipped (parameters and Adam
    untouched, scale halved), then training goes on and the parameters move."""
    from diffsql_model.train.trainer import Trainer

    cfg = TrainConfig.load_yaml(kitti_config(tmp_path, runtime={"device": "cuda", "precision": "fp16"},
                                             optim={"lr": 5e-4}))
    trainer = Trainer(cfg, tmp_path / "one")
    # Any per-pixel gradient above 6e-8 overflows fp16 (max 65504) at this scale.
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)
    batch = trainer._to_device(next(iter(trainer.loader)))
    start = [p.detach().clone() for p in trainer.params]
    scales, skipped = [], 0
    for _ in range(60):
        before = trainer.scaler.get_scale()
        _, losses, _, _ = trainer.train_step(batch)
        assert torch.isfinite(losses["loss"])
        scales.append(trainer.scaler.get_scale())
        if scales[-1] < before:
            skipped += 1
        elif skipped:
            break
    assert scales[0] == 2.0 ** 39 and skipped >= 2, scales  # the first steps were skipped
    assert scales[-1] == scales[-2]  # ... then a step went through at a scale that fits
    applied = len(scales) - skipped
    (adam_steps,) = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == applied >= 1
    moved = sum(not torch.equal(a, p) for a, p in zip(start, trainer.params)) / len(start)
    assert moved > 0.5


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from diffsql_model.train.distributed import init_from_env, shutdown
    from diffsql_model.train.trainer import Trainer

    cfg = TrainConfig.from_dict({
        "model": {"preset": "lite", "overrides": {"height": 64, "width": 192}},
        "data": {"kind": "kitti", "root": str(KITTI_RAW), "train_split": os.path.join(tmp, "train.txt")},
        "optim": {"batch_size": 2, "max_steps": 3, "lr": 1e-3},
        "runtime": {"device": "cuda", "num_workers": 0, "checkpoint_every": 3, "val_every": 0,
                    "progress": False, "seed": 5},
    })
    ctx = init_from_env("cuda")
    try:
        trainer = Trainer(cfg, os.path.join(tmp, "out"), ctx=ctx)
        assert trainer.device == torch.device("cuda", rank)
        summary = trainer.run()
        params = {k: v.detach().cpu() for k, v in trainer.model.named_parameters()}
        torch.save({"params": params, "step": summary["step"]}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        shutdown(ctx)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ddp_keeps_replicas_identical(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"{DRIVE} {f} {s}\n" for f in range(1, 6) for s in "lr"))
    mp.spawn(_nccl_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 3
    torch.manual_seed(5)
    init = DiffSQLDepth(get_preset("lite", height=64, width=192)).state_dict()
    for key, value in r0["params"].items():
        torch.testing.assert_close(r1["params"][key], value, rtol=0, atol=0, msg=key)
    assert sum(not torch.equal(v, init[k]) for k, v in r0["params"].items()) > 10  # they trained
