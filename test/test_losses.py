"""Self-supervised losses against hand computations (Eqs. 12-15)."""
import math

import numpy as np
import pytest
import torch

from diffsql_model.losses import (C1, C2, LossConfig, SelfSupervisedLoss, automask, min_reprojection,
                                  normalize_depth, photometric_error, smoothness_loss, ssim)
from diffsql_model.yaml_config import ConfigError


def _ssim_window(a: np.ndarray, b: np.ndarray) -> float:
    mx, my = a.mean(), b.mean()
    vx, vy = ((a - mx) ** 2).mean(), ((b - my) ** 2).mean()
    cov = ((a - mx) * (b - my)).mean()
    return ((2 * mx * my + C1) * (2 * cov + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))


def test_ssim_of_image_with_itself_is_one():
    x = torch.rand(2, 3, 10, 12)
    assert torch.allclose(ssim(x, x), torch.ones_like(x), atol=1e-5)


def test_ssim_matches_hand_computation_centre_and_reflected_corner():
    a = np.array([[0.1, 0.5, 0.9], [0.3, 0.2, 0.7], [0.8, 0.6, 0.4]])
    b = np.array([[0.2, 0.4, 0.9], [0.1, 0.3, 0.5], [0.9, 0.7, 0.1]])
    s = ssim(torch.tensor(a).view(1, 1, 3, 3), torch.tensor(b).view(1, 1, 3, 3))[0, 0].numpy()
    assert math.isclose(s[1, 1], _ssim_window(a, b), rel_tol=1e-9)  # whole image is the window
    idx = np.ix_([1, 0, 1], [1, 0, 1])  # reflection padding around the corner pixel (0, 0)
    assert math.isclose(s[0, 0], _ssim_window(a[idx], b[idx]), rel_tol=1e-9)


def test_photometric_error_hand_computed_for_constant_images():
    x = torch.full((1, 3, 5, 5), 0.2)
    y = torch.full((1, 3, 5, 5), 0.5)
    assert photometric_error(x, x).abs().max() < 1e-6
    ssim_const = (2 * 0.2 * 0.5 + C1) / (0.2 ** 2 + 0.5 ** 2 + C1)  # variances are 0
    expected = 0.85 * (1 - ssim_const) / 2 + 0.15 * 0.3
    pe = photometric_error(x, y)
    assert pe.shape == (1, 1, 5, 5)
    assert torch.allclose(pe, torch.full_like(pe, expected), atol=1e-6)


def test_automask_selects_pixels_where_warped_beats_identity():
    # 2 sources, 1 x 4 pixels. min warped = [0.1, 0.3, 0.2, 0.4]; min identity = [0.2, 0.1, 0.2, 0.5]
    reproj = torch.tensor([[[[0.1, 0.3, 0.6, 0.4]], [[0.5, 0.9, 0.2, 0.8]]]])
    identity = torch.tensor([[[[0.3, 0.1, 0.2, 0.5]], [[0.2, 0.4, 0.7, 0.6]]]])
    assert torch.equal(min_reprojection(reproj), torch.tensor([[[[0.1, 0.3, 0.2, 0.4]]]]))
    mask = automask(reproj, identity, noise=False)
    assert torch.equal(mask, torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]]))  # tie (0.2 vs 0.2) not selected


def test_smoothness_zero_for_constant_and_hand_computed():
    img = torch.rand(1, 3, 6, 7)
    assert smoothness_loss(torch.full((1, 1, 6, 7), 0.3), img).item() == 0.0
    disp = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # mean 2.5 -> d* = [[.4, .8], [1.2, 1.6]]
    im = torch.tensor([[[[0.0, 0.5], [0.0, 0.0]]]])
    # x: |dd| = 0.4 in both rows, image edge 0.5 in row 0; y: |dd| = 0.8, image edge 0.5 in col 1
    expected = (0.4 * math.exp(-0.5) + 0.4) / 2 + (0.8 + 0.8 * math.exp(-0.5)) / 2
    assert math.isclose(smoothness_loss(disp, im).item(), expected, rel_tol=1e-6)


def _scene(b=1, h=24, w=32):
    K = torch.eye(4).repeat(b, 1, 1)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2] = 20.0, 20.0, (w - 1) / 2, (h - 1) / 2
    return K, torch.linalg.inv(K)


def test_loss_is_zero_for_identical_images_and_static_frames_are_masked():
    torch.manual_seed(0)
    K, inv_K = _scene()
    img = torch.rand(1, 3, 24, 32)
    depth = torch.full((1, 1, 24, 32), 10.0)  # at the scale anchor: its term is 0 too
    cfg = LossConfig(automask_noise=False)
    eye = torch.eye(4).unsqueeze(0)
    out = SelfSupervisedLoss(cfg)(img, {-1: img.clone(), 1: img.clone()}, depth, K, inv_K, {-1: eye, 1: eye})
    assert out["loss"].item() < 1e-5 and out["smoothness"].item() == 0.0
    # Camera did not move but the pose says it did: every pixel is better explained unwarped.
    moved = eye.clone()
    moved[0, 0, 3] = 0.3
    out = SelfSupervisedLoss(cfg)(img, {1: img.clone()}, depth, K, inv_K, {1: moved})
    assert out["automask_fraction"].item() == 0.0 and out["loss"].item() == 0.0
    assert out["automask"].shape == (1, 1, 24, 32) and out["automask"].sum() == 0  # the per-pixel map
    assert set(out["warped"]) == {1} and out["warped"][1].shape == img.shape


def test_loss_gradients_multiscale_and_stereo_source():
    torch.manual_seed(0)
    K, inv_K = _scene(2)
    tgt, src, right = torch.rand(3, 2, 3, 24, 32)
    d0 = torch.full((2, 1, 24, 32), 5.0, requires_grad=True)
    d1 = torch.full((2, 1, 12, 16), 5.0, requires_grad=True)
    stereo = torch.eye(4).repeat(2, 1, 1)
    stereo[:, 0, 3] = -0.54
    fn = SelfSupervisedLoss(LossConfig(scales=[0, 1], automask=False))
    out = fn(tgt, {1: src, "s": right}, {0: d0, 1: d1}, K, inv_K, {1: torch.eye(4).repeat(2, 1, 1), "s": stereo})
    out["loss"].backward()
    assert torch.isfinite(d0.grad).all() and d0.grad.abs().sum() > 0 and d1.grad.abs().sum() > 0
    assert out["automask_fraction"].item() == 1.0
    with pytest.raises(ValueError, match="scale"):
        fn(tgt, {1: src}, d0, K, inv_K, {1: stereo})


def test_bad_inputs_and_config():
    K, inv_K = _scene()
    img = torch.rand(1, 3, 24, 32)
    depth = torch.full((1, 1, 24, 32), 4.0)
    depth[0, 0, 3, 3] = float("nan")
    fn = SelfSupervisedLoss()
    with pytest.raises(ValueError, match="non-finite"):
        fn(img, {1: img}, depth, K, inv_K, {1: torch.eye(4).unsqueeze(0)})
    with pytest.raises(ValueError, match="same ids"):
        fn(img, {1: img}, depth.nan_to_num(1.0), K, inv_K, {-1: torch.eye(4).unsqueeze(0)})
    with pytest.raises(ConfigError, match="alpha"):
        LossConfig(alpha=1.5)
    cfg = LossConfig().with_overrides(["scales=[0, 1, 2, 3]", "smoothness=0.01"])
    assert cfg.scales == [0, 1, 2, 3] and cfg.smoothness == 0.01 and LossConfig().alpha == 0.85


def test_depth_normalization_removes_global_scale_in_m_and_keeps_it_with_stereo():
    torch.manual_seed(0)
    K, inv_K = _scene(2)
    tgt, src, right = torch.rand(3, 2, 3, 24, 32)
    depth = 2.0 + 8.0 * torch.rand(2, 1, 24, 32)
    n = normalize_depth(depth)
    torch.testing.assert_close(n.mean(dim=(2, 3)), torch.ones(2, 1))
    torch.testing.assert_close(n * depth.mean(dim=(2, 3), keepdim=True), depth)
    motion = torch.eye(4).repeat(2, 1, 1)
    motion[:, 2, 3] = -0.2  # forward: the warp depends on t / depth
    stereo = torch.eye(4).repeat(2, 1, 1)
    stereo[:, 0, 3] = -0.54

    def loss(mode, d, sources):
        fn = SelfSupervisedLoss(LossConfig(automask=False, depth_normalization=mode))
        poses = {k: (stereo if k == "s" else motion) for k in sources}
        return fn(tgt, sources, d, K, inv_K, poses)["photometric"].item()

    m_sources = {1: src}
    # M ("auto" = on): the global depth scale is invisible to the photometric term...
    assert math.isclose(loss("auto", depth, m_sources), loss("auto", 7.0 * depth, m_sources), rel_tol=1e-6)
    # ... and equals warping the mean-1 depth without normalisation.
    assert math.isclose(loss("auto", depth, m_sources), loss("off", n, m_sources), rel_tol=1e-6)
    assert not math.isclose(loss("off", depth, m_sources), loss("off", 7.0 * depth, m_sources), rel_tol=1e-3)
    # With the stereo partner ("auto" = off) the known baseline keeps metric scale observable.
    ms_sources = {1: src, "s": right}
    assert not math.isclose(loss("auto", depth, ms_sources), loss("auto", 7.0 * depth, ms_sources), rel_tol=1e-3)
    assert math.isclose(loss("on", depth, ms_sources), loss("on", 7.0 * depth, ms_sources), rel_tol=1e-6)
    with pytest.raises(ConfigError, match="depth_normalization"):
        LossConfig(depth_normalization="median")


def test_scale_anchor_acts_on_the_free_scale_only():
    torch.manual_seed(0)
    K, inv_K = _scene(2)
    tgt, src = torch.rand(2, 2, 3, 24, 32)
    depth = 2.0 + 8.0 * torch.rand(2, 1, 24, 32)
    motion = torch.eye(4).repeat(2, 1, 1)
    motion[:, 2, 3] = -0.2
    cfg = LossConfig(automask_noise=False, scale_anchor=0.1, scale_anchor_depth=5.0)
    fn, plain = SelfSupervisedLoss(cfg), SelfSupervisedLoss(LossConfig(automask_noise=False, scale_anchor=0.0))
    for k in (0.5, 1.0, 3.0):
        out, ref = fn(tgt, {1: src}, k * depth, K, inv_K, {1: motion}), plain(tgt, {1: src}, k * depth, K, inv_K, {1: motion})
        means = (k * depth).mean(dim=(1, 2, 3))
        expected = 0.1 * ((means.log() - math.log(5.0)) ** 2).mean()  # by hand
        torch.testing.assert_close(out["scale_anchor"], expected)
        torch.testing.assert_close(out["loss"], ref["loss"] + expected)
        torch.testing.assert_close(out["photometric"], ref["photometric"])  # scale-free term unchanged
    stereo = fn(tgt, {"s": src}, depth, K, inv_K, {"s": motion})  # metric runs: never anchored
    assert float(stereo["scale_anchor"]) == 0.0
    with pytest.raises(ConfigError, match="scale_anchor"):
        LossConfig(scale_anchor=-1.0)
