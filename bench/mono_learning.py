"""Does self-supervised training learn on a synthetic world? A learning curve per run.

    .venv/bin/python bench/mono_learning.py --world varied --steps 3000 --out runs/mono_varied
    .venv/bin/python bench/mono_learning.py --world varied --model query_mode=none ...   # plain head
    .venv/bin/python bench/mono_learning.py --world demo --frames-ids 0,s      # stereo reference

Renders (once, cached under OUT/data) `--drives` training drives and one held-out drive of the
world, trains `lite` at 64x192 (batch 4, lr 1e-4, no ImageNet weights: the setting of issue 11)
and every `--every` steps prints: AbsRel (median scaling) on one training drive and on the
held-out drive, the mean predicted depth, the scale gt/pred, and PoseNet's error against the
true poses of the held-out drive. First rows: a constant depth and the untrained model.

`--true-pose` trains the depth network with the drives' true relative poses (poses.txt, in
metres) in place of PoseNet's, and without depth normalisation: whether depth learns from the
temporal frames when the pose is right (the "depth cannot be learned if the pose is not" check).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffsql_model.data.kitti import KittiRawDataset  # noqa: E402
from diffsql_model.data.synthetic import SyntheticConfig  # noqa: E402
from diffsql_model.data.synthetic_kitti import DATE, make_synthetic_kitti, read_poses, write_split  # noqa: E402
from diffsql_model.eval.metrics import evaluate_frame, mean_metrics  # noqa: E402
from diffsql_model.train.config import TrainConfig  # noqa: E402
from diffsql_model.train.datasets import WithDepthPng  # noqa: E402
from diffsql_model.eval.pose_eval import PoseValidationSet, validate_pose  # noqa: E402
from diffsql_model.train.trainer import Trainer  # noqa: E402
from diffsql_model.train.validate import validate  # noqa: E402

HELD_OUT_DRIVE = f"{DATE}_drive_0999_sync"


class TruePoseTrainer(Trainer):
    """Depth trained with the true relative poses of the temporal sources (PoseNet unused)."""

    def __init__(self, cfg, out, raw_root: str, baseline: float = SyntheticConfig.baseline):
        super().__init__(cfg, out)
        self.raw_root, self._poses = pathlib.Path(raw_root), {}
        self.right = np.eye(4)
        self.right[0, 3] = baseline  # right camera = left camera pose @ this

    def true_T(self, name: str, source: int, flip: bool) -> torch.Tensor:
        folder, frame, side = name.split()
        poses = self._poses.setdefault(folder, read_poses(self.raw_root / folder / "poses.txt"))
        T = np.linalg.inv(poses[int(frame) + source]) @ poses[int(frame)]  # X_src = T X_tgt
        if side == "r":
            T = np.linalg.inv(self.right) @ T @ self.right
        if flip:  # the mirrored world: x -> -x on both sides
            F = np.diag([-1.0, 1.0, 1.0, 1.0])
            T = F @ T @ F
        return torch.from_numpy(T).float()

    def forward_losses(self, batch: dict):
        outputs = self.ddp_model(batch[("color_aug", 0)])
        flips = batch["do_flip"].tolist() if torch.is_tensor(batch["do_flip"]) else list(batch["do_flip"])
        poses = {f: torch.stack([self.true_T(n, f, fl) for n, fl in zip(batch["name"], flips)]).to(self.device)
                 for f in self.cfg.data.temporal_ids}
        sources = {f: batch[("color", f)] for f in poses}
        return outputs, self.loss_fn(batch[("color", 0)], sources, outputs["depth"].float(),
                                     batch["K"], batch["inv_K"], poses)


def make_data(out: pathlib.Path, world: str, drives: int, frames: int, width: int, height: int,
              seed: int) -> dict:
    marker = out / "data.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    data = make_synthetic_kitti(out, tuple(range(seed, seed + drives)), val_seed=seed + 500,
                                num_frames=frames, width=width, height=height, val_frames=frames,
                                world=world)
    write_split(out / "splits" / "train_drive.txt", DATE, f"{DATE}_drive_0001_sync", range(frames))
    data["train_drive_split"] = str(out / "splits" / "train_drive.txt")
    marker.write_text(json.dumps(data))
    return data


def depth_set(data: dict, split: str, h: int, w: int):
    base = KittiRawDataset(data["root"], split, height=h, width=w, frame_ids=[0], is_train=False)
    return WithDepthPng(base, data["depth_root"])


def constant_baseline(dataset) -> float:
    per_frame = []
    for i in range(len(dataset)):
        gt = dataset[i]["depth_gt"].squeeze().numpy().astype(np.float32)
        valid = (gt > 1e-3) & (gt < 80)
        metrics, _ = evaluate_frame(gt, np.ones_like(gt), valid, scaling="median", scale=1.0, clip=(1e-3, 80))
        per_frame.append(metrics)
    return mean_metrics(per_frame)["abs_rel"]


def measure(trainer: Trainer, sets: dict, pose_set) -> dict:
    row = {"step": trainer.step}
    for name, ds in sets.items():
        m = validate(trainer.model, ds, trainer.device, max_frames=0, crop="none")
        row[f"{name}_abs_rel"], row[f"{name}_scale"] = m["abs_rel"], m["scale_median"]
    with torch.no_grad():
        img = sets["held_out"].base[0][("color", 0)][None].to(trainer.device)
        row["mean_depth"] = float(trainer.model.eval()(img)["depth"].mean())
        trainer.model.train()
    if trainer.pose_net is not None and len(pose_set):
        row.update(validate_pose(trainer.pose_net, pose_set, trainer.device))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="varied")
    p.add_argument("--drives", type=int, default=12)
    p.add_argument("--frames", type=int, default=38)
    p.add_argument("--render", default="384x128", help="rendered WxH (training resizes to 192x64)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--frame-ids", default="0,-1,1")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", dest="model_fields", action="append", default=[], metavar="FIELD=VALUE",
                   help="a ModelConfig field of the preset, e.g. query_mode=none (a plain depth head)")
    p.add_argument("--true-pose", action="store_true", help="train depth with the true poses (no PoseNet)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.true_pose:
        a.overrides = ["loss.depth_normalization='off'", *a.overrides]
    torch.set_num_threads(a.threads)
    out = pathlib.Path(a.out)
    w, h = (int(v) for v in a.render.split("x"))
    data = make_data(out.parent / f"data_{a.world}_{a.drives}x{a.frames}_{a.render}_s{a.data_seed}",
                     a.world, a.drives, a.frames, w, h, a.data_seed)
    frame_ids = [f if f == "s" else int(f) for f in a.frame_ids.split(",")]
    cfg = TrainConfig.from_dict({
        "name": out.name,
        "model": {"preset": "lite", "overrides": {"height": 64, "width": 192, **dict(
            kv.split("=", 1) for kv in a.model_fields)}},
        "data": {"kind": "kitti", "root": data["root"], "train_split": data["train_split"],
                 "frame_ids": frame_ids},
        "optim": {"batch_size": 4, "lr": 1e-4, "epochs": 10000, "lr_step_epochs": 10000, "max_steps": a.every},
        "runtime": {"device": "cpu", "num_workers": 1, "checkpoint_every": a.every, "val_every": 0,
                    "progress": False, "log_every": 50, "image_every": 0},
    }).with_overrides(a.overrides)
    trainer = TruePoseTrainer(cfg, out, data["root"]) if a.true_pose else Trainer(cfg, out)
    mc = trainer.model_cfg
    sets = {"train_drive": depth_set(data, data["train_drive_split"], mc.height, mc.width),
            "held_out": depth_set(data, data["val_split"], mc.height, mc.width)}
    pose_set = PoseValidationSet(data["root"], data["val_split"], mc.height, mc.width)
    rows = [{"step": "constant", **{f"{k}_abs_rel": constant_baseline(v) for k, v in sets.items()}}]
    rows.append(measure(trainer, sets, pose_set))
    t0 = time.monotonic()
    while trainer.step < a.steps:
        trainer.cfg.optim.max_steps = min(trainer.step + a.every, a.steps)
        trainer.run()
        rows.append(measure(trainer, sets, pose_set))
        print(json.dumps(rows[-1]), f"({time.monotonic() - t0:.0f} s)", flush=True)
    (out / "learning_curve.json").write_text(json.dumps(rows, indent=1))
    cols = ["step", "train_drive_abs_rel", "held_out_abs_rel", "held_out_scale", "mean_depth",
            "pose_rotation_deg", "pose_translation_dir_deg", "pose_translation_mag_err"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
