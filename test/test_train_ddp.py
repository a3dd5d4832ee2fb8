"""DistributedDataParallel training: two CPU processes (gloo) train a few steps on different data
shards and end with identical replicas; only rank 0 writes the checkpoint."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from conftest import KITTI_RAW

DRIVE = "2011_09_26/2011_09_26_drive_0023_sync"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from diffsql_model.train.config import TrainConfig
    from diffsql_model.train.distributed import init_from_env, shutdown
    from diffsql_model.train.trainer import Trainer

    split = os.path.join(tmp, "train.txt")
    cfg = TrainConfig.from_dict({
        "model": {"preset": "lite", "overrides": {"height": 64, "width": 192}},
        "data": {"kind": "kitti", "root": str(KITTI_RAW), "train_split": split},
        "optim": {"batch_size": 2, "max_steps": 3, "lr": 1e-3},
        "runtime": {"device": "cpu", "num_workers": 0, "checkpoint_every": 3, "val_every": 0,
                    "progress": False, "seed": 5},
    })
    ctx = init_from_env("cpu")
    try:
        trainer = Trainer(cfg, os.path.join(tmp, "out"), ctx=ctx)
        shard = list(iter(trainer.sampler))
        summary = trainer.run()
        # Parameters only: BatchNorm running statistics are per replica between DDP's buffer
        # broadcasts (rank 0's are copied to all at the start of each forward).
        params = {part: {k: v.detach().clone() for k, v in net.named_parameters()}
                  for part, net in (("model", trainer.model), ("pose", trainer.pose_net))}
        torch.save({**params,
                    "shard": shard, "step": summary["step"]}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        shutdown(ctx)


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"{DRIVE} {f} {s}\n" for f in range(1, 6) for s in "lr"))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == 3
    assert not set(r0["shard"]) & set(r1["shard"])  # each rank trains on its own samples
    changed = 0
    torch.manual_seed(5)
    from diffsql_model.checkpoint import build_model
    from diffsql_model.train.config import TrainConfig, resolve_model_config

    init = build_model(resolve_model_config(TrainConfig.from_dict(
        {"model": {"preset": "lite", "overrides": {"height": 64, "width": 192}}}).model)).state_dict()
    for part in ("model", "pose"):
        assert r0[part].keys() == r1[part].keys()
        for key in r0[part]:
            torch.testing.assert_close(r0[part][key], r1[part][key], rtol=0, atol=0, msg=f"{part}.{key}")
    for key, value in r0["model"].items():
        if value.is_floating_point() and not torch.equal(value, init[key]):
            changed += 1
    assert changed > 10  # the replicas trained (and from the same start: seed 5)
    ckpt = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    for key, value in r0["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=0, atol=0)
