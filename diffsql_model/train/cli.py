"""`diffsql-train --config config/train/<name>.yaml [--set key=value ...] [--resume] [--out DIR]`.

Multi-GPU / multi-process: `torchrun --nproc_per_node N -m diffsql_model.train.cli --config ...`
(one DDP replica per process; rank 0 logs and writes checkpoints).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from ..errors import CheckpointError
from ..yaml_config import ConfigError
from .config import TrainConfig, check_uncertainty_training, resolve_model_config
from .distributed import init_from_env, shutdown
from .trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffsql-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training YAML (config/train/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. optim.lr=2e-4 or model.height=96 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--out", default=None, help="output folder (default: runtime.log_dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = TrainConfig.load_yaml(args.config).with_overrides(args.overrides)
        # model errors (e.g. SD without weights) before any data
        check_uncertainty_training(cfg, resolve_model_config(cfg.model))
    except ConfigError as e:
        print(f"diffsql-train: config error: {e}", file=sys.stderr)
        return 2
    if args.out:
        cfg = cfg.with_overrides([f"runtime.log_dir={args.out}"])
    out = pathlib.Path(cfg.runtime.log_dir)
    if not args.resume and (out / "last.pt").exists():
        print(f"diffsql-train: {out}/last.pt exists: pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    if args.resume and not (out / "last.pt").exists():
        print(f"diffsql-train: --resume: no checkpoint at {out}/last.pt", file=sys.stderr)
        return 2

    ctx = init_from_env("cuda" if cfg.runtime.device.startswith("cuda") or (
        cfg.runtime.device == "auto" and _cuda()) else "cpu")
    try:
        trainer = Trainer(cfg, out, resume=args.resume, ctx=ctx)
        trainer.run()
    except (CheckpointError, ConfigError, FileNotFoundError, FloatingPointError, ValueError) as e:
        print(f"diffsql-train: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    return 0


def _cuda() -> bool:
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
