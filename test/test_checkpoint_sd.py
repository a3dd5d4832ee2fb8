"""Checkpoints of SD models: frozen SD is never in the file: loaded from a folder it is reloaded
from the folder (or an `sd_path` override), built at random it is rebuilt from its seed;
trainable SD stays in the file."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import KITTI_RAW
from diffsql_model.checkpoint import (SD_EXTERNAL, SD_INCLUDED, SD_SEEDED, CheckpointError,
                                      load_checkpoint, load_model, model_state, save_checkpoint)
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.presets import get_preset

H, W = 64, 192
DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"
SD_PREFIXES = ("sd.vae.", "sd.unet.", "sd.null_text")


def tiny_model(sd_dir=None, frozen=True, seed=0):
    torch.manual_seed(seed)
    sd = {"frozen": frozen, "pretrained_path": str(sd_dir) if sd_dir else None}
    return DiffSQLDepth.from_config(get_preset("tiny_sd", height=H, width=W, sd=sd)).eval()


def save(model, path):
    return save_checkpoint(path, {"model_config": model.cfg.to_dict(), **model_state(model)})


@pytest.fixture(scope="module")
def image():
    """One real KITTI frame, network size, 1 x 3 x H x W in [0, 1]."""
    path = KITTI_RAW / DRIVE / "image_02/data/0000000001.png"
    img = Image.open(path).convert("RGB").resize((W, H), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def depth(model, image):
    with torch.no_grad():
        return model(image)["depth"]


def test_frozen_sd_from_folder_is_left_out_and_checkpoint_is_smaller(tmp_path, tiny_sd_dir):
    model = tiny_model(tiny_sd_dir)
    small = save(model, tmp_path / "small.pt")
    full = save_checkpoint(tmp_path / "full.pt", {"model_config": model.cfg.to_dict(),
                                                  "model": model.state_dict()})
    state = load_checkpoint(small)
    assert state["sd_weights"] == SD_EXTERNAL
    assert not [k for k in state["model"] if k.startswith(SD_PREFIXES)]
    assert any(k.startswith("sd.fusion.") for k in state["model"])  # trainable SD part is kept
    # Exactly the SD VAE/UNet/null-text keys are recorded as omitted, nothing else is lost.
    all_keys = set(model.state_dict())
    assert set(state["sd_omitted_keys"]) == {k for k in all_keys if k.startswith(SD_PREFIXES)}
    assert set(state["sd_omitted_keys"]) | set(state["model"]) == all_keys
    omitted_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                        if k.startswith(SD_PREFIXES))
    saved = full.stat().st_size - small.stat().st_size
    assert omitted_bytes > 1_000_000  # the tiny SD still holds ~1.5 MB of float32 weights
    assert saved >= omitted_bytes  # the file shrinks by at least the omitted tensors
    # ... and holds little more than the kept tensors (no SD hiding elsewhere in it).
    kept_bytes = sum(v.numel() * v.element_size() for v in state["model"].values())
    assert small.stat().st_size < 1.02 * kept_bytes + 256_000


def test_load_model_reloads_sd_from_folder_with_identical_outputs(tmp_path, tiny_sd_dir, image):
    model = tiny_model(tiny_sd_dir, seed=3)
    ckpt = save(model, tmp_path / "m.pt")
    loaded, cfg = load_model(ckpt)
    assert cfg.sd.pretrained_path == str(tiny_sd_dir)
    assert not loaded.training
    torch.testing.assert_close(depth(loaded, image), depth(model, image), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_missing_sd_folder_is_a_clear_error_and_sd_path_overrides(tmp_path, tiny_sd_dir, image):
    moved = tmp_path / "sd_on_training_machine"
    shutil.copytree(tiny_sd_dir, moved)
    model = tiny_model(moved, seed=4)
    ckpt = save(model, tmp_path / "m.pt")
    expected = depth(model, image)
    shutil.rmtree(moved)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    assert str(moved) in str(err.value) and "sd_path" in str(err.value)
    with pytest.raises(CheckpointError, match="sd_path"):
        load_model(ckpt, sd_path=tmp_path / "nowhere")
    # The robot's own copy of the same SD folder, elsewhere.
    loaded, cfg = load_model(ckpt, sd_path=tiny_sd_dir)
    assert cfg.sd.pretrained_path == str(tiny_sd_dir)
    torch.testing.assert_close(depth(loaded, image), expected, rtol=0, atol=0)


def test_external_sd_checkpoint_still_loads_the_rest_strictly(tmp_path, tiny_sd_dir):
    model = tiny_model(tiny_sd_dir)
    state = {"model_config": model.cfg.to_dict(), **model_state(model)}
    dropped = next(k for k in state["model"] if k.startswith("sd.fusion."))
    del state["model"][dropped]
    save_checkpoint(tmp_path / "missing.pt", state)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "missing.pt")
    state = {"model_config": model.cfg.to_dict(), **model_state(model)}
    state["model"]["decoder.extra.weight"] = torch.zeros(1)
    save_checkpoint(tmp_path / "extra.pt", state)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(tmp_path / "extra.pt")
    # A folder whose SD has other keys than the one trained with (here: a recorded key gone).
    state = {"model_config": model.cfg.to_dict(), **model_state(model)}
    state["sd_omitted_keys"] = state["sd_omitted_keys"][:-1]
    save_checkpoint(tmp_path / "other_sd.pt", state)
    with pytest.raises(CheckpointError, match="SD folder"):
        load_model(tmp_path / "other_sd.pt")


def test_trainable_sd_keeps_its_weights(tmp_path, tiny_sd_dir, image):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, folder)
    model = tiny_model(folder, frozen=False, seed=5)
    with torch.no_grad():  # a trained SD differs from its folder: the checkpoint must carry it
        model.sd.unet.conv_in.weight.add_(0.5)
    ckpt = save(model, tmp_path / "m.pt")
    state = load_checkpoint(ckpt)
    assert state["sd_weights"] == SD_INCLUDED and state["sd_omitted_keys"] == []
    assert set(state["model"]) == set(model.state_dict())
    shutil.rmtree(folder)  # not needed to load: everything is in the file
    loaded, _ = load_model(ckpt)
    assert torch.equal(loaded.sd.unet.conv_in.weight, model.sd.unet.conv_in.weight)
    torch.testing.assert_close(depth(loaded, image), depth(model, image), rtol=0, atol=0)


def test_frozen_random_sd_is_rebuilt_from_its_seed_not_stored(tmp_path, image):
    model = tiny_model(None, frozen=True, seed=5)
    ckpt = save(model, tmp_path / "m.pt")
    state = load_checkpoint(ckpt)
    assert state["sd_weights"] == SD_SEEDED and state["sd_seed"] == model.sd.weights_seed
    assert not [k for k in state["model"] if k.startswith(SD_PREFIXES)]
    assert set(state["sd_omitted_keys"]) | set(state["model"]) == set(model.state_dict())
    other = tiny_model(None, frozen=True, seed=6)  # another global seed: other SD weights
    assert other.sd.weights_seed != model.sd.weights_seed
    assert not torch.equal(other.sd.unet.conv_in.weight, model.sd.unet.conv_in.weight)
    loaded, _ = load_model(ckpt)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(depth(loaded, image), depth(model, image), rtol=0, atol=0)
    # A rebuild that does not reproduce the weights (other library versions) is refused.
    state["sd_fingerprint"] += 1.0
    save_checkpoint(tmp_path / "drift.pt", state)
    with pytest.raises(CheckpointError, match="rebuilt from the stored seed differ"):
        load_model(tmp_path / "drift.pt")


def test_training_checkpoint_and_optimizer_leave_frozen_sd_out_and_resume(tmp_path, tiny_sd_dir):
    from diffsql_model.train.config import TrainConfig
    from diffsql_model.train.trainer import Trainer

    split = tmp_path / "train.txt"
    split.write_text("".join(f"{DRIVE} {f} l\n" for f in range(1, 5)))
    raw = {
        "name": "sd_ckpt",
        "model": {"preset": "tiny_sd", "overrides": {"height": H, "width": W,
                                                     "sd": {"pretrained_path": str(tiny_sd_dir)}}},
        "data": {"kind": "kitti", "root": str(KITTI_RAW), "train_split": str(split), "frame_ids": [0, "s"]},
        "optim": {"batch_size": 2, "max_steps": 2},
        "runtime": {"device": "cpu", "num_workers": 0, "checkpoint_every": 1, "val_every": 0,
                    "log_every": 1, "image_every": 0, "progress": False},
    }
    cfg = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(raw)))
    out = tmp_path / "out"
    trainer = Trainer(cfg, out)
    sd_params = {id(p) for n, p in trainer.model.named_parameters() if n.startswith(SD_PREFIXES)}
    assert sd_params and not sd_params & {id(p) for p in trainer.params}
    trainer.cfg.optim.max_steps = 1
    trainer.run()
    state = load_checkpoint(out / "last.pt")
    assert state["sd_weights"] == SD_EXTERNAL
    assert not [k for k in state["model"] if k.startswith(SD_PREFIXES)]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    group_params = [i for g in state["optimizer"]["param_groups"] for i in g["params"]]
    assert len(group_params) == len(trainable)  # stereo only: no PoseNet, so model params only
    assert len(state["optimizer"]["state"]) == len(trainable)  # Adam moments: trainable only
    # Resume rebuilds SD from the folder and loads the rest strictly.
    cfg.optim.max_steps = 2
    resumed = Trainer(cfg, out, resume=True)
    assert resumed.step == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


@pytest.mark.ros
def test_depth_node_sd_path_parameter(tmp_path, tiny_sd_dir):
    """A real depth node: without the SD folder it refuses to start and names `sd_path`; with the
    `sd_path` parameter pointing at a local copy it loads the checkpoint and comes up."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    moved = tmp_path / "sd_on_training_machine"
    shutil.copytree(tiny_sd_dir, moved)
    ckpt = save(tiny_model(moved), tmp_path / "m.pt")
    shutil.rmtree(moved)
    cmd = [sys.executable, "-m", "diffsql_ros.depth_node", "--ros-args", "--params-file",
           str(ROOT / "config" / "depth.yaml"), "-p", f"checkpoint:={ckpt}", "-p", "device:=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=90)
    assert failed.returncode == 1, failed.stderr
    assert str(moved) in failed.stderr and "sd_path" in failed.stderr and "Traceback" not in failed.stderr

    log = tmp_path / "node.log"
    with open(log, "w") as f:
        node = subprocess.Popen(cmd + ["-p", f"sd_path:={tiny_sd_dir}"], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + 90
        while f"loaded {ckpt}" not in log.read_text() and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"loaded {ckpt}" in log.read_text(), log.read_text()[-3000:]
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(timeout=30)
