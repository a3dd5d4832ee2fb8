"""DistributedDataParallel training: two CPU processes (gloo) train a few steps on different data
shards and end with identical replicas (also with a trainable SD); only rank 0 writes the
checkpoint; stop decisions (time budget, non-finite loss) taken on one rank stop both at the same
step instead of leaving the other waiting in a collective.

Every wait is bounded: collectives time out after COLLECTIVE_TIMEOUT, and a test whose workers
are still running after WAIT_S fails and kills them, so a hang fails instead of blocking CI."""
from __future__ import annotations

import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import KITTI_RAW

DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"
WAIT_S = 120
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: str, preset: str = "lite", sd: dict | None = None, optim: dict | None = None,
            runtime: dict | None = None, frame_ids=(0, -1, 1)) -> dict:
    overrides = {"height": 64, "width": 192, **({"sd": sd} if sd else {})}
    return {
        "model": {"preset": preset, "overrides": overrides},
        "data": {"kind": "kitti", "root": str(KITTI_RAW), "train_split": os.path.join(tmp, "train.txt"),
                 "frame_ids": list(frame_ids)},
        "optim": {"batch_size": 2, "max_steps": 3, "lr": 1e-3, **(optim or {})},
        "runtime": {"device": "cpu", "num_workers": 0, "checkpoint_every": 3, "val_every": 0,
                    "progress": False, "seed": 5, **(runtime or {})},
    }


class NanAtCall:
    """A loss function whose loss is NaN on its `bad_call`-th call (1-based), gradients too."""

    def __init__(self, loss_fn, bad_call: int):
        self.loss_fn, self.bad_call, self.calls = loss_fn, bad_call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        losses = self.loss_fn(*args, **kwargs)
        if self.calls == self.bad_call:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses


def _worker(rank: int, world: int, port: int, tmp: str, configs: list, nan_at: dict) -> None:
    """Train `configs[rank]`; save the end state (or the error) to tmp/rank<rank>.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from diffsql_model.train.config import TrainConfig
    from diffsql_model.train.distributed import init_from_env, shutdown
    from diffsql_model.train.trainer import Trainer

    ctx = init_from_env("cpu", timeout=COLLECTIVE_TIMEOUT)
    try:
        trainer = Trainer(TrainConfig.from_dict(configs[rank]), os.path.join(tmp, "out"), ctx=ctx)
        if str(rank) in nan_at:
            trainer.loss_fn = NanAtCall(trainer.loss_fn, nan_at[str(rank)])
        shard = list(iter(trainer.sampler))
        sd_start = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if k.startswith("sd.")}
        try:
            summary = trainer.run()
        except FloatingPointError as e:
            summary = {"step": trainer.step, "error": str(e)}
        # Parameters only: BatchNorm running statistics are per replica between DDP's buffer
        # broadcasts (rank 0's are copied to all at the start of each forward).
        nets = [("model", trainer.model)] + ([("pose", trainer.pose_net)] if trainer.pose_net else [])
        params = {part: {k: v.detach().clone() for k, v in net.named_parameters()} for part, net in nets}
        sync_buffers = {part: ddp.forward_sync_buffers for part, ddp in
                        (("model", trainer.ddp_model), ("pose", trainer.ddp_pose)) if ddp is not None}
        torch.save({**params, "sd_start": sd_start, "shard": shard,
                    "summary": json.dumps(summary, default=float), "forward_sync_buffers": sync_buffers},
                   os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        shutdown(ctx)


def run_two_ranks(tmp_path, configs: list, nan_at: dict | None = None) -> tuple[list, float]:
    """Spawn the two workers, wait at most WAIT_S; ([rank 0 result, rank 1 result], seconds)."""
    (tmp_path / "train.txt").write_text("".join(f"{DRIVE} {f} {s}\n" for f in range(1, 6) for s in "lr"))
    t0 = time.monotonic()
    context = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), configs, nan_at or {}),
                       nprocs=2, join=False)
    try:
        while not context.join(timeout=max(t0 + WAIT_S - time.monotonic(), 0.1)):
            if time.monotonic() > t0 + WAIT_S:
                pytest.fail(f"DDP workers still running after {WAIT_S} s: a rank is stuck in a collective")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join(10)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        r["summary"] = json.loads(r["summary"])
    return results, time.monotonic() - t0


def assert_identical_params(r0: dict, r1: dict, parts=("model", "pose")) -> None:
    for part in parts:
        assert r0[part].keys() == r1[part].keys()
        for key in r0[part]:
            torch.testing.assert_close(r0[part][key], r1[part][key], rtol=0, atol=0, msg=f"{part}.{key}")


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    cfg = _config(str(tmp_path))
    (r0, r1), _ = run_two_ranks(tmp_path, [cfg, cfg])
    assert r0["summary"]["step"] == r1["summary"]["step"] == 3
    assert not set(r0["shard"]) & set(r1["shard"])  # each rank trains on its own samples
    # The ResNet encoders' BatchNorm running statistics: buffers that must be broadcast.
    assert r0["forward_sync_buffers"] == {"model": True, "pose": True}
    assert_identical_params(r0, r1)
    torch.manual_seed(5)
    from diffsql_model.depth_net import DiffSQLDepth
    from diffsql_model.train.config import TrainConfig, resolve_model_config

    init = DiffSQLDepth.from_config(resolve_model_config(TrainConfig.from_dict(cfg).model)).state_dict()
    changed = sum(v.is_floating_point() and not torch.equal(v, init[k]) for k, v in r0["model"].items())
    assert changed > 10  # the replicas trained (and from the same start: seed 5)
    ckpt = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    for key, value in r0["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=0, atol=0)


# The stop tests train on stereo pairs: no PoseNet, a cheaper step; the decisions are the same.
STEREO = (0, "s")


def test_time_budget_spent_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """Rank 0 is out of time after its first step, rank 1 has no budget: both stop at the first
    agreement step (2), and the checkpoint is written there."""
    optim, runtime = {"max_steps": 8}, {"sync_every": 2, "checkpoint_every": 8}
    configs = [_config(str(tmp_path), optim={**optim, "time_budget_s": 1e-6}, runtime=runtime,
                       frame_ids=STEREO),
               _config(str(tmp_path), optim={**optim, "time_budget_s": 0}, runtime=runtime,
                       frame_ids=STEREO)]
    (r0, r1), seconds = run_two_ranks(tmp_path, configs)
    print(f"two ranks stopped in {seconds:.1f} s")
    assert r0["summary"]["step"] == r1["summary"]["step"] == 2
    assert_identical_params(r0, r1, parts=("model",))
    assert torch.load(tmp_path / "out" / "last.pt", weights_only=True)["step"] == 2


def test_non_finite_loss_on_one_rank_stops_every_rank_naming_its_step(tmp_path):
    """Rank 1's loss is NaN at step 2, its gradients too. Both ranks skip that update (the
    all-reduced gradients are NaN on both), go on to the agreement before the step-3 checkpoint
    and stop there with the same FloatingPointError naming step 2 and rank 1; the replicas stay
    finite and identical, and no checkpoint is written (the first one was due at step 3)."""
    cfg = _config(str(tmp_path), optim={"max_steps": 6}, runtime={"checkpoint_every": 3}, frame_ids=STEREO)
    (r0, r1), seconds = run_two_ranks(tmp_path, [cfg, cfg], nan_at={"1": 2})
    print(f"two ranks stopped in {seconds:.1f} s: {r0['summary'].get('error')}")
    assert "error" in r0["summary"] and r0["summary"]["error"] == r1["summary"].get("error")
    assert "at step 2 on rank 1" in r0["summary"]["error"]
    assert r0["summary"]["step"] == r1["summary"]["step"] == 3
    assert_identical_params(r0, r1, parts=("model",))
    assert all(torch.isfinite(v).all() for v in r0["model"].values())
    assert not (tmp_path / "out" / "last.pt").exists()


@pytest.mark.slow  # ~30 s here (an SD per process); the fast check: test_sd_dtypes.py
def test_trainable_sd_keeps_replicas_identical(tmp_path):
    """sd.frozen false: every SD parameter must get a gradient on every step, else DDP's reducer
    fails at the second step; 3 steps end with identical replicas and a changed SD."""
    cfg = _config(str(tmp_path), preset="tiny_sd", sd={"frozen": False}, frame_ids=STEREO)
    (r0, r1), _ = run_two_ranks(tmp_path, [cfg, cfg])
    assert r0["summary"]["step"] == r1["summary"]["step"] == 3
    assert_identical_params(r0, r1, parts=("model",))
    sd_keys = [k for k in r0["model"] if k.startswith("sd.unet.")]
    assert sd_keys
    changed = sum(not torch.equal(r0["model"][k], r0["sd_start"][k]) for k in sd_keys)
    assert changed > len(sd_keys) // 2  # the SD UNet trained
