"""The trained uncertainty head (uncertainty.py): its likelihood against hand-computed values, the
published std in metres, the head reading detached features (depth trained by Eq. 15 alone),
self-teaching through the trainer on real KITTI frames, and the config checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffsql_model.checkpoint import load_model
from diffsql_model.config import ModelConfig
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.inference import DepthEstimator
from diffsql_model.losses import laplacian_nll
from diffsql_model.presets import get_preset
from diffsql_model.train.config import TrainConfig
from diffsql_model.uncertainty import depth_std
from diffsql_model.yaml_config import ConfigError
from test_train import kitti_config, run_cli


def small(uncertainty: str) -> ModelConfig:
    cfg = get_preset("lite").to_dict()
    cfg.update(height=64, width=192, uncertainty=uncertainty)
    return ModelConfig.from_dict(cfg)


def test_laplacian_nll_matches_hand_computation_and_is_minimised_at_the_residual():
    log_d = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    log_t = torch.tensor([1.2, 2.0]).view(1, 1, 1, 2)
    log_b = torch.tensor([math.log(0.1), math.log(0.5)]).view(1, 1, 1, 2)
    want = ((0.2 / 0.1 + math.log(0.1)) + (0.0 / 0.5 + math.log(0.5))) / 2
    assert float(laplacian_nll(log_d, log_t, log_b)) == pytest.approx(want, rel=1e-5)
    # Per pixel, |r| / b + log b is smallest at b = |r|.
    grid = torch.linspace(math.log(0.05), math.log(1.0), 301)
    nll = [float(laplacian_nll(torch.zeros(1), torch.full((1,), 0.3), g.view(1))) for g in grid]
    assert math.exp(float(grid[int(np.argmin(nll))])) == pytest.approx(0.3, rel=0.02)


def test_depth_std_is_the_first_order_std_of_a_log_laplacian():
    assert float(depth_std(torch.tensor(10.0), torch.tensor(math.log(0.1)))) == pytest.approx(10 * math.sqrt(2) * 0.1)
    # Against samples: log d ~ Laplace(log 20, b = 0.02) -> std(d) within 1 % of 20 sqrt(2) 0.02.
    rng = np.random.default_rng(0)
    d = 20.0 * np.exp(rng.laplace(0.0, 0.02, 400_000))
    assert d.std() == pytest.approx(float(depth_std(torch.tensor(20.0), torch.tensor(math.log(0.02)))), rel=0.01)


def test_head_output_is_the_published_uncertainty_and_its_gradient_stops_at_the_head():
    torch.manual_seed(0)
    model = DiffSQLDepth(small("head")).eval()
    x = torch.rand(2, 3, 64, 192)
    out = model(x)
    # Initial head: b = 0.1 everywhere, so std = depth sqrt(2) 0.1.
    assert torch.allclose(out["log_b"], torch.full_like(out["log_b"], math.log(0.1)))
    assert torch.allclose(out["uncertainty"], out["depth"] * math.sqrt(2) * 0.1, rtol=1e-5)
    torch.nn.init.normal_(model.uncertainty_head.net[-1].weight, std=1.0)
    out = model(x)
    assert out["log_b"].std() > 0.01
    head = set(id(p) for p in model.uncertainty_head.parameters())
    rest = [p for p in model.parameters() if id(p) not in head]
    grads = torch.autograd.grad(out["log_b"].sum(), rest, allow_unused=True)
    assert all(g is None for g in grads)  # the head never trains the depth network
    # The estimator (the node's path) publishes the head's std.
    est = DepthEstimator(model, model.cfg)
    frame = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    depth, unc = est.predict(frame)
    with torch.no_grad():
        ref = model(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255)
    assert np.allclose(unc, ref["uncertainty"][0, 0].numpy(), rtol=1e-4, atol=1e-5)
    assert "log_b" not in DiffSQLDepth(small("bins"))(x)


def test_config_pairs_the_head_with_its_teacher(tmp_path, capsys):
    from diffsql_model.train.cli import main

    with pytest.raises(ConfigError, match="uncertainty must be one of"):
        small("flip")
    cfg = str(kitti_config(tmp_path))
    none = f"loss.uncertainty_teacher={tmp_path}/none.pt"
    for sets, message in ((["model.uncertainty=head"], "set loss.uncertainty_teacher"),
                          ([none], "set model.uncertainty=head"),
                          (["model.uncertainty=head", none], "no checkpoint file")):
        argv = ["--config", cfg, "--out", str(tmp_path / "out")] + [f"--set={s}" for s in sets]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_self_teaching_trains_the_head_towards_the_teachers_disagreement(tmp_path):
    """Real KITTI frames: a 4-step teacher, then a student (another seed) whose head alone is
    trained against it on one batch (the residual stays put): its NLL falls and its b reaches the
    residual's size; the checkpoint reloads with the head."""
    from diffsql_model.train.trainer import Trainer

    torch.set_num_threads(1)
    run_cli("--config", kitti_config(tmp_path), "--out", tmp_path / "teacher")
    teacher = tmp_path / "teacher" / "last.pt"
    cfg = TrainConfig.load_yaml(kitti_config(tmp_path, optim={"lr": 2e-3}, runtime={"seed": 1})).with_overrides(
        ["model.uncertainty=head", f"loss.uncertainty_teacher={teacher}"])
    trainer = Trainer(cfg, tmp_path / "student")
    head = set(id(p) for p in trainer.model.uncertainty_head.parameters())
    for p in trainer.params:
        p.requires_grad_(id(p) in head)
    batch = trainer._to_device(next(iter(trainer.loader)))
    nll = []
    for _ in range(15):
        _, losses, _, _ = trainer.train_step(batch)
        nll.append(float(losses["uncertainty_nll"]))
    print([round(v, 3) for v in nll])
    assert min(nll[-3:]) < nll[0] - 0.2, nll
    # What the head learnt to predict: its b is the size of the student-teacher residual.
    with torch.no_grad():
        out = trainer.model(batch[("color_aug", 0)])
        t = trainer.teacher(batch[("color_aug", 0)])["depth"]
    r = (out["depth"].log() - out["depth"].log().mean((2, 3), keepdim=True)
         - t.log() + t.log().mean((2, 3), keepdim=True)).abs()
    b = out["log_b"].exp()
    assert 0.5 < float(b.mean() / r.mean()) < 2.0
    path = trainer.save("head.pt")
    model, mcfg = load_model(path)
    assert mcfg.uncertainty == "head" and model.uncertainty_head is not None
