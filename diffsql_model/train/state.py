"""What a training checkpoint holds beyond the weights: RNG states (as plain tensors/lists, so
`torch.load(weights_only=True)` accepts them) and the checks made before resuming."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..checkpoint import CheckpointError


def rng_state(device: torch.device | None = None) -> dict:
    """python / numpy / torch generator states in weights_only-loadable form, plus the CUDA
    generator of `device` when it is a GPU: this process's own only, since reading every GPU's
    state would open a context on each of them from every rank."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore `rng_state`'s generators; the CUDA one goes to `device` (when it is a GPU)."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(v) for v in py_state.tolist()), py_gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def check_resumable(state: dict, path, model_config: dict, frame_ids: list) -> None:
    """A checkpoint must come from a run of the same model and frames to be resumed."""
    for key in ("optimizer", "step", "epoch", "train_config"):
        if key not in state:
            raise CheckpointError(f"{path}: not a training checkpoint (no {key!r}); "
                                  "use it as model weights, not with --resume")
    if state["model_config"] != model_config:
        diff = sorted(k for k in set(model_config) | set(state["model_config"])
                      if model_config.get(k) != state["model_config"].get(k))
        raise CheckpointError(f"{path}: checkpoint model config differs from this run's in {diff}; "
                              "resume with the config it was trained with or start a new --out")
    saved_ids = state["train_config"].get("data", {}).get("frame_ids")
    if saved_ids is not None and [str(f) for f in saved_ids] != [str(f) for f in frame_ids]:
        raise CheckpointError(f"{path}: trained with frame_ids {saved_ids}, this run uses {frame_ids}")
    if ("pose_net" in state) != any(f != "s" for f in frame_ids[1:]):
        raise CheckpointError(f"{path}: PoseNet presence differs from this run's frame ids {frame_ids}")
