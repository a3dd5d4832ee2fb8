"""PoseNet shapes, the axis-angle transform against hand-built rotations (in fp32 under autocast
too), and the frame order of `relative_pose`."""
import math

import pytest
import torch

from diffsql_model.pose_net import PoseNet, relative_pose, transformation_from_parameters


def test_zero_parameters_give_identity():
    T = transformation_from_parameters(torch.zeros(3, 1, 3), torch.zeros(3, 1, 3))
    assert T.shape == (3, 4, 4)
    assert torch.allclose(T, torch.eye(4).expand(3, 4, 4))


def test_rotation_90_deg_about_y_and_inverse():
    aa = torch.tensor([[0.0, math.pi / 2, 0.0]])
    t = torch.tensor([[1.0, 2.0, 3.0]])
    T = transformation_from_parameters(aa, t)
    R = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # z axis -> x axis
    assert torch.allclose(T[0, :3, :3], R, atol=1e-6)
    assert torch.allclose(T[0, :3, 3], t[0])
    # Point (0, 0, 1) -> R p + t = (1, 0, 0) + (1, 2, 3)
    p = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(T[0] @ p, torch.tensor([2.0, 2.0, 3.0, 1.0]), atol=1e-6)
    T_inv = transformation_from_parameters(aa, t, invert=True)
    assert torch.allclose(T_inv[0, :3, :3], R.T, atol=1e-6)
    assert torch.allclose(T_inv[0, :3, 3], -R.T @ t[0], atol=1e-6)
    assert torch.allclose(T_inv @ T, torch.eye(4).unsqueeze(0), atol=1e-6)
    assert torch.allclose(T @ T_inv, torch.eye(4).unsqueeze(0), atol=1e-6)


def test_posenet_shapes_small_outputs_and_gradients():
    torch.manual_seed(0)
    net = PoseNet(18)
    assert net.encoder[0].weight.shape == (64, 6, 7, 7)
    a, b = torch.rand(2, 3, 32, 64), torch.rand(2, 3, 32, 64)
    axisangle, translation = net(a, b)
    assert axisangle.shape == (2, 3) and translation.shape == (2, 3)
    # The 0.01 output scale keeps the initial motion close to the identity.
    assert axisangle.abs().max() < 0.05 and translation.abs().max() < 0.05
    T_fwd = relative_pose(net, a, b, 1)
    T_back = relative_pose(net, a, b, -1)
    assert T_fwd.shape == T_back.shape == (2, 4, 4)
    # A future source: (target, source) in that order; a past one: the inverted motion of
    # (source, target), so the earlier frame always goes first.
    aa, tt = net(a, b)
    assert torch.allclose(T_fwd, transformation_from_parameters(aa, tt), atol=1e-6)
    aa, tt = net(b, a)
    assert torch.allclose(T_back, transformation_from_parameters(aa, tt, invert=True), atol=1e-6)
    T_fwd.sum().backward()
    assert net.encoder[0].weight.grad.abs().sum() > 0


def test_untrained_posenet_sees_the_order_of_its_frames():
    """From scratch, each frame has its own first-layer filters: with one random filter copied
    to both, the first layer sees a + b and the motion a -> b equals b -> a until training breaks
    the symmetry (the demo world's monocular runs then locked onto a sideways motion)."""
    torch.manual_seed(0)
    net = PoseNet(18, weights="none").eval()
    w = net.encoder[0].weight
    assert not torch.allclose(w[:, :3], w[:, 3:])
    a, b = torch.rand(1, 3, 64, 192), torch.rand(1, 3, 64, 192)
    with torch.no_grad():
        forward, backward = torch.cat(net(a, b), 1), torch.cat(net(b, a), 1)
    assert (forward - backward).abs().max() > 0.05 * forward.abs().max()
    with torch.no_grad():  # the copied init, for contrast: a and b are interchangeable
        w.copy_(torch.cat([w[:, :3]] * 2, 1))
        assert torch.allclose(torch.cat(net(a, b), 1), torch.cat(net(b, a), 1), atol=1e-6)


def test_forward_prior_starts_posenet_at_a_forward_motion():
    """prior="forward": before any training, the predicted motion of any pair (earlier first) is
    0.05 mean depths forward: a point ahead of the camera comes 0.05 closer, frame +1 and -1
    alike; prior="none" starts near zero."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 64, 192), torch.rand(2, 3, 64, 192)
    with torch.no_grad():
        _, t = PoseNet(18, prior="forward")(a, b)
        _, t0 = PoseNet(18, prior="none")(a, b)
        assert torch.allclose(t, torch.tensor([0.0, 0.0, -0.05]).expand(2, 3), atol=0.01)
        assert t0.abs().max() < 0.01
        net = PoseNet(18, prior="forward")
        p = torch.tensor([0.0, 0.0, 1.0, 1.0])  # a target-frame point 1 mean depth ahead
        later = relative_pose(net, a, b, 1)[0] @ p  # in frame +1: the camera moved forward
        earlier = relative_pose(net, a, b, -1)[0] @ p  # in frame -1: it was behind
        assert later[2] == pytest.approx(0.95, abs=0.01) and earlier[2] == pytest.approx(1.05, abs=0.01)
    with pytest.raises(ValueError, match="pose prior"):
        PoseNet(18, prior="sideways")


@pytest.mark.parametrize("invert", [False, True])
def test_pose_is_composed_in_fp32_under_autocast(invert):
    """The trainer calls this inside bf16 autocast: the matrices must still be fp32-exact."""
    torch.manual_seed(0)
    aa, t = torch.randn(8, 3) * 0.3, torch.randn(8, 3) * 10
    ref = transformation_from_parameters(aa, t, invert=invert)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = transformation_from_parameters(aa, t, invert=invert)
        # PoseNet outputs under autocast are bf16: cast up, then composed in fp32 as well.
        out_low = transformation_from_parameters(aa.bfloat16(), t.bfloat16(), invert=invert)
    assert out.dtype == out_low.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    ref_low = transformation_from_parameters(aa.bfloat16().float(), t.bfloat16().float(), invert=invert)
    torch.testing.assert_close(out_low, ref_low, rtol=0, atol=1e-6)


def test_posenet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        PoseNet(num_layers=20)
    with pytest.raises(FileNotFoundError, match="weights file not found: coco"):
        PoseNet(weights="coco")


def test_posenet_imagenet_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    import torchvision

    from diffsql_model.encoder import imagenet_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        PoseNet(18, weights="imagenet")
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    net = PoseNet(18, weights="imagenet")
    conv1 = net.encoder[0].weight
    torch.testing.assert_close(conv1, torch.cat([reference.conv1.weight] * 2, dim=1) / 2)
    torch.testing.assert_close(net.encoder[4][0].conv1.weight, reference.layer1[0].conv1.weight)
