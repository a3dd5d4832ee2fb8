"""Bag I/O entry points and `BagDataset`: training samples from a ROS 1 / ROS 2 bag.

Reading lives in `bag_reader.py`, writing in `bag_writer.py`; both are re-exported here.
"""
from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
import torch

from diffsql_model.data.augment import AugmentConfig, build_sample, draw_augmentation
from diffsql_model.data.bag_reader import (  # noqa: F401  (re-exported API)
    CLOUD_TYPE, IMAGE_TYPES, INFO_TYPE, BagError, CameraFrame, LidarScan, camera_matrix,
    decode_image, decode_pointcloud, field, info_topic_for, iter_messages, lidar_depth_map,
    lookup_transform, open_bag, pick_topic, read_camera_stream, read_lidar, read_message_at,
    read_static_transforms,
)
from diffsql_model.data.bag_writer import (  # noqa: F401
    FORMATS, KITTI2BAG_TOPICS, ROS2_TOPICS, BagFrame, BagWriteError, kitti_drive_to_bag, write_bag,
)
from diffsql_model.data.pairing import nearest_by_stamp, stamp_ns


class _Stream:
    """Index of one topic: per message its log time (for seeking) and header stamp."""

    def __init__(self, reader, topic: str, path, keep=None):
        self.topic = topic
        self.log_times, self.stamps, self.extra, self.frame_id = [], [], [], ""
        conns = [c for c in reader.connections if c.topic == topic]
        for conn, t, msg in iter_messages(reader, conns, path):
            self.log_times.append(t)
            self.stamps.append(stamp_ns(msg.header))
            self.frame_id = msg.header.frame_id
            self.extra.append(keep(msg) if keep else None)
        order = np.argsort(self.stamps, kind="stable")
        self.log_times = [self.log_times[i] for i in order]
        self.stamps = [self.stamps[i] for i in order]
        self.extra = [self.extra[i] for i in order]

    def fetch(self, reader, i: int, path):
        """(connection, message) of entry i, seeking by its log time."""
        return read_message_at(reader, self.topic, self.log_times[i], self.stamps[i], path)


class BagDataset(torch.utils.data.Dataset):
    """Samples (docs/interfaces.md dict) from one camera of a bag; neighbours are the adjacent
    images by stamp. Centres whose neighbours are missing or further apart than
    `max_frame_gap_s` per step are skipped and listed in `self.skipped`.

    K: from the camera_info nearest in stamp. "s" in frame_ids needs `stereo_image_topic`;
    the baseline comes from both camera_infos' P. lidar_topic: adds "depth_gt" (1 x H x W,
    camera z in metres, 0 = no point, from the scan nearest in stamp within
    `lidar_tolerance_s`; zeros + has_depth_gt=False where none). T_lidar_to_cam: 4x4 extrinsic,
    default composed from /tf_static.
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        height: int = 192,
        width: int = 640,
        frame_ids: Sequence = (0, -1, 1),
        image_topic: str | None = None,
        info_topic: str | None = None,
        lidar_topic: str | None = None,
        T_lidar_to_cam: np.ndarray | None = None,
        is_train: bool = True,
        stereo_image_topic: str | None = None,
        stereo_info_topic: str | None = None,
        max_frame_gap_s: float = 0.5,
        stereo_tolerance_s: float = 0.01,
        lidar_tolerance_s: float = 0.05,
        augment: AugmentConfig | None = None,
    ):
        self.path = pathlib.Path(path)
        self.height, self.width = height, width
        self.frame_ids = list(frame_ids)
        self.is_train = is_train
        self.augment = augment or AugmentConfig()
        self._reader_ctx = None
        self._reader_pid = None
        with open_bag(self.path) as reader:
            topic = pick_topic(reader, image_topic, IMAGE_TYPES, "camera image", self.path)
            self.images = _Stream(reader, topic, self.path)
            if not self.images.stamps:
                raise BagError(f"{self.path}: image topic {topic} holds no message")
            self.infos = _Stream(reader, info_topic_for(reader, topic, info_topic, self.path), self.path, _info_keep)
            if not self.infos.stamps:
                raise BagError(f"{self.path}: camera_info topic {self.infos.topic} holds no message")
            self.stereo = self.stereo_infos = None
            if "s" in self.frame_ids:
                if stereo_image_topic is None:
                    raise BagError(f"{self.path}: frame id 's' needs stereo_image_topic")
                st = pick_topic(reader, stereo_image_topic, IMAGE_TYPES, "camera image", self.path)
                self.stereo = _Stream(reader, st, self.path)
                self.stereo_infos = _Stream(reader, info_topic_for(reader, st, stereo_info_topic, self.path),
                                            self.path, _info_keep)
            self.lidar = None
            if lidar_topic is not None:
                self.lidar = _Stream(reader, pick_topic(reader, lidar_topic, (CLOUD_TYPE,), "PointCloud2", self.path),
                                     self.path)
        self.T_lidar_to_cam = None
        if self.lidar is not None:
            if T_lidar_to_cam is not None:
                self.T_lidar_to_cam = np.asarray(T_lidar_to_cam, dtype=np.float64)
            else:
                tfs = read_static_transforms(self.path)
                self.T_lidar_to_cam = lookup_transform(tfs, self.images.frame_id, self.lidar.frame_id)
        self.stereo_tolerance_ns = int(stereo_tolerance_s * 1e9)
        self.lidar_tolerance_ns = int(lidar_tolerance_s * 1e9)
        self._build_index(int(max_frame_gap_s * 1e9))

    def _build_index(self, max_gap_ns: int) -> None:
        offsets = [int(f) for f in self.frame_ids if f != "s"]
        lo, hi = min(offsets + [0]), max(offsets + [0])
        stamps = self.images.stamps
        self.samples, self.skipped = [], []
        for i in range(len(stamps)):
            if i + lo < 0 or i + hi >= len(stamps):
                self.skipped.append((i, stamps[i], "neighbour outside the recording"))
                continue
            gaps = np.diff(stamps[i + lo: i + hi + 1])
            if len(gaps) and gaps.max() > max_gap_ns:
                self.skipped.append((i, stamps[i], f"gap of {gaps.max() / 1e9:.3f} s between neighbours"))
                continue
            partner = None
            if self.stereo is not None:
                partner = nearest_by_stamp(self.stereo.stamps, stamps[i], self.stereo_tolerance_ns)
                if partner is None:
                    self.skipped.append((i, stamps[i], "no stereo partner within tolerance"))
                    continue
            self.samples.append((i, partner))

    def _reader(self):
        """One open reader per process (DataLoader workers fork after construction)."""
        if self._reader_ctx is None or self._reader_pid != os.getpid():
            self._reader_ctx = open_bag(self.path)
            self._reader_obj = self._reader_ctx.__enter__()
            self._reader_pid = os.getpid()
        return self._reader_obj

    def close(self) -> None:
        """Close the reader this process holds open (also done when the dataset is collected)."""
        ctx, self._reader_ctx = getattr(self, "_reader_ctx", None), None
        if ctx is not None and self._reader_pid == os.getpid():
            ctx.__exit__(None, None, None)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the reader's modules may already be gone
            pass

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader_ctx"] = state["_reader_obj"] = None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, stream, i: int) -> np.ndarray:
        conn, msg = stream.fetch(self._reader(), i, self.path)
        return decode_image(msg, conn.msgtype)

    def __getitem__(self, index: int) -> dict:
        i, partner = self.samples[index]
        t0 = self.images.stamps[i]
        images = {fid: self._image(self.images, i + int(fid)) for fid in self.frame_ids if fid != "s"}
        P = self.infos.extra[nearest_by_stamp(self.infos.stamps, t0)]
        baseline, side_sign = None, -1.0
        if partner is not None:
            images["s"] = self._image(self.stereo, partner)
            P_s = self.stereo_infos.extra[nearest_by_stamp(self.stereo_infos.stamps, t0)]
            t_own, t_partner = _cam_offset(P), _cam_offset(P_s)
            baseline = float(np.linalg.norm(t_own - t_partner))
            side_sign = -1.0 if t_own[0] > t_partner[0] else 1.0  # larger offset x = left camera
        draw = draw_augmentation(self.augment, self.is_train)
        sample = build_sample(images, P[:, :3], self.height, self.width, draw, baseline, side_sign)
        if self.lidar is not None:
            h0, w0 = images[0].shape[:2]
            j = nearest_by_stamp(self.lidar.stamps, t0, self.lidar_tolerance_ns)
            depth = np.zeros((h0, w0), dtype=np.float32)
            if j is not None:
                _, msg = self.lidar.fetch(self._reader(), j, self.path)
                depth = lidar_depth_map(decode_pointcloud(msg), self.T_lidar_to_cam, P[:, :3], (w0, h0))
            if draw.flip:
                depth = np.ascontiguousarray(depth[:, ::-1])
            sample["depth_gt"] = torch.from_numpy(depth)[None]
            sample["has_depth_gt"] = j is not None
        sample["index"] = i
        sample["stamp"] = t0
        sample["name"] = f"{self.images.topic} {i}"
        return sample


def _info_keep(msg) -> np.ndarray:
    """3x4 projection P of a camera_info ([K | 0] where P is unset)."""
    P = np.asarray(field(msg, "p"), dtype=np.float64).reshape(3, 4)
    if P[0, 0] <= 0:
        P = np.hstack([camera_matrix(msg), np.zeros((3, 1))])
    return P


def _cam_offset(P: np.ndarray) -> np.ndarray:
    """Translation of a rectified camera from the rig's reference: K^-1 P[:, 3] (ROS: -B in x)."""
    return np.linalg.solve(P[:, :3], P[:, 3])
