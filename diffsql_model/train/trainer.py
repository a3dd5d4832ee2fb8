"""Self-supervised DiffSQL training loop (paper section 3.3; Monodepth2-style M and MS).

One `Trainer` per process; under `torchrun` each process holds one DDP replica and one shard of
the data, rank 0 logs and writes checkpoints. `Trainer(cfg, out_dir, resume).run()`.

Stopping is decided by all ranks together: the time budget and non-finite losses are reduced over
the ranks every `runtime.sync_every` steps, at every checkpoint / validation step and at the last
one, so no rank leaves the others waiting in a collective. Between those steps nothing waits for
the GPU: the loss check stays on the device.
"""
from __future__ import annotations

import math
import pathlib
import time

import torch
from torch.utils.data import DataLoader

from ..checkpoint import (CheckpointError, load_checkpoint, load_model, load_model_state, load_state_strict,
                          model_state, save_checkpoint)
from ..depth_net import DiffSQLDepth
from ..device import PRECISIONS
from ..device import resolve_device as inference_device
from ..losses import SelfSupervisedLoss, laplacian_nll
from ..pose_net import PoseNet, relative_pose
from .config import TrainConfig, check_uncertainty_training, resolve_model_config
from .datasets import build_datasets
from .distributed import DistContext, ResumableSampler, all_reduce_max, barrier, wrap_ddp
from ..eval.pose_eval import PoseValidationSet, validate_pose
from .progress import RunLogger, StepTimer
from .state import check_resumable, rng_state, seed_everything, set_rng_state
from .validate import validate

def resolve_device(name: str, ctx: DistContext) -> torch.device:
    """The inference resolver (auto -> cuda/cpu; cuda without a GPU is a clear error), then the
    process's own GPU under torchrun (where a GPU named by the config would be shared by all)."""
    device = inference_device(name)
    if device.type == "cuda" and ctx.enabled:
        if device.index not in (None, ctx.local_rank):
            raise ValueError(f"runtime.device {name!r} under torchrun: each process trains on its own "
                             f"GPU (cuda:LOCAL_RANK); set runtime.device to cuda or auto")
        device = torch.device("cuda", ctx.local_rank)
    return device


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | pathlib.Path | None = None,
                 resume: bool = False, ctx: DistContext | None = None):
        self.cfg, self.ctx = cfg, ctx or DistContext()
        self.out = pathlib.Path(out_dir or cfg.runtime.log_dir)
        self.device = resolve_device(cfg.runtime.device, self.ctx)
        if self.device.type == "cuda":  # streams, timing events and pinned batches on this GPU
            torch.cuda.set_device(self.device)
        if cfg.runtime.precision == "fp16" and self.device.type != "cuda":
            # Measured: without CUDA loss scaling most fp16 gradients underflow to zero.
            raise ValueError("runtime.precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on CPU")
        self.autocast_dtype = None if cfg.runtime.precision == "fp32" else PRECISIONS[cfg.runtime.precision]
        self.model_cfg = resolve_model_config(cfg.model)
        check_uncertainty_training(cfg, self.model_cfg)
        self.frame_ids = cfg.data.frame_ids
        self._build_networks()
        self._build_optimizer()
        self._build_data()

        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.train_seconds, self.best = 0.0, math.inf
        self.last_val: dict = {}
        # First step (1-based) with a non-finite loss on this rank, 0 while none: kept on the device.
        self.first_bad_step = torch.zeros((), dtype=torch.int64, device=self.device)
        if resume:
            self._resume()
            if self.ctx.is_main:
                print(f"resumed from {self.out / 'last.pt'} at step {self.step} (epoch {self.epoch})",
                      flush=True)

        self.ddp_model, self.ddp_pose = self.model, self.pose_net
        if self.ctx.enabled:
            self.ddp_model = wrap_ddp(self.model, self.device)
            if self.pose_net is not None:
                self.ddp_pose = wrap_ddp(self.pose_net, self.device)

    def _build_networks(self) -> None:
        cfg = self.cfg
        # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then a
        # rank-specific stream for augmentation and loss noise.
        seed_everything(cfg.runtime.seed)
        self.model = DiffSQLDepth.from_config(self.model_cfg, device=self.device,
                                 precision=cfg.runtime.precision).to(self.device)
        self.teacher = None  # frozen, for the uncertainty head's self-teaching (uncertainty.py)
        if cfg.loss.uncertainty_teacher:
            # in the run precision: a teacher with SD keeps its frozen SD in the run's dtypes
            self.teacher = load_model(cfg.loss.uncertainty_teacher, self.device,
                                      precision=cfg.runtime.precision)[0].requires_grad_(False)
        self.pose_net = None
        if cfg.data.temporal_ids:
            self.pose_net = PoseNet(cfg.model.pose_layers, cfg.model.pose_weights,
                                    prior=cfg.model.pose_prior).to(self.device)
        seed_everything(cfg.runtime.seed + 1000 * self.ctx.rank + 1)

    def _build_optimizer(self) -> None:
        optim = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]  # frozen SD excluded
        if self.pose_net is not None:
            params += list(self.pose_net.parameters())
        self.params = params
        # Fused Adam: one kernel for all parameters, and with GradScaler no host sync for inf checks.
        self.optimizer = torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                          fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=optim.lr_step_epochs, gamma=optim.lr_gamma)
        # Its per-step depth check would be a host sync; non-finite losses are caught on the device.
        self.loss_fn = SelfSupervisedLoss(self.cfg.loss, check_depth=False)
        # fp16: dynamic loss scaling. fp32 / bf16: a fixed scale of 1 (never grown), so the scaler
        # only skips steps whose (all-reduced) gradients are not finite: a NaN on one rank leaves
        # every replica's weights as they were until the ranks agree to stop. Steps on NaN weights
        # are not harmless: grid_sample's CPU backward segfaults on NaN sampling coordinates.
        self.loss_scaling = self.cfg.runtime.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type) if self.loss_scaling else \
            torch.amp.GradScaler(self.device.type, init_scale=1.0, growth_interval=2 ** 31 - 1)

    def _build_data(self) -> None:
        cfg = self.cfg
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
        # Drives with true poses (poses.txt: every synthetic drive) also grade PoseNet.
        self.pose_val = None
        if self.pose_net is not None and cfg.data.kind == "kitti" and cfg.data.val_split:
            self.pose_val = PoseValidationSet(cfg.data.val_root or cfg.data.root, cfg.data.val_split,
                                              self.model_cfg.height, self.model_cfg.width)

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        state = {
            "model_config": self.model_cfg.to_dict(),
            **model_state(self.model),  # frozen SD from a folder is left out (reloaded from it)
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds, "best": self.best,
            "val_metrics": dict(self.last_val), "rng": rng_state(self.device),
            "train_config": self.cfg.to_dict(),
        }
        if self.pose_net is not None:
            state["pose_net"] = self.pose_net.state_dict()
        if self.loss_scaling:
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
            if "grad_scaler" in state and self.loss_scaling:
                self.scaler.load_state_dict(state["grad_scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this run: {e}") from None
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.best = float(state.get("best", math.inf))
        self.last_val = dict(state.get("val_metrics", {}))
        if self.ctx.is_main and "rng" in state:
            set_rng_state(state["rng"], self.device)
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
            teacher_depth = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_depth = self.teacher(batch[("color_aug", 0)])["depth"]
            poses = {f: relative_pose(self.ddp_pose, batch[("color_aug", 0)], batch[("color_aug", f)], f)
                     for f in self.cfg.data.temporal_ids}
        if self.cfg.data.stereo:
            poses["s"] = batch["stereo_T"].float()
        sources = {f: batch[("color", f)] for f in poses}
        # The loss runs in fp32: SSIM on bf16 images loses the small differences it measures.
        losses = self.loss_fn(batch[("color", 0)], sources, outputs["depth"].float(),
                              batch["K"], batch["inv_K"], poses)
        if teacher_depth is not None:
            nll = self._uncertainty_nll(teacher_depth, outputs)
            losses["uncertainty_nll"] = nll.detach()
            losses["loss"] = losses["loss"] + self.cfg.loss.uncertainty_weight * nll
        return outputs, losses

    @staticmethod
    def _uncertainty_nll(teacher_depth: torch.Tensor, outputs: dict) -> torch.Tensor:
        """Self-teaching NLL of the teacher's log depth; both logs centred per image, so an M
        teacher's free scale is no error. The depth is detached: it trains the head only."""
        t = teacher_depth.float().log()
        s = outputs["depth"].detach().float().log()
        centre = lambda x: x - x.mean(dim=(2, 3), keepdim=True)  # noqa: E731
        return laplacian_nll(centre(s), centre(t), outputs["log_b"].float())

    def train_step(self, batch: dict) -> tuple[dict, dict, float, float]:
        """One optimisation step; returns (outputs, losses, forward seconds, backward seconds).
        Waits for the device to time the step (bench/train_step.py); `run` reads times lazily."""
        outputs, losses, timer = self._step(batch)
        return outputs, losses, *timer.seconds()

    def _step(self, batch: dict) -> tuple[dict, dict, StepTimer]:
        timer = StepTimer(self.device)
        timer.mark()
        outputs, losses = self.forward_losses(batch)
        loss = losses["loss"]
        # Recorded on the device, read at the next agreement step (no host sync per step).
        self.first_bad_step.masked_fill_(~torch.isfinite(loss.detach()) & (self.first_bad_step == 0),
                                         self.step + 1)
        timer.mark()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        timer.mark()
        return outputs, losses, timer

    # ---------------------------------------------------------------- loop
    def total_steps(self) -> int:
        total = self.cfg.optim.epochs * self.steps_per_epoch
        return min(total, self.cfg.optim.max_steps) if self.cfg.optim.max_steps > 0 else total

    def _out_of_time(self) -> bool:
        budget = self.cfg.optim.time_budget_s
        return budget > 0 and self.train_seconds >= budget

    def run(self) -> dict:
        log = RunLogger(self, enabled=self.ctx.is_main)
        total = self.total_steps()
        self.model.train()
        if self.pose_net is not None:
            self.pose_net.train()
        self.waited = self.busy = 0.0
        # train_seconds and step come from the checkpoint on every rank: the same decision.
        stop = self.step >= total or self._out_of_time()
        while not stop:
            stop = self._train_epoch(log, total)
        if not self.last_val and self.val_set is not None:
            self._validate(log)
        summary = {"step": self.step, "epoch": self.epoch, "train_seconds": self.train_seconds,
                   "data_wait_fraction": self.waited / max(self.waited + self.busy, 1e-9),
                   "images_per_s": log.images_per_s(), "val": dict(self.last_val),
                   "best_abs_rel": self.best if math.isfinite(self.best) else None}
        log.close(summary)
        return summary

    def _train_epoch(self, log: RunLogger, total: int) -> bool:
        """Steps from the current position to the end of the epoch; True when training stops."""
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batch_in_epoch * self.cfg.optim.batch_size)
        t_wait = time.perf_counter()
        for batch in self.loader:
            batch = self._to_device(batch)
            t_start = time.perf_counter()
            outputs, losses, timer = self._step(batch)
            t_end = time.perf_counter()
            self.waited, self.busy = self.waited + t_start - t_wait, self.busy + t_end - t_start
            self.train_seconds += t_end - t_wait
            self.step += 1
            self.batch_in_epoch += 1
            log.step(batch, outputs, losses, t_start - t_wait, timer, t_end - t_wait, total)
            if self.batch_in_epoch >= self.steps_per_epoch:
                self._end_epoch()
            if self._after_step(log, total):
                return True
            t_wait = time.perf_counter()
        return False

    def _after_step(self, log: RunLogger, total: int) -> bool:
        """Agreement, validation and checkpoint due at this step; True when training stops here.
        Every rank takes the same branches: they depend on the step and the reduced flags only."""
        rt = self.cfg.runtime
        validate_now = bool(rt.val_every) and self.step % rt.val_every == 0
        save_now = self.step % rt.checkpoint_every == 0
        last = self.step >= total
        if not (validate_now or save_now or last or self.step % rt.sync_every == 0):
            return False
        stop = self._agree_to_stop() or last  # raises on a non-finite loss: nothing NaN is saved
        if validate_now or (stop and self.val_set is not None):
            self._validate(log)
        if save_now or stop:
            self.save("last.pt")
            barrier(self.ctx)
        return stop

    def _agree_to_stop(self) -> bool:
        """Reduce [out of time, each rank's first non-finite step] over the ranks (waits for the
        device). True when any rank is out of time; FloatingPointError on every rank, naming the
        earliest bad step and its rank, when any loss was not finite."""
        flags = torch.zeros(1 + self.ctx.world_size, dtype=torch.int64, device=self.device)
        flags[0] = int(self._out_of_time())
        flags[1 + self.ctx.rank] = self.first_bad_step
        out_of_time, *bad_steps = all_reduce_max(flags, self.ctx).tolist()
        bad = [(step, rank) for rank, step in enumerate(bad_steps) if step > 0]
        if bad:
            step, rank = min(bad)
            raise FloatingPointError(
                f"loss is not finite (NaN or inf) at step {step} on rank {rank}; training stopped on "
                f"all {self.ctx.world_size} process(es), the last checkpoint in {self.out} (if any) "
                f"is from an earlier step")
        return bool(out_of_time)

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.scheduler.step()  # lr x gamma every lr_step_epochs epochs

    def _validate(self, log: RunLogger) -> None:
        if self.val_set is None:
            return
        if self.ctx.is_main:
            self.last_val = validate(self.model, self.val_set, self.device,
                                     max_frames=self.cfg.data.val_max_frames,
                                     crop=self.cfg.data.val_crop)
            if self.pose_val is not None and len(self.pose_val):
                self.last_val.update(validate_pose(self.pose_net, self.pose_val, self.device,
                                                   max_frames=self.cfg.data.val_max_frames))
            log.validation(self.last_val)
            if self.last_val["abs_rel"] < self.best:
                self.best = self.last_val["abs_rel"]
                self.save("best.pt")
        barrier(self.ctx)
