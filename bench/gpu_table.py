"""One markdown table from bench/model_speed.py --json and bench/train_step.py --json: per
preset and precision, forward latency, FPS, forward peak memory, training step time, images/s.

    python bench/gpu_table.py model_speed.json train_step.json
Either file may be missing (its stage failed): its columns then read '-'.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys


def _load(path: str) -> dict:
    p = pathlib.Path(path)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {"meta": {}, "rows": []}


def _cell(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def merge(speed: dict, train: dict) -> list[dict]:
    """Rows keyed by (preset, precision), in the order the benchmarks ran them."""
    rows: dict[tuple, dict] = {}
    for r in speed["rows"]:
        for precision, res in r["results"].items():
            rows[(r["preset"], precision)] = {"latency_ms": res["ms"], "fps": res["fps"],
                                              "fwd_peak_MB": res["peak_MB"], "finite": res["finite"]}
    for r in train["rows"]:
        rows.setdefault((r["preset"], r["precision"]), {}).update(
            step_ms=r["compute"] * 1e3, images_per_s=r["images_per_s_compute"], data_ms=r["data"] * 1e3,
            train_peak_GiB=r["peak_GiB"])
    return [{"preset": k[0], "precision": k[1], **v} for k, v in rows.items()]


def table(speed: dict, train: dict) -> str:
    sm, tm = speed.get("meta", {}), train.get("meta", {})
    lines = []
    if sm:
        lines.append(f"Forward: batch 1, {sm['height']}x{sm['width']}, median of {sm['runs']} runs, {sm['device']}, "
                     f"torch {sm['torch']}.")
    if tm:
        lines.append(f"Training step: batch {tm['batch']}, {tm['height']}x{tm['width']}, frames {tm['frames']}, "
                     f"mean of {tm['steps']} steps after a warm-up, {tm['device']}; step = forward + backward + "
                     f"optimizer, images/s from it; data = loading on 1 process, apart.")
    lines += ["", "| preset | precision | latency ms | FPS | fwd peak MB | train step ms | train images/s "
              "| data ms | train peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in merge(speed, train):
        flag = "" if r.get("finite", True) else " (non-finite!)"
        lines.append(f"| {r['preset']} | {r['precision']} | {_cell(r.get('latency_ms'), '.2f')}{flag} | "
                     f"{_cell(r.get('fps'), '.1f')} | {_cell(r.get('fwd_peak_MB'), '.0f')} | "
                     f"{_cell(r.get('step_ms'), '.1f')} | {_cell(r.get('images_per_s'), '.1f')} | "
                     f"{_cell(r.get('data_ms'), '.0f')} | {_cell(r.get('train_peak_GiB'), '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(table(_load(sys.argv[1]), _load(sys.argv[2])))
