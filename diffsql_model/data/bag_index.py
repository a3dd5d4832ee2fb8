"""Random access into a bag: `TopicIndex` (one topic -> header stamps -> lazy reads) and the
`BagHandle` it reads through. Serves the training dataset (`bags.BagDataset`) and the LiDAR
ground truth of both evaluators (`lidar.LidarDepth`).

A bag of hours does not fit in memory, but its index does: per message a header stamp and a
recording time, and a message is read again by seeking to that recording time.
"""
from __future__ import annotations

import os
import pathlib
import threading
from typing import Callable, Optional

from diffsql_model.data.bag_reader import open_bag, read_message_at, topic_messages
from diffsql_model.data.pairing import nearest_by_stamp, stamp_ns


class BagHandle:
    """An open reader of one bag for random reads. Opened on first use and again in a forked
    process (DataLoader workers must not share the parent's sqlite / file handle); reads are
    serialised, since the replay evaluator reads from executor threads; pickled without the
    reader. Closed by `close()`, on leaving a `with` block, or when collected."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._ctx = self._reader = self._pid = None
        self._lock = threading.Lock()

    def reader(self):
        """The reader of this process (for indexing; random reads go through `read`)."""
        if self._ctx is None or self._pid != os.getpid():
            ctx = open_bag(self.path)
            self._reader, self._ctx, self._pid = ctx.__enter__(), ctx, os.getpid()
        return self._reader

    def read(self, topic: str, log_ns: int, stamp: int) -> tuple[object, object]:
        """(connection, message) of `topic` recorded at `log_ns` with header stamp `stamp`."""
        with self._lock:
            return read_message_at(self.reader(), topic, log_ns, stamp, self.path)

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None and self._pid == os.getpid():  # a parent's reader is the parent's to close
            ctx.__exit__(None, None, None)

    def __enter__(self) -> "BagHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the reader's modules may already be gone
            pass

    def __getstate__(self):
        return {**self.__dict__, "_ctx": None, "_reader": None, "_pid": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class TopicIndex:
    """One topic of a bag: per message its header stamp (ascending; equal stamps in recording
    order), its recording time and, optionally, a small value kept from it (`keep(msg)`, e.g.
    a camera_info's projection). `frame_id`: the header frame of its last message."""

    def __init__(self, bag: BagHandle, topic: Optional[str], stamps=(), log_times=(), kept=(), frame_id=""):
        self.bag, self.topic, self.frame_id = bag, topic, frame_id
        self.stamps, self.log_times, self.kept = list(stamps), list(log_times), list(kept)

    @classmethod
    def build(cls, bag: BagHandle, topic: str, keep: Callable | None = None) -> "TopicIndex":
        """Index `topic` with one pass over its messages."""
        rows, frame_id = [], ""
        for _, t, msg in topic_messages(bag.reader(), [topic], bag.path):
            rows.append((stamp_ns(msg.header), t, keep(msg) if keep else None))
            frame_id = msg.header.frame_id
        rows.sort(key=lambda r: r[0])  # stable
        stamps, log_times, kept = zip(*rows) if rows else ((), (), ())
        return cls(bag, topic, stamps, log_times, kept, frame_id)

    def __len__(self) -> int:
        return len(self.stamps)

    def nearest(self, stamp: int, tolerance_ns: int | None = None) -> int | None:
        """Entry nearest in stamp (None when the index is empty or none is within the tolerance)."""
        return nearest_by_stamp(self.stamps, stamp, tolerance_ns)

    def read(self, i: int) -> tuple[object, object]:
        """(connection, message) of entry i, read again from the bag."""
        return self.bag.read(self.topic, self.log_times[i], self.stamps[i])
