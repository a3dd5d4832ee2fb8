"""Stopwatch: wall time per named stage of one frame, in milliseconds."""
from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator


class Stopwatch:
    """`with watch("publish"): ...` adds the block's wall time to stage "publish"; a stage timed
    more than once adds up. `ms` holds the stages given at the start (in that order, at 0) and
    every one timed since."""

    def __init__(self, stages: Iterable[str] = ()):
        self.ms = dict.fromkeys(stages, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - start) * 1e3)

    def add(self, stage: str, ms: float) -> None:
        """A time measured elsewhere (CUDA events, another component's stopwatch)."""
        self.ms[stage] = self.ms.get(stage, 0.0) + ms
