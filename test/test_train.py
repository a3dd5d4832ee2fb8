"""Training: config, a loss that goes down, checkpoints (contents, resume after SIGKILL, bad files),
a non-finite loss stopping the run, batched validation, RNG state, and (slow) the lite model
learning depth on synthetic drives. Multi-process runs: test_train_ddp.py."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import KITTI_RAW, ROOT
from diffsql_model.checkpoint import load_checkpoint, load_model
from diffsql_model.train.config import TrainConfig, resolve_model_config
from diffsql_model.yaml_config import ConfigError

PY = sys.executable
DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"  # real KITTI frames 0-6, both cameras


def kitti_config(tmp_path: pathlib.Path, **sections) -> pathlib.Path:
    """A small training YAML on the real KITTI sample (triplet centres 1-5, both cameras)."""
    split = tmp_path / "train.txt"
    split.write_text("".join(f"{DRIVE} {f} {s}\n" for f in range(1, 6) for s in "lr"))
    cfg = {
        "name": "test",
        "model": {"preset": "lite", "overrides": {"height": 64, "width": 192}},
        "data": {"kind": "kitti", "root": str(KITTI_RAW), "train_split": str(split)},
        "optim": {"batch_size": 2, "max_steps": 4},
        "runtime": {"device": "cpu", "num_workers": 0, "checkpoint_every": 2, "val_every": 0,
                    "log_every": 1, "image_every": 2, "progress": False},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args, check=True, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([PY, "-m", "diffsql_model.train.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"diffsql-train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_every_shipped_config_loads_and_resolves():
    paths = sorted((ROOT / "config" / "train").glob("*.yaml"))
    assert len(paths) >= 4
    needs_sd_folder = []
    for path in paths:
        cfg = TrainConfig.load_yaml(path)
        try:
            model_cfg = resolve_model_config(cfg.model)
        except ConfigError as e:  # full-size SD: refused without the user's SD folder
            assert "sd.pretrained_path is not set" in str(e), (path, e)
            needs_sd_folder.append(path.name)
            model_cfg = resolve_model_config(cfg.with_overrides(["model.sd.allow_random_weights=true"]).model)
        assert model_cfg.height % 32 == 0 and cfg.data.frame_ids[0] == 0
    assert needs_sd_folder == ["kitti_diffsql_r50_m.yaml"]
    ms = TrainConfig.load_yaml(ROOT / "config" / "train" / "kitti_ms.yaml")
    assert ms.data.stereo and ms.data.temporal_ids == [-1, 1]
    assert TrainConfig.load_yaml(ROOT / "config" / "train" / "kitti_m.yaml").optim.lr == 1e-4


def test_overrides_route_model_fields_and_reject_typos():
    cfg = TrainConfig().with_overrides(["model.height=96", "model.sd.timestep=3", "optim.lr=2e-4"])
    assert cfg.model.overrides == {"height": 96, "sd": {"timestep": 3}}
    model_cfg = resolve_model_config(cfg.model)
    assert (model_cfg.height, model_cfg.sd.timestep, model_cfg.num_bins) == (96, 3, 32)  # lite keeps 32 bins
    assert cfg.optim.lr == 2e-4
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig().with_overrides(["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="multiples of 32"):
        resolve_model_config(TrainConfig().with_overrides(["model.height=100"]).model)
    with pytest.raises(ConfigError, match="start with 0"):
        TrainConfig.from_dict({"data": {"frame_ids": [-1, 0, 1]}})
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.from_dict({"runtime": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="sync_every"):
        TrainConfig.from_dict({"runtime": {"sync_every": 0}})


@pytest.mark.parametrize("frames", [[0, -1, 1], [0, -1, 1, "s"]], ids=["M", "MS"])
def test_loss_decreases_on_a_fixed_batch(tmp_path, frames):
    """Real KITTI triplets: 8 Adam steps on one batch cut the self-supervised loss clearly."""
    from diffsql_model.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig.load_yaml(kitti_config(tmp_path, data={"frame_ids": frames},
                                             optim={"lr": 5e-4, "batch_size": 2}))
    trainer = Trainer(cfg, tmp_path / "out")
    batch = trainer._to_device(next(iter(trainer.loader)))
    assert ("color", "s") in batch if "s" in frames else ("color", "s") not in batch
    losses = []
    for _ in range(8):
        _, out, t_fwd, t_bwd = trainer.train_step(batch)
        assert isinstance(t_fwd, float) and isinstance(t_bwd, float) and t_fwd > 0 and t_bwd > 0
        losses.append(float(out["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    print(frames, [round(v, 4) for v in losses])
    assert min(losses[-2:]) < 0.8 * losses[0], losses


def test_run_writes_checkpoint_logs_and_summary(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("--config", kitti_config(tmp_path), "--out", out)
    assert "waiting for data" in proc.stdout
    state = torch.load(out / "last.pt", weights_only=True)  # plain data only: RNG states included
    assert state["step"] == 4 and state["epoch"] == 0 and state["batch_in_epoch"] == 4
    assert {"model", "pose_net", "optimizer", "scheduler", "rng", "model_config", "train_config"} <= set(state)
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["train_config"]["optim"]["max_steps"] == 4
    model, model_cfg = load_model(out / "last.pt")
    assert (model_cfg.height, model_cfg.width) == (64, 192)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 192))["depth"].shape == (1, 1, 64, 192)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and 0.0 <= summary["data_wait_fraction"] < 1.0 and summary["images_per_s"] > 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]), size_guidance={"images": 0}).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "speed/data_wait_fraction" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("train/input_depth_uncertainty")] == [2, 4]
    # Without --resume an existing run is never overwritten.
    again = run_cli("--config", kitti_config(tmp_path), "--out", out, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_autocast_step_runs_the_network_in_low_precision_and_updates(tmp_path):
    from diffsql_model.train.trainer import Trainer

    precision = "bf16"  # fp16 needs CUDA loss scaling: on CPU most of its gradients underflow
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(TrainConfig.load_yaml(kitti_config(tmp_path, runtime={"precision": "fp16"})), tmp_path / "x")
    cfg = TrainConfig.load_yaml(kitti_config(tmp_path, runtime={"precision": precision}))
    seen, losses, changed = one_step(Trainer(cfg, tmp_path / "out"))
    assert seen == [torch.bfloat16]  # the network ran under autocast
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])  # loss in fp32
    assert changed > 0.5


def one_step(trainer):
    """One training step on the first batch: (dtypes the decoder produced, losses, fraction of
    parameter tensors the step changed); checks the master weights stayed fp32."""
    batch = trainer._to_device(next(iter(trainer.loader)))
    seen = []
    hook = trainer.model.decoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in trainer.params]
    _, losses, _, _ = trainer.train_step(batch)
    hook.remove()
    assert all(p.dtype == torch.float32 for p in trainer.params)  # master weights stay fp32
    return seen, losses, sum(not torch.equal(a, p) for a, p in zip(before, trainer.params)) / len(before)


def test_non_finite_loss_stops_the_run_with_its_step_and_saves_nothing(tmp_path, capsys):
    """A NaN smoothness weight makes the loss NaN from step 1: diffsql-train goes on to the next
    agreement step, before the step-2 checkpoint, and exits 1 naming step 1; nothing is saved."""
    from diffsql_model.train.cli import main

    torch.set_num_threads(1)
    config = kitti_config(tmp_path, runtime={"checkpoint_every": 2})
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out), "--set", "loss.smoothness=.nan"]) == 1
    err = capsys.readouterr().err
    assert "loss is not finite (NaN or inf) at step 1 on rank 0" in err, err
    assert not (out / "last.pt").exists()
    # The step with non-finite gradients leaves the weights as they were.
    from diffsql_model.train.trainer import Trainer

    trainer = Trainer(TrainConfig.load_yaml(config).with_overrides(["loss.smoothness=.nan"]), out)
    before = [p.detach().clone() for p in trainer.params]
    _, losses, _, _ = trainer.train_step(trainer._to_device(next(iter(trainer.loader))))
    assert not torch.isfinite(losses["loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))


def test_batched_validation_matches_frame_by_frame(kitti_raw):
    """12 real KITTI frames with LiDAR depth: batches of 8 (8 + 4) and 5 give the per-frame
    metrics of one frame at a time."""
    from diffsql_model.depth_net import DiffSQLDepth
    from diffsql_model.data.kitti import KittiRawDataset
    from diffsql_model.presets import get_preset
    from diffsql_model.train.validate import validate

    torch.set_num_threads(1)
    lines = [f"2011_09_26/2011_09_26_drive_0001_sync {f} {s}" for f in range(6) for s in "lr"]
    val_set = KittiRawDataset(kitti_raw, lines, 64, 192, frame_ids=[0], is_train=False, load_depth=True)
    torch.manual_seed(0)
    model = DiffSQLDepth.from_config(get_preset("lite", height=64, width=192)).train()
    one = validate(model, val_set, torch.device("cpu"), batch_size=1)
    assert one["frames"] == 12 and model.training  # train mode restored
    for batch_size in (8, 5):
        batched = validate(model, val_set, torch.device("cpu"), batch_size=batch_size)
        assert batched.keys() == one.keys()
        for key, value in one.items():
            assert batched[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (batch_size, key)
    assert validate(model, val_set, torch.device("cpu"), max_frames=5, batch_size=8)["frames"] == 5


def test_rng_state_restores_every_generator_and_loads_weights_only(tmp_path):
    import random

    import numpy as np

    from diffsql_model.train.state import rng_state, set_rng_state

    cpu = torch.device("cpu")
    torch.save(rng_state(cpu), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert "cuda" not in state  # a CPU run stores no GPU generator
    set_rng_state(state, cpu)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_only_modules_with_running_stats_sync_buffers_every_forward():
    import torch.nn as nn

    from diffsql_model.pose_net import PoseNet
    from diffsql_model.train.distributed import has_running_stats

    assert has_running_stats(PoseNet(18))  # ResNet BatchNorm
    assert not has_running_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)))
    assert not has_running_stats(nn.BatchNorm2d(8, track_running_stats=False))


def _params(path) -> dict:
    state = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"pose.{k}": v for k, v in state["pose_net"].items()}}


def test_resume_continues_step_epoch_and_optimizer(tmp_path, capsys):
    from diffsql_model.train.cli import main

    torch.set_num_threads(1)
    config = kitti_config(tmp_path, optim={"max_steps": 2})
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 0
    first = load_checkpoint(out / "last.pt")
    assert main(["--config", str(config), "--out", str(out), "--resume", "--set", "optim.max_steps=6"]) == 0
    assert f"at step 2 (epoch 0)" in capsys.readouterr().out
    state = load_checkpoint(out / "last.pt")
    # 10 samples / batch 2 = 5 steps an epoch: step 6 is the first step of epoch 1.
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 1)
    assert state["scheduler"]["last_epoch"] == 1
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6.0}  # Adam's moments continued from the checkpoint, not restarted
    assert {float(s["step"]) for s in first["optimizer"]["state"].values()} == {2.0}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """Kill -9 mid-run after a checkpoint; --resume continues from that step and ends with the
    same weights and optimizer state as a run never interrupted (same seed, 1 thread)."""
    config = kitti_config(tmp_path, optim={"max_steps": 1000}, runtime={"checkpoint_every": 2})
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([PY, "-m", "diffsql_model.train.cli", "--config", str(config), "--out", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_step = 0
    deadline = time.time() + 120
    while time.time() < deadline and ckpt_step < 4:
        time.sleep(0.2)
        if (killed / "last.pt").exists():
            ckpt_step = load_checkpoint(killed / "last.pt")["step"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_step >= 4, proc.stderr.read().decode()[-2000:]
    ckpt_step = load_checkpoint(killed / "last.pt")["step"]  # it may have written one more
    final = ckpt_step + 3  # crosses the epoch end (5 batches) and the lr scheduler step
    resumed = run_cli("--config", config, "--out", killed, "--resume", "--set", f"optim.max_steps={final}")
    assert f"resumed from {killed / 'last.pt'} at step {ckpt_step}" in resumed.stdout
    straight = tmp_path / "straight"
    run_cli("--config", config, "--out", straight, "--set", f"optim.max_steps={final}")
    a, b = load_checkpoint(killed / "last.pt"), load_checkpoint(straight / "last.pt")
    assert a["step"] == b["step"] == final and a["epoch"] == b["epoch"]
    pa, pb = _params(killed / "last.pt"), _params(straight / "last.pt")
    assert pa.keys() == pb.keys()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=1e-6, msg=key)
    exp_a = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    exp_b = [s["exp_avg"] for s in b["optimizer"]["state"].values()]
    for x, y in zip(exp_a, exp_b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert a["scheduler"] == b["scheduler"]


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path, capsys):
    from diffsql_model.train.cli import main

    torch.set_num_threads(1)
    config = kitti_config(tmp_path, optim={"max_steps": 2})
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 0
    good = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["--config", str(config), "--out", str(out), "--resume", "--set", "model.num_bins=48",
                 "--set", "optim.max_steps=3"]) == 1
    err = capsys.readouterr().err
    assert "model config differs" in err and "num_bins" in err
    assert main(["--config", str(config), "--out", str(out), "--resume", "--set", "data.frame_ids=[0, 1]",
                 "--set", "optim.max_steps=3"]) == 1
    assert "frame_ids" in capsys.readouterr().err
    (out / "last.pt").write_bytes(good[: len(good) // 2])
    assert main(["--config", str(config), "--out", str(out), "--resume"]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == good[: len(good) // 2]  # nothing overwritten
    assert main(["--config", str(config), "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--config", str(config), "--set", "optim.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


# (frame ids, training drives, steps, AbsRel bound as a fraction of the untrained model's, d1 bound).
# Measured (seed 0, shipped config, LayerNorm before Eq. 7, 2 threads), untrained 0.400 / d1 0.343:
#   stereo, 4 drives: 0.172 at step 300 (d1 0.799), 136 s. Without the LayerNorm: 0.180; before
#     the 1/sqrt(E) scaling: 0.186; a constant-depth model stays at 0.398.
#   monocular (PoseNet, depth normalisation), 12 drives: 0.267 @300, 0.248 @700 (d1 0.726),
#     0.231 @1000, 0.223 @1100; ~0.86 s a step.
LEARNING_RUNS = {
    "stereo": (["0", "s"], 4, 300, 0.6, 0.7),
    "monocular": (["0", "-1", "1"], 12, 700, 0.7, 0.65),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(LEARNING_RUNS))
def test_lite_learns_depth_on_synthetic_drives(tmp_path, mode):
    """The proof that training works: lite, trained by `diffsql-train` with
    config/train/synthetic_lite.yaml on rendered drives, stereo or monocular, predicts the depth
    of a drive it never trained on far better than the untrained model (AbsRel with per-image
    median scaling)."""
    from diffsql_model.train.datasets import build_datasets
    from diffsql_model.data.synthetic_kitti import make_synthetic_kitti
    from diffsql_model.train.validate import validate

    frame_ids, drives, steps, rel_bound, d1_bound = LEARNING_RUNS[mode]
    torch.set_num_threads(2)
    data = make_synthetic_kitti(tmp_path / "synthetic", train_seeds=tuple(range(drives)))
    sets = [f"data.{k}={v}" for k, v in data.items()] + [f"data.frame_ids=[{', '.join(frame_ids)}]"]
    config = ROOT / "config" / "train" / "synthetic_lite.yaml"
    cfg = TrainConfig.load_yaml(config).with_overrides(sets)
    assert cfg.data.frame_ids[1:] == ([-1, 1] if mode == "monocular" else ["s"])
    model_cfg = resolve_model_config(cfg.model)
    _, val_set = build_datasets(cfg.data, model_cfg)
    torch.manual_seed(cfg.runtime.seed)
    from diffsql_model.depth_net import DiffSQLDepth

    untrained = validate(DiffSQLDepth.from_config(model_cfg), val_set, torch.device("cpu"), crop="none")
    args = ["--config", config, "--out", tmp_path / "run", "--set", f"optim.max_steps={steps}",
            "--set", "optim.time_budget_s=0", "--set", "runtime.progress=false"]
    for s in sets:
        args += ["--set", s]
    t0 = time.time()
    run_cli(*args, env_extra={"OMP_NUM_THREADS": "2"}, timeout=7200)
    seconds = time.time() - t0
    model, _ = load_model(tmp_path / "run" / "last.pt")
    trained = validate(model, val_set, torch.device("cpu"), crop="none")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(f"{mode}: held-out synthetic drive AbsRel: untrained {untrained['abs_rel']:.3f} -> trained "
          f"{trained['abs_rel']:.3f} after {steps} steps ({summary['train_seconds']:.0f} s training, "
          f"{seconds:.0f} s with start-up); d1 {untrained['a1']:.3f} -> {trained['a1']:.3f}")
    assert trained["frames"] == untrained["frames"] == 8
    assert trained["abs_rel"] < rel_bound * untrained["abs_rel"]
    assert trained["a1"] > d1_bound


@pytest.mark.slow
def test_monocular_learns_on_a_held_out_world(tmp_path):
    """Issue 11's target on a world nothing was tuned on (heldout_downtown): `diffsql-train` with
    config/train/synthetic_m.yaml (M: PoseNet, no ImageNet, 64x192, batch 4) reaches AbsRel <= 0.25
    on a training drive and <= 0.30 on a held-out drive within MONO_WORLD_STEPS (below), before
    the lr decay. Measured with bench/mono_learning.py on the same data: 0.189 / 0.240 at step 750."""
    from diffsql_model.data.kitti import KittiRawDataset
    from diffsql_model.data.synthetic_kitti import DATE, make_synthetic_kitti, write_split
    from diffsql_model.train.datasets import WithDepthPng
    from diffsql_model.train.validate import validate

    frames = 38
    data = make_synthetic_kitti(tmp_path / "world", train_seeds=tuple(range(12)), val_seed=500,
                                num_frames=frames, width=384, height=128, val_frames=frames,
                                world="heldout_downtown")
    write_split(tmp_path / "train_drive.txt", DATE, f"{DATE}_drive_0001_sync", range(frames))
    sets = [f"data.{k}={v}" for k, v in data.items()]
    args = ["--config", ROOT / "config" / "train" / "synthetic_m.yaml", "--out", tmp_path / "run",
            "--set", f"optim.max_steps={MONO_WORLD_STEPS}", "--set", "runtime.progress=false"]
    for s in sets:
        args += ["--set", s]
    run_cli(*args, env_extra={"OMP_NUM_THREADS": "2"}, timeout=7200)
    model, cfg = load_model(tmp_path / "run" / "last.pt")

    def abs_rel(split):
        base = KittiRawDataset(data["root"], split, height=cfg.height, width=cfg.width, frame_ids=[0],
                               is_train=False)
        return validate(model, WithDepthPng(base, data["depth_root"]), torch.device("cpu"),
                        max_frames=0, crop="none")["abs_rel"]

    train_drive, held_out = abs_rel(tmp_path / "train_drive.txt"), abs_rel(data["val_split"])
    print(f"heldout_downtown, {MONO_WORLD_STEPS} steps: training drive {train_drive:.3f}, held-out {held_out:.3f}")
    assert train_drive <= 0.25 and held_out <= 0.30


# With PoseNet's forward prior (model.pose_prior, the default) the benchmark on this world's data
# gave 0.241 / 0.313 at step 250, 0.217 / 0.246 at 500 and 0.189 / 0.240 at 750 (constant lr;
# docs/benchmarks.md); without it, 0.221 / 0.271 at 750 and 0.201 / 0.203 only after the decay.
# This test (diffsql-train, 2 threads) gave 0.182 / 0.230 in 1963 s, beside a CI run (2026-12-02).
MONO_WORLD_STEPS = 1000
