"""--uncertainty of diffsql-bag-eval: the node's depth and depth/uncertainty of each stamp,
paired and scored by sparsification with the protocol code (eval/sparsification.py)."""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from diffsql_model.data.image_msgs import image_to_array
from diffsql_model.data.pairing import stamp_ns
from diffsql_model.eval import protocols


class UncertaintyScorer:
    """--uncertainty: the node's `depth` and `depth/uncertainty` of each stamp, paired and scored
    with the protocol code (its own protocols.Accumulator: the evaluator keeps the depth metrics).
    Its subscriptions live on the evaluator node, whose callbacks run one at a time: the ground
    truth is never read from two threads. Stamps are scored once (the sample pass repeats some)."""

    MAX_PENDING = 64  # frames whose second map never came (dropped) are forgotten

    def __init__(self, gt_for_stamp: Callable[[int], tuple], cfg: protocols.EvalConfig):
        self.gt_for_stamp = gt_for_stamp
        self.acc = protocols.Accumulator(cfg)
        self.pending: dict[int, dict] = {}  # stamp -> {"depth": H x W, "uncertainty": H x W}
        self.done: set[int] = set()  # stamps scored (or without ground truth)
        self.errors: list[str] = []
        self._cond = threading.Condition()

    def subscribe(self, evaluator, image_type, timeout_s: float) -> None:
        """Subscribe to both maps where the node publishes them, and wait until the node sees us
        (it computes only the outputs someone subscribes to)."""
        for suffix in ("depth", "depth/uncertainty"):
            topic = f"{evaluator.ns}/{suffix}"
            evaluator.subscribe_to_node(image_type, topic, lambda m, k=suffix: self._on_map(k, m),
                                        time.monotonic() + timeout_s,
                                        required=f"--uncertainty: nothing publishes {topic} (publish.uncertainty false?)")
        time.sleep(0.3)  # discovery is two-sided: give the node's publishers time to match us

    def _on_map(self, kind: str, msg) -> None:
        stamp = stamp_ns(msg.header)
        if stamp in self.done:
            return
        maps = self.pending.setdefault(stamp, {})
        maps[kind] = np.array(image_to_array(msg), dtype=np.float32)  # copy: msg.data is reused
        while len(self.pending) > self.MAX_PENDING:
            self.pending.pop(min(self.pending))
        if len(maps) < 2:
            return
        del self.pending[stamp]
        try:
            gt, _ = self.gt_for_stamp(stamp)
            if gt is not None:  # frames without a scan: the evaluator lists them as missing
                self.acc.add(f"{stamp / 1e9:.6f}", gt, maps["depth"], maps["depth/uncertainty"])
        except Exception as e:  # one bad frame must not stop the run; it is reported
            self.errors.append(f"uncertainty, stamp {stamp}: {e}")
        finally:
            with self._cond:  # done once scored: wait_for (the replay's thread) reads it
                self.done.add(stamp)
                self._cond.notify_all()

    def wait_for(self, stamps, timeout_s: float, alive=lambda: True) -> None:
        """Until every stamp in `stamps` was scored, the timeout passed or the node died."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not set(stamps) <= self.done and time.monotonic() < deadline and alive():
                self._cond.wait(0.1)

    def result(self) -> dict:
        """{"uncertainty": mean_over_frames (absent without frames), "per_frame", "errors"}."""
        r = self.acc.result()
        return {"uncertainty": r.get("uncertainty"), "per_frame": r["per_frame"], "errors": self.errors}
