"""Self-supervised DiffSQL training loop (paper section 3.3; Monodepth2-style M and MS).

One `Trainer` per process; under `torchrun` each process holds one DDP replica and one shard of
the data, rank 0 logs and writes checkpoints. `Trainer(cfg, out_dir, resume).run()`.
"""
from __future__ import annotations

import math
import pathlib
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..checkpoint import (CheckpointError, build_model, load_checkpoint, load_model_state, load_state_strict,
                          model_state, save_checkpoint)
from ..inference import PRECISIONS
from ..inference import resolve_device as inference_device
from ..losses import SelfSupervisedLoss
from ..pose_net import PoseNet, transformation_from_parameters
from .config import TrainConfig, resolve_model_config
from .datasets import build_datasets
from .distributed import DistContext, ResumableSampler, barrier
from .state import check_resumable, rng_state, seed_everything, set_rng_state

def resolve_device(name: str, ctx: DistContext) -> torch.device:
    """The inference resolver (auto -> cuda/cpu; cuda without a GPU is a clear error), then the
    process's own GPU under torchrun."""
    device = inference_device(name)
    if device.type == "cuda" and device.index is None and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    return device


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | pathlib.Path | None = None,
                 resume: bool = False, ctx: DistContext | None = None):
        self.cfg, self.ctx = cfg, ctx or DistContext()
        self.out = pathlib.Path(out_dir or cfg.runtime.log_dir)
        self.device = resolve_device(cfg.runtime.device, self.ctx)
        self.model_cfg = resolve_model_config(cfg.model)
        self.frame_ids = cfg.data.frame_ids

        # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then a
        # rank-specific stream for augmentation and loss noise.
        seed_everything(cfg.runtime.seed)
        self.model = build_model(self.model_cfg).to(self.device)
        self.pose_net = None
        if cfg.data.temporal_ids:
            self.pose_net = PoseNet(cfg.model.pose_layers, cfg.model.pose_weights).to(self.device)
        seed_everything(cfg.runtime.seed + 1000 * self.ctx.rank + 1)

        params = [p for p in self.model.parameters() if p.requires_grad]  # frozen SD excluded
        if self.pose_net is not None:
            params += list(self.pose_net.parameters())
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=cfg.optim.lr_step_epochs, gamma=cfg.optim.lr_gamma)
        self.loss_fn = SelfSupervisedLoss(cfg.loss)
        self.autocast_dtype = None if cfg.runtime.precision == "fp32" else PRECISIONS[cfg.runtime.precision]
        if cfg.runtime.precision == "fp16" and self.device.type != "cuda":
            # Measured: without CUDA loss scaling most fp16 gradients underflow to zero.
            raise ValueError("runtime.precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on CPU")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.runtime.precision == "fp16")

        self.train_set, self.val_set = build_datasets(cfg.data, self.model_cfg)
        if len(self.train_set) < cfg.optim.batch_size * self.ctx.world_size:
            raise ValueError(f"training set has {len(self.train_set)} samples, fewer than one batch "
                             f"({cfg.optim.batch_size} x {self.ctx.world_size} processes)")
        self.sampler = ResumableSampler(self.train_set, self.ctx, seed=cfg.runtime.seed)
        # A private generator: creating a loader iterator must not draw from the global torch RNG
        # (a resumed run creates its iterator at a different moment than an uninterrupted one).
        self.loader = DataLoader(
            self.train_set, batch_size=cfg.optim.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=cfg.runtime.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, generator=torch.Generator().manual_seed(cfg.runtime.seed))
        self.steps_per_epoch = len(self.sampler) // cfg.optim.batch_size

        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.train_seconds, self.best = 0.0, math.inf
        self.last_val: dict = {}
        if resume:
            self._resume()
            if self.ctx.is_main:
                print(f"resumed from {self.out / 'last.pt'} at step {self.step} (epoch {self.epoch})",
                      flush=True)

        self.ddp_model, self.ddp_pose = self.model, self.pose_net
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.pose_net is not None:
                self.ddp_pose = nn.parallel.DistributedDataParallel(self.pose_net, device_ids=ids)
        self.writer = None

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        state = {
            "model_config": self.model_cfg.to_dict(),
            **model_state(self.model),  # frozen SD from a folder is left out (reloaded from it)
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds, "best": self.best,
            "val_metrics": dict(self.last_val), "rng": rng_state(),
            "train_config": self.cfg.to_dict(),
        }
        if self.pose_net is not None:
            state["pose_net"] = self.pose_net.state_dict()
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def save(self, name: str = "last.pt") -> pathlib.Path | None:
        if not self.ctx.is_main:
            return None
        return save_checkpoint(self.out / name, self._state())

    def _resume(self) -> None:
        path = self.out / "last.pt"
        state = load_checkpoint(path, map_location="cpu")
        check_resumable(state, path, self.model_cfg.to_dict(), self.frame_ids)
        load_model_state(self.model, state, path)
        if self.pose_net is not None:
            load_state_strict(self.pose_net, state["pose_net"], "pose_net", path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if "grad_scaler" in state and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["grad_scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this run: {e}") from None
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.best = float(state.get("best", math.inf))
        self.last_val = dict(state.get("val_metrics", {}))
        if self.ctx.is_main and "rng" in state:
            set_rng_state(state["rng"])
        else:  # other ranks: a fresh stream, still a function of (seed, rank, step)
            seed_everything(self.cfg.runtime.seed + 1000 * self.ctx.rank + 7 * self.step + 1)

    # ---------------------------------------------------------------- one step
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in batch.items()}

    def forward_losses(self, batch: dict) -> tuple[dict, dict]:
        """Depth of the target frame, poses to each source, loss dict (Eq. 15)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            outputs = self.ddp_model(batch[("color_aug", 0)])
            poses = {}
            for f in self.cfg.data.temporal_ids:
                # Frames fed in temporal order; past sources invert the predicted motion so
                # T always maps target points into the source camera (X_src = T X_tgt).
                a, b = (batch[("color_aug", f)], batch[("color_aug", 0)]) if f < 0 else \
                    (batch[("color_aug", 0)], batch[("color_aug", f)])
                axisangle, translation = self.ddp_pose(a, b)
                poses[f] = transformation_from_parameters(axisangle.float(), translation.float(),
                                                          invert=f < 0)
        if self.cfg.data.stereo:
            poses["s"] = batch["stereo_T"].float()
        sources = {f: batch[("color", f)] for f in poses}
        # The loss runs in fp32: SSIM on bf16 images loses the small differences it measures.
        losses = self.loss_fn(batch[("color", 0)], sources, outputs["depth"].float(),
                              batch["K"], batch["inv_K"], poses)
        return outputs, losses

    def train_step(self, batch: dict) -> tuple[dict, dict, float, float]:
        """One optimisation step; returns (outputs, losses, forward seconds, backward seconds)."""
        t0 = time.perf_counter()
        outputs, losses = self.forward_losses(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; stopping "
                                     f"(last checkpoint kept in {self.out})")
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return outputs, losses, t1 - t0, time.perf_counter() - t1

    # ---------------------------------------------------------------- loop
    def total_steps(self) -> int:
        total = self.cfg.optim.epochs * self.steps_per_epoch
        return min(total, self.cfg.optim.max_steps) if self.cfg.optim.max_steps > 0 else total

    def _out_of_time(self) -> bool:
        budget = self.cfg.optim.time_budget_s
        return budget > 0 and self.train_seconds >= budget

    def run(self) -> dict:
        from .progress import RunLogger

        log = RunLogger(self, enabled=self.ctx.is_main)
        total = self.total_steps()
        self.model.train()
        if self.pose_net is not None:
            self.pose_net.train()
        waited = busy = 0.0
        stop = self.step >= total or self._out_of_time()
        while not stop:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.batch_in_epoch * self.cfg.optim.batch_size)
            t_wait = time.perf_counter()
            for batch in self.loader:
                batch = self._to_device(batch)
                t_start = time.perf_counter()
                outputs, losses, t_fwd, t_bwd = self.train_step(batch)
                t_end = time.perf_counter()
                wait = t_start - t_wait
                waited, busy = waited + wait, busy + (t_end - t_start)
                self.train_seconds += t_end - t_wait
                self.step += 1
                self.batch_in_epoch += 1
                log.step(batch, outputs, losses, wait, t_fwd, t_bwd, t_end - t_wait, total)
                stop = self.step >= total or self._out_of_time()
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self._end_epoch()
                if self.cfg.runtime.val_every and self.step % self.cfg.runtime.val_every == 0 and not stop:
                    self._validate(log)
                if self.step % self.cfg.runtime.checkpoint_every == 0 or stop:
                    if stop and self.val_set is not None:
                        self._validate(log)
                    self.save("last.pt")
                    barrier(self.ctx)
                if stop:
                    break
                t_wait = time.perf_counter()
        if not self.last_val and self.val_set is not None:
            self._validate(log)
        summary = {"step": self.step, "epoch": self.epoch, "train_seconds": self.train_seconds,
                   "data_wait_fraction": waited / max(waited + busy, 1e-9),
                   "images_per_s": log.images_per_s(), "val": dict(self.last_val),
                   "best_abs_rel": self.best if math.isfinite(self.best) else None}
        log.close(summary)
        return summary

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.scheduler.step()  # lr x gamma every lr_step_epochs epochs

    def _validate(self, log) -> None:
        if self.val_set is None:
            return
        if self.ctx.is_main:
            from .validate import validate

            self.last_val = validate(self.model, self.val_set, self.device,
                                     max_frames=self.cfg.data.val_max_frames,
                                     crop=self.cfg.data.val_crop)
            log.validation(self.last_val)
            if self.last_val["abs_rel"] < self.best:
                self.best = self.last_val["abs_rel"]
                self.save("best.pt")
        barrier(self.ctx)

