"""`BagDataset`: training samples (docs/interfaces.md dict) from one camera of a ROS 1 / ROS 2 bag."""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
import torch

from diffsql_model.data.augment import AugmentConfig, build_sample, draw_augmentation
from diffsql_model.data.bag_index import BagHandle, TopicIndex
from diffsql_model.data.bag_reader import BagError, decode_image, decoded, info_topic_for, pick_topic
from diffsql_model.data.bag_types import CLOUD_TYPE, IMAGE_TYPES
# Not used here: sample_cli and test_eval_cli still import it from this module.
from diffsql_model.data.lidar import LidarDepth
from diffsql_model.data.ros_fields import projection_matrix


class BagDataset(torch.utils.data.Dataset):
    """Samples (docs/interfaces.md dict) from one camera of a bag; neighbours are the adjacent
    images by stamp. Centres whose neighbours are missing or further apart than
    `max_frame_gap_s` per step are skipped and listed in `self.skipped`.

    K: from the camera_info nearest in stamp. "s" in frame_ids needs `stereo_image_topic`;
    the baseline comes from both camera_infos' P. lidar_topic: adds "depth_gt" (1 x H x W,
    camera z in metres, 0 = no point, from the scan nearest in stamp within
    `lidar_tolerance_s`; zeros + has_depth_gt=False where none; `lidar.LidarDepth`).
    T_lidar_to_cam: 4x4 extrinsic, default composed from /tf_static (identity where camera and
    LiDAR share a frame).
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
        self.bag = BagHandle(self.path)
        reader = self.bag.reader()
        topic = pick_topic(reader, image_topic, IMAGE_TYPES, "camera image", self.path)
        self.images = TopicIndex.build(self.bag, topic)
        if not len(self.images):
            raise BagError(f"{self.path}: image topic {topic} holds no message")
        self.infos = self._infos(info_topic_for(reader, topic, info_topic, self.path))
        if not len(self.infos):
            raise BagError(f"{self.path}: camera_info topic {self.infos.topic} holds no message")
        self.stereo = self.stereo_infos = None
        if "s" in self.frame_ids:
            if stereo_image_topic is None:
                raise BagError(f"{self.path}: frame id 's' needs stereo_image_topic")
            st = pick_topic(reader, stereo_image_topic, IMAGE_TYPES, "camera image", self.path)
            self.stereo = TopicIndex.build(self.bag, st)
            self.stereo_infos = self._infos(info_topic_for(reader, st, stereo_info_topic, self.path))
        self.lidar = None
        if lidar_topic is not None:
            lt = pick_topic(reader, lidar_topic, (CLOUD_TYPE,), "PointCloud2", self.path)
            self.lidar = LidarDepth.from_bag(self.bag, lt, self.images.frame_id, T_lidar_to_cam, lidar_tolerance_s)
        self.T_lidar_to_cam = None if self.lidar is None else self.lidar.T_lidar_to_cam
        self.stereo_tolerance_ns = int(stereo_tolerance_s * 1e9)
        self._build_index(int(max_frame_gap_s * 1e9))

    def _infos(self, topic: str) -> TopicIndex:
        """camera_info index keeping each message's 3x4 projection."""
        return TopicIndex.build(self.bag, topic, lambda m: decoded(projection_matrix, m, self.path, topic))

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
                partner = self.stereo.nearest(stamps[i], self.stereo_tolerance_ns)
                if partner is None:
                    self.skipped.append((i, stamps[i], "no stereo partner within tolerance"))
                    continue
            self.samples.append((i, partner))

    def close(self) -> None:
        """Close the reader this process holds open (also done when the dataset is collected)."""
        self.bag.close()

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: TopicIndex, i: int) -> np.ndarray:
        conn, msg = index.read(i)
        return decode_image(msg, conn.msgtype)

    def __getitem__(self, index: int) -> dict:
        i, partner = self.samples[index]
        t0 = self.images.stamps[i]
        images = {fid: self._image(self.images, i + int(fid)) for fid in self.frame_ids if fid != "s"}
        P = self.infos.kept[self.infos.nearest(t0)]
        baseline, side_sign = None, -1.0
        if partner is not None:
            images["s"] = self._image(self.stereo, partner)
            P_s = self.stereo_infos.kept[self.stereo_infos.nearest(t0)]
            t_own, t_partner = _cam_offset(P), _cam_offset(P_s)
            baseline = float(np.linalg.norm(t_own - t_partner))
            side_sign = -1.0 if t_own[0] > t_partner[0] else 1.0  # larger offset x = left camera
        draw = draw_augmentation(self.augment, self.is_train)
        sample = build_sample(images, P[:, :3], self.height, self.width, draw, baseline, side_sign)
        if self.lidar is not None:
            h0, w0 = images[0].shape[:2]
            depth, _ = self.lidar.depth_map(t0, P[:, :3], (w0, h0))
            has_depth = depth is not None
            if not has_depth:
                depth = np.zeros((h0, w0), dtype=np.float32)
            if draw.flip:
                depth = np.ascontiguousarray(depth[:, ::-1])
            sample["depth_gt"] = torch.from_numpy(depth)[None]
            sample["has_depth_gt"] = has_depth
        sample["index"] = i
        sample["stamp"] = t0
        sample["name"] = f"{self.images.topic} {i}"
        return sample


def _cam_offset(P: np.ndarray) -> np.ndarray:
    """Translation of a rectified camera from the rig's reference: K^-1 P[:, 3] (ROS: -B in x)."""
    return np.linalg.solve(P[:, :3], P[:, 3])
