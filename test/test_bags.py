"""Bags written with rosbags from real KITTI frames read back into the same samples as
KittiRawDataset; LiDAR depth from the bag against the .bin projected directly; encodings,
field spellings, damaged bags; stamp pairing."""
import datetime

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from diffsql_model.data.bag_reader import (
    BagError, decode_image, iter_messages, lookup_transform, open_bag, pick_topic, read_camera_stream, read_lidar,
    read_message_at, read_static_transforms,
)
from diffsql_model.data.bag_types import get_bag_typestore
from diffsql_model.data.bag_writer import BagFrame, BagWriteError, _Messages, kitti_drive_to_bag, write_bag
from diffsql_model.data.bags import BagDataset
from diffsql_model.data.pointcloud_msgs import decode_pointcloud
from diffsql_model.data.ros_fields import camera_matrix, field
from diffsql_model.data.calib import load_kitti_calib
from diffsql_model.data.kitti import KittiRawDataset
from diffsql_model.data.pairing import StampPairer, nearest_by_stamp, stamp_ns

DATE, DRIVE = "2011_09_26", "2011_09_26_drive_0001_sync"
TOPICS = {  # fmt -> (left image, right image, lidar)
    "ros1": ("/kitti/camera_color_left/image_raw", "/kitti/camera_color_right/image_raw", "/kitti/velo/pointcloud"),
    "sqlite3": ("/camera/left/image_raw", "/camera/right/image_raw", "/lidar/points"),
    "mcap": ("/camera/left/image_raw", "/camera/right/image_raw", "/lidar/points"),
}


@pytest.fixture(scope="module")
def bags(kitti_raw, tmp_path_factory):
    """Frames 0-5 of drive 0001 (all with scans) as a ROS 1 bag and ROS 2 sqlite3 / mcap bags."""
    out = tmp_path_factory.mktemp("bags")
    return {fmt: kitti_drive_to_bag(kitti_raw, DATE, "0001", out / ("drive.bag" if fmt == "ros1" else fmt),
                                    fmt, frames=range(6)) for fmt in TOPICS}


def png(kitti_raw, cam, frame):
    return np.asarray(Image.open(kitti_raw / DATE / DRIVE / f"image_0{cam}/data/{frame:010d}.png").convert("RGB"))


def reference_depth(kitti_raw, frame):
    """Independent reference: the .bin projected with the devkit matrix P_velo_to_image; value = its
    third coordinate (camera z), pixel floor(u + 0.5), nearest point per pixel."""
    calib = load_kitti_calib(kitti_raw / DATE, 2)
    pts = np.fromfile(kitti_raw / DATE / DRIVE / f"velodyne_points/data/{frame:010d}.bin", np.float32).reshape(-1, 4)
    uvw = np.c_[pts[:, :3].astype(np.float64), np.ones(len(pts))] @ calib.P_velo_to_image.T
    uvw = uvw[uvw[:, 2] > 1e-3]
    u = np.floor(uvw[:, 0] / uvw[:, 2] + 0.5).astype(int)
    v = np.floor(uvw[:, 1] / uvw[:, 2] + 0.5).astype(int)
    ok = (u >= 0) & (v >= 0) & (u < 1242) & (v < 375)
    ref = np.full((375, 1242), np.inf)
    np.minimum.at(ref, (v[ok], u[ok]), uvw[ok, 2])
    ref[np.isinf(ref)] = 0
    return ref


@pytest.mark.parametrize("fmt", list(TOPICS))
def test_bag_samples_equal_kitti_samples(bags, kitti_raw, fmt):
    left, right, _ = TOPICS[fmt]
    kd = KittiRawDataset(kitti_raw, [f"{DATE}/{DRIVE} {i} l" for i in range(1, 5)], 192, 640,
                         stereo=True, is_train=False)
    bd = BagDataset(bags[fmt], 192, 640, (0, -1, 1, "s"), image_topic=left, stereo_image_topic=right,
                    is_train=False)
    assert len(bd) == 4 and [s[0] for s in bd.skipped] == [0, 5]  # ends lack a neighbour
    for n in range(4):
        a, b = kd[n], bd[n]
        for key in [("color", f) for f in (0, -1, 1, "s")] + ["K", "inv_K", "stereo_T"]:
            assert torch.equal(a[key], b[key]), key
        assert a["stamp"] == b["stamp"]


@pytest.mark.parametrize("fmt", list(TOPICS))
def test_bag_lidar_depth_equals_bin_projection(bags, kitti_raw, fmt):
    left, _, lidar = TOPICS[fmt]
    bd = BagDataset(bags[fmt], 192, 640, (0, -1, 1), image_topic=left, lidar_topic=lidar, is_train=False)
    # camera <- velo composed from /tf_static: imu_link -> velo_link and imu_link -> camera_color_left
    calib = load_kitti_calib(kitti_raw / DATE, 2)
    assert np.allclose(bd.T_lidar_to_cam, calib.T_velo_to_cam, atol=1e-6)
    for n in (0, 3):
        s = bd[n]
        assert s["has_depth_gt"] and s["depth_gt"].shape == (1, 375, 1242)
        d, ref = s["depth_gt"][0].numpy(), reference_depth(kitti_raw, s["index"])
        assert (d > 0).sum() > 15000
        assert np.array_equal(d > 0, ref > 0)
        assert np.abs(d - ref).max() < 1e-4  # float32 cloud + quaternion round trip


@pytest.mark.parametrize("fmt", ["ros1", "sqlite3"])
def test_bag_without_tf_static(bags, kitti_raw, tmp_path, fmt):
    """Many robot bags have no /tf_static: its reader found no connection and rosbags, given an
    empty list, read every message as a transform. Now the LiDAR needs an explicit extrinsic,
    or shares the camera's frame (identity)."""
    left, _, lidar = TOPICS[fmt]
    T = load_kitti_calib(kitti_raw / DATE, 2).T_velo_to_cam
    pairs = list(zip(read_camera_stream(bags[fmt], left), read_lidar(bags[fmt], lidar)))
    plain = write_bag(tmp_path / ("plain.bag" if fmt == "ros1" else "plain"), fmt=fmt, frames=[
        BagFrame(c.stamp_ns, c.rgb, c.K, points=s.points, lidar_stamp_ns=s.stamp_ns) for c, s in pairs])
    assert read_static_transforms(plain) == []
    with open_bag(plain) as reader:
        assert list(iter_messages(reader, [], plain)) == []
    with pytest.raises(BagError, match="no /tf_static topic .* 'velo_link' .* 'camera_color_left' .*--extrinsic"):
        BagDataset(plain, 96, 320, (0,), lidar_topic=lidar, is_train=False)
    given = BagDataset(plain, 96, 320, (0,), lidar_topic=lidar, T_lidar_to_cam=T, is_train=False)
    assert given.lidar.extrinsic_source == "--extrinsic"
    in_cam = [BagFrame(c.stamp_ns, c.rgb, c.K, lidar_stamp_ns=s.stamp_ns,
                       points=np.c_[s.points[:, :3] @ T[:3, :3].T + T[:3, 3], s.points[:, 3]].astype(np.float32))
              for c, s in pairs]
    shared = write_bag(tmp_path / ("cam.bag" if fmt == "ros1" else "cam"), in_cam, fmt,
                       frame_ids={"lidar": "camera_color_left"})
    same = BagDataset(shared, 96, 320, (0,), lidar_topic=lidar, is_train=False)
    assert np.array_equal(same.T_lidar_to_cam, np.eye(4)) and same.lidar.extrinsic_source.startswith("identity")
    for n in (0, 4):
        ref = reference_depth(kitti_raw, n)
        d = given[n]["depth_gt"][0].numpy()
        assert np.array_equal(d > 0, ref > 0) and np.abs(d - ref).max() < 1e-4
        d = same[n]["depth_gt"][0].numpy()  # points rounded to float32 in the camera frame
        assert (d > 0).sum() > 15000 and ((d > 0) != (ref > 0)).sum() <= 5
        both = (d > 0) & (ref > 0)
        assert np.abs(d - ref)[both].max() < 1e-4


def test_camera_stream_lidar_and_tf_read_back(bags, kitti_raw):
    path = bags["ros1"]
    with pytest.raises(BagError, match=r"several camera image topics.*camera_color_left.*camera_color_right"):
        list(read_camera_stream(path))
    frames = list(read_camera_stream(path, "/kitti/camera_color_left/image_raw"))
    assert [f.stamp_ns for f in frames][1] == int(datetime.datetime(
        2011, 9, 26, 13, 2, 26, tzinfo=datetime.timezone.utc).timestamp()) * 10**9 + 64785152
    assert np.array_equal(frames[2].rgb, png(kitti_raw, 2, 2))  # rgb8 is lossless
    assert np.allclose(frames[0].K, [[721.5377, 0, 609.5593], [0, 721.5377, 172.854], [0, 0, 1]])
    assert frames[0].frame_id == "camera_color_left"
    scans = list(read_lidar(bags["mcap"]))
    bin4 = np.fromfile(kitti_raw / DATE / DRIVE / "velodyne_points/data/0000000004.bin", np.float32).reshape(-1, 4)
    assert len(scans) == 6 and np.array_equal(scans[4].points, bin4)
    tfs = read_static_transforms(bags["sqlite3"])
    assert {(p, c) for p, c, _ in tfs} == {("imu_link", "velo_link"), ("imu_link", "camera_color_left"),
                                           ("imu_link", "camera_color_right")}
    T = lookup_transform(tfs, "camera_color_right", "camera_color_left")  # left -> right: -0.53 m in x
    assert T[0, 3] == pytest.approx(-0.5327, abs=1e-3)
    with pytest.raises(BagError, match="no static transform chain"):
        lookup_transform(tfs, "camera_color_left", "base_footprint")


def test_pick_topic_preferred_and_optional(bags):
    left, right = TOPICS["ros1"][:2]
    image_types = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
    with open_bag(bags["ros1"]) as reader:
        assert pick_topic(reader, None, image_types, "image", "b", preferred=("/absent", left)) == left
        assert pick_topic(reader, right, image_types, "image", "b", preferred=(left,)) == right  # named wins
        with pytest.raises(BagError, match="several image topics"):
            pick_topic(reader, None, image_types, "image", "b", preferred=("/absent",))
        assert pick_topic(reader, None, ("sensor_msgs/msg/Imu",), "IMU", "b", required=False) is None
        with pytest.raises(BagError, match="no IMU topic"):
            pick_topic(reader, None, ("sensor_msgs/msg/Imu",), "IMU", "b")
        with pytest.raises(BagError, match="expected sensor_msgs/msg/PointCloud2"):
            pick_topic(reader, left, ("sensor_msgs/msg/PointCloud2",), "cloud", "b", required=False)


def test_read_message_at_seeks_one_scan(bags, kitti_raw):
    topic = TOPICS["mcap"][2]
    with open_bag(bags["mcap"]) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        index = [(t, stamp_ns(m.header)) for _, t, m in iter_messages(reader, conns, "b")]
        _, msg = read_message_at(reader, topic, *index[3], "b")
        with pytest.raises(BagError, match="vanished on re-read"):
            read_message_at(reader, topic, index[3][0], index[2][1], "b")  # another scan's stamp
    bin3 = np.fromfile(kitti_raw / DATE / DRIVE / "velodyne_points/data/0000000003.bin", np.float32).reshape(-1, 4)
    assert np.array_equal(decode_pointcloud(msg), bin3)


def test_frames_without_scan_get_no_depth(kitti_raw, tmp_path):
    # frame 50 has an image but no velodyne scan: no LiDAR message for it
    path = kitti_drive_to_bag(kitti_raw, DATE, "0001", tmp_path / "b", "mcap", frames=[3, 4, 5, 50])
    assert len(list(read_lidar(path))) == 3
    bd = BagDataset(path, 96, 320, (0,), image_topic="/camera/left/image_raw", lidar_topic="/lidar/points",
                    is_train=False)
    assert [bd[i]["has_depth_gt"] for i in range(4)] == [True, True, True, False]
    assert bd[3]["depth_gt"].abs().sum() == 0 and bd[2]["depth_gt"].abs().sum() > 0
    bd = BagDataset(path, 96, 320, (0, -1, 1), image_topic="/camera/left/image_raw", is_train=False)
    assert len(bd) == 1 and bd[0]["index"] == 1  # frame 4; frame 5's next image is frame 50
    assert bd.skipped[1][0] == 2 and "gap of 4.640 s" in bd.skipped[1][2]


def test_ros1_and_ros2_field_spellings(bags):
    for fmt, name in (("ros1", "/kitti/camera_color_left/camera_info"), ("mcap", "/camera/left/camera_info")):
        with open_bag(bags[fmt]) as reader:
            conn = next(c for c in reader.connections if c.topic == name)
            _, _, raw = next(reader.messages(connections=[conn]))
            msg = reader.deserialize(raw, conn.msgtype)
        assert hasattr(msg, "K" if fmt == "ros1" else "k") and not hasattr(msg, "k" if fmt == "ros1" else "K")
        assert field(msg, "p")[3] == pytest.approx(44.85728) and field(msg, "K")[0] == pytest.approx(721.5377)
        assert camera_matrix(msg)[0, 2] == pytest.approx(609.5593)


@pytest.mark.parametrize("encoding", ["bgr8", "mono8", "png", "jpeg"])
def test_image_encodings_decode(kitti_raw, tmp_path, encoding):
    rgb = png(kitti_raw, 2, 1)
    K = np.array([[721.5377, 0, 609.5593], [0, 721.5377, 172.854], [0, 0, 1]])
    path = write_bag(tmp_path / "e.bag", [BagFrame(10**9, rgb, K)], "ros1", image_encoding=encoding)
    (frame,) = read_camera_stream(path)
    if encoding in ("bgr8", "png"):
        assert np.array_equal(frame.rgb, rgb)
    elif encoding == "mono8":
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        assert np.array_equal(frame.rgb, np.repeat(gray[:, :, None], 3, axis=2))
    else:  # lossy (quality 95, chroma subsampling on noisy KITTI pixels): close, and not channel-swapped
        err = np.abs(frame.rgb.astype(int) - rgb).mean()
        assert err < 6 and np.abs(frame.rgb[:, :, ::-1].astype(int) - rgb).mean() > 2 * err


def test_padded_rows_bad_encoding_and_pointcloud_field_i():
    store = get_bag_typestore(ros1=False)
    m = _Messages(store, ros1=False)
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    _, msg = m.image(0, "cam", rgb, "rgb8")
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)
    msg.step, msg.data = 12, padded.reshape(-1)  # rows padded to 12 bytes
    assert np.array_equal(decode_image(msg, "sensor_msgs/msg/Image"), rgb)
    bgra = np.concatenate([rgb[:, :, ::-1], np.full((2, 3, 1), 255, np.uint8)], axis=2)
    msg.encoding, msg.step, msg.data = "bgra8", 12, bgra.reshape(-1)
    assert np.array_equal(decode_image(msg, "sensor_msgs/msg/Image"), rgb)
    msg.step = 4  # shorter than a row
    with pytest.raises(BagError, match="step 4"):
        decode_image(msg, "sensor_msgs/msg/Image")
    msg.encoding = "32SC1"
    with pytest.raises(BagError, match="unsupported encoding '32SC1'"):
        decode_image(msg, "sensor_msgs/msg/Image")
    # what the node decodes, the bag readers decode: big-endian mono16 and bayer
    mono = np.array([[0x1200, 0xFF00, 0x0100]], np.uint16)
    msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian = "mono16", 1, 3, 6, 1
    msg.data = np.frombuffer(mono.astype(">u2").tobytes(), np.uint8)
    assert np.array_equal(decode_image(msg, "sensor_msgs/msg/Image")[0, :, 0], [0x12, 0xFF, 0x01])
    # a cloud with field "i" and a 32-byte point step (Ouster/Livox style padding)
    F = store.types["sensor_msgs/msg/PointField"]
    pts = np.array([[1, 2, 3, 0.5], [4, 5, 6, 0.25]], np.float32)
    buf = np.zeros((2, 8), np.float32)
    buf[:, [0, 1, 2, 5]] = pts
    _, cloud = m.pointcloud(0, "lidar", pts)
    cloud.fields = [F(name=n, offset=o, datatype=7, count=1) for n, o in (("x", 0), ("y", 4), ("z", 8), ("i", 20))]
    cloud.point_step, cloud.row_step, cloud.data = 32, 64, buf.view(np.uint8).reshape(-1)
    assert np.array_equal(decode_pointcloud(cloud), pts)


@pytest.mark.parametrize("fmt", list(TOPICS))
def test_truncated_bag_is_a_clear_error(bags, tmp_path, fmt):
    src = bags[fmt]
    if fmt == "ros1":
        dst = tmp_path / "cut.bag"
        dst.write_bytes(src.read_bytes()[: src.stat().st_size * 6 // 10])
    else:
        dst = tmp_path / "cut"
        dst.mkdir()
        (dst / "metadata.yaml").write_bytes((src / "metadata.yaml").read_bytes())
        data = next(p for p in src.iterdir() if p.suffix in (".db3", ".mcap"))
        (dst / data.name).write_bytes(data.read_bytes()[: data.stat().st_size * 6 // 10])
    with pytest.raises(BagError, match=f"cannot open bag {dst}"):
        BagDataset(dst, 96, 320, image_topic=TOPICS[fmt][0])
    with pytest.raises(BagError, match="bag not found"):
        list(read_camera_stream(tmp_path / "missing.bag"))


def test_writer_refuses_bad_input(tmp_path, bags):
    K = np.eye(3)
    with pytest.raises(BagWriteError, match="exists already"):
        write_bag(bags["mcap"], [], "mcap")
    with pytest.raises(BagWriteError, match="unknown bag format"):
        write_bag(tmp_path / "x", [], "rosbag3")
    with pytest.raises(BagWriteError, match="H x W x 3 uint8"):
        write_bag(tmp_path / "y.bag", [BagFrame(0, np.zeros((4, 4), np.float32), K)], "ros1")


def test_nearest_by_stamp_and_pairer():
    stamps = [100, 200, 300]
    assert nearest_by_stamp(stamps, 240) == 1 and nearest_by_stamp(stamps, 260) == 2
    assert nearest_by_stamp(stamps, 250) == 1  # tie -> earlier
    assert nearest_by_stamp(stamps, 10) == 0 and nearest_by_stamp(stamps, 999) == 2
    assert nearest_by_stamp(stamps, 260, tolerance_ns=30) is None
    assert nearest_by_stamp([], 5) is None
    p = StampPairer(capacity=2, tolerance_ns=20, fallback_latest=True)
    assert p.match(5) is None
    p.add(100, "a"); p.add(200, "b"); p.add(150, "c")  # out of order is inserted; capacity drops "a"
    assert len(p) == 2 and p.match(100) == "b"  # "a" gone, nothing within 20 ns -> latest
    assert p.match(160) == "c" and p.match(200) == "b"
    strict = StampPairer(tolerance_ns=0, fallback_latest=False)
    strict.add(100, "a")
    assert strict.match(100) == "a" and strict.match(101) is None


def test_dataloader_workers_reopen_the_bag(bags):
    # the parent already holds a reader (sqlite handles must not cross fork): workers open their own
    ds = BagDataset(bags["sqlite3"] / "sqlite3.db3", 96, 320, (0, -1, 1), image_topic="/camera/left/image_raw",
                    is_train=False)  # the storage file instead of its folder is accepted too
    first = ds[0][("color", 0)]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [b[("color", 0)].shape[0] for b in batches] == [2, 2]
    assert torch.equal(batches[0][("color", 0)][0], first)
    assert torch.equal(batches[1]["stamp"], torch.tensor([ds[2]["stamp"], ds[3]["stamp"]]))
