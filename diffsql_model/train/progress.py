"""Rank-0 reporting of a training run: tqdm bar (loss, images/s, ETA), TensorBoard scalars and
image grids, the share of step time spent waiting for data, a JSON summary.

Nothing here waits for the GPU except at `log_every` steps: losses and forward / backward times
(CUDA events) are read only then, so a step never stalls the queue of the next one."""
from __future__ import annotations

import collections
import json
import math
import time

import torch

from .validate import image_grid


class StepTimer:
    """Marks the start, the forward / backward boundary and the end of a step: CUDA events on a
    GPU (read when asked), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.marks: list = []

    def mark(self) -> None:
        if self.stream is None:
            self.marks.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        self.marks.append(event)

    def seconds(self) -> tuple[float, float]:
        """(forward, backward) seconds; on CUDA this waits for the step's last kernel."""
        start, middle, end = self.marks
        if self.stream is None:
            return middle - start, end - middle
        end.synchronize()
        return start.elapsed_time(middle) / 1e3, middle.elapsed_time(end) / 1e3


class RunLogger:
    def __init__(self, trainer, enabled: bool = True):
        self.t = trainer
        self.enabled = enabled
        self.batch_images = trainer.cfg.optim.batch_size * trainer.ctx.world_size
        self.recent = collections.deque(maxlen=20)  # (wait s, StepTimer, total s) of the last steps
        self.waited = self.total = 0.0
        self.images = 0
        self.bar = self.writer = None
        if not enabled:
            return
        trainer.out.mkdir(parents=True, exist_ok=True)
        trainer.cfg.save_yaml(trainer.out / "train_config.yaml")
        from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard): rank 0 only

        self.writer = SummaryWriter(log_dir=str(trainer.out / "tensorboard"), purge_step=trainer.step or None)
        if trainer.cfg.runtime.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.total_steps(), initial=trainer.step, unit="step",
                            desc=trainer.cfg.name, dynamic_ncols=True)

    def images_per_s(self) -> float:
        return self.images / self.total if self.total > 0 else 0.0

    def step(self, batch, outputs, losses, wait, timer: StepTimer, t_total, total_steps) -> None:
        if not self.enabled:
            return
        self.recent.append((wait, timer, t_total))
        self.waited += wait
        self.total += t_total
        self.images += self.batch_images
        t, rt = self.t, self.t.cfg.runtime
        if self.bar is not None:
            self.bar.update(1)
        if t.step % rt.log_every == 0 or t.step == total_steps:
            self._log_scalars(losses)
        if rt.image_every and t.step % rt.image_every == 0:
            self.writer.add_image("train/input_depth_uncertainty", image_grid(
                batch[("color", 0)], outputs["depth"], outputs["uncertainty"],
                automask=losses.get("automask")), t.step)

    def _log_scalars(self, losses: dict) -> None:
        """Loss terms, lr and speed of the last steps to TensorBoard and the bar (waits for the GPU)."""
        w, step = self.writer, self.t.step
        loss = float(losses["loss"].detach())
        recent_total = sum(r[2] for r in self.recent)
        ips = self.batch_images * len(self.recent) / max(recent_total, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}",
                                 wait=f"{self.waited / max(self.total, 1e-9):.0%}")
        w.add_scalar("train/loss", loss, step)
        for key in ("photometric", "smoothness", "automask_fraction", "mean_depth", "uncertainty_nll"):
            if key in losses:
                w.add_scalar(f"train/{key}", float(losses[key]), step)
        w.add_scalar("train/lr", self.t.optimizer.param_groups[0]["lr"], step)
        w.add_scalar("speed/images_per_s", ips, step)
        w.add_scalar("speed/data_wait_fraction",
                     sum(r[0] for r in self.recent) / max(recent_total, 1e-9), step)
        fwd_bwd = [r[1].seconds() for r in self.recent]
        w.add_scalar("speed/forward_s", sum(f for f, _ in fwd_bwd) / len(fwd_bwd), step)
        w.add_scalar("speed/backward_s", sum(b for _, b in fwd_bwd) / len(fwd_bwd), step)

    def validation(self, metrics: dict) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"val/{key}", value, self.t.step)
        msg = (f"step {self.t.step}: val AbsRel {metrics['abs_rel']:.4f} RMSE {metrics['rmse']:.3f} "
               f"d1 {metrics['a1']:.3f} ({metrics['frames']} frames, scale {metrics['scale_median']:.3g})")
        if "pose_rotation_deg" in metrics:
            msg += (f"; pose error: rotation {metrics['pose_rotation_deg']:.3f} deg, translation "
                    f"direction {metrics['pose_translation_dir_deg']:.2f} deg, magnitude "
                    f"{metrics['pose_translation_mag_err']:.3f}")
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self, summary: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        frac = summary["data_wait_fraction"]
        print(f"trained to step {summary['step']} (epoch {summary['epoch']}) in "
              f"{summary['train_seconds']:.1f} s; {summary['images_per_s']:.2f} images/s; "
              f"{frac:.1%} of step time waiting for data", flush=True)
        self.writer.add_scalar("speed/data_wait_fraction_run", frac, self.t.step)
        self.writer.flush()
        self.writer.close()
        (self.t.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
