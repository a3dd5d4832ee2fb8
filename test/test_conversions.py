"""Image / CompressedImage / PointCloud2 conversions on a real KITTI frame, against OpenCV
and hand-built references."""
import cv2
import numpy as np
import pytest

pytest.importorskip("sensor_msgs")
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointField  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from diffsql_model.data.image_msgs import (ImageError, compressed_to_rgb8, image_to_array,  # noqa: E402
                                           image_to_rgb8)
from diffsql_model.colormaps import colorize_inverse_depth  # noqa: E402
from diffsql_ros.conversions import array_to_image  # noqa: E402
from diffsql_model.data.pointcloud_msgs import read_points  # noqa: E402
from diffsql_ros.pointcloud import (CameraInfoError, PointCloudBuilder, camera_info_for_image,  # noqa: E402
                                    intrinsics_for_image)


@pytest.fixture(scope="module")
def rgb(kitti_raw):
    path = kitti_raw / "2011_09_26/2011_09_26_drive_0001_sync/image_02/data/0000000000.png"
    return cv2.imread(str(path))[..., ::-1].copy()  # 375 x 1242 x 3 RGB


def _msg(arr, encoding, step=None, bigendian=False):
    h, w = arr.shape[:2]
    row = arr[0].nbytes
    step = step or row
    buf = np.zeros((h, step), np.uint8)
    data = arr.astype(arr.dtype.newbyteorder(">" if bigendian else "<"))
    buf[:, :row] = np.ascontiguousarray(data).view(np.uint8).reshape(h, row)
    return Image(height=h, width=w, encoding=encoding, step=step, is_bigendian=int(bigendian), data=buf.tobytes())


def test_rgb8_is_a_zero_copy_view_also_with_padded_rows(rgb):
    for step in (rgb.shape[1] * 3, rgb.shape[1] * 3 + 13):
        msg = _msg(rgb, "rgb8", step)
        out = image_to_rgb8(msg)
        np.testing.assert_array_equal(out, rgb)
        assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize("encoding,make", [
    ("bgr8", lambda x: x[..., ::-1]),
    ("rgba8", lambda x: np.dstack([x, np.full(x.shape[:2], 255, np.uint8)])),
    ("bgra8", lambda x: np.dstack([x[..., ::-1], np.zeros(x.shape[:2], np.uint8)])),
    ("rgb16", lambda x: x.astype(np.uint16) * 257),
    ("bgr16", lambda x: x[..., ::-1].astype(np.uint16) * 256 + 3),
])
def test_colour_encodings(rgb, encoding, make):
    np.testing.assert_array_equal(image_to_rgb8(_msg(make(rgb), encoding)), rgb)


@pytest.mark.parametrize("encoding,make", [
    ("mono8", lambda g: g), ("8UC1", lambda g: g),
    ("mono16", lambda g: g.astype(np.uint16) << 8 | 0x7F), ("16UC1", lambda g: g.astype(np.uint16) << 8),
    ("32FC1", lambda g: g.astype(np.float32) / 255.0),
])
@pytest.mark.parametrize("bigendian", [False, True])
def test_grey_encodings_both_byte_orders(rgb, encoding, make, bigendian):
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    out = image_to_rgb8(_msg(make(grey), encoding, bigendian=bigendian))
    np.testing.assert_array_equal(out, np.dstack([grey] * 3))


def test_big_endian_16bit_values_and_odd_step(rgb):
    depth_mm = (np.arange(20 * 7, dtype=np.uint16).reshape(20, 7) * 401)
    for step in (14, 15, 32):  # 15: rows not 2-byte aligned
        arr = image_to_array(_msg(depth_mm, "16UC1", step=step, bigendian=True))
        np.testing.assert_array_equal(arr, depth_mm)
        assert arr.dtype == np.uint16 and arr.dtype.isnative


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_patterns_demosaic_to_the_right_colours(rgb, pattern):
    """Mosaic the frame with the named 2x2 pattern; only the right demosaic gives it back."""
    index = {"r": 0, "g": 1, "b": 2}
    mosaic = np.empty(rgb.shape[:2], np.uint8)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, index[pattern[k]]]
    errors = {}
    for enc in ("rggb", "bggr", "gbrg", "grbg"):
        out = image_to_rgb8(_msg(mosaic, f"bayer_{enc}8"))
        errors[enc] = np.abs(out[2:-2, 2:-2].astype(float) - rgb[2:-2, 2:-2]).mean()
    assert min(errors, key=errors.get) == pattern, errors
    assert errors[pattern] < 6.0, errors
    out16 = image_to_rgb8(_msg(mosaic.astype(np.uint16) << 8, f"bayer_{pattern}16"))
    np.testing.assert_array_equal(out16, image_to_rgb8(_msg(mosaic, f"bayer_{pattern}8")))


@pytest.mark.parametrize("encoding,order", [("yuv422", "uyvy"), ("yuv422_yuy2", "yuyv")])
def test_yuv422(rgb, encoding, order):
    """Pack BT.601 YUV 4:2:2 by hand; decoding gives the frame back within chroma subsampling."""
    f = rgb.astype(np.float64)
    y = 16 + 0.257 * f[..., 0] + 0.504 * f[..., 1] + 0.098 * f[..., 2]
    u = 128 - 0.148 * f[..., 0] - 0.291 * f[..., 1] + 0.439 * f[..., 2]
    v = 128 + 0.439 * f[..., 0] - 0.368 * f[..., 1] - 0.071 * f[..., 2]
    u2, v2 = (u[:, 0::2] + u[:, 1::2]) / 2, (v[:, 0::2] + v[:, 1::2]) / 2
    packed = np.empty((rgb.shape[0], rgb.shape[1] // 2, 4))
    if order == "uyvy":
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = u2, y[:, 0::2], v2, y[:, 1::2]
    else:
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = y[:, 0::2], u2, y[:, 1::2], v2
    data = np.clip(np.round(packed), 0, 255).astype(np.uint8).reshape(rgb.shape[0], rgb.shape[1], 2)
    out = image_to_rgb8(_msg(data, encoding))
    assert np.abs(out.astype(float) - f).mean() < 4.0


def test_compressed_jpeg_and_png(rgb):
    bgr = rgb[..., ::-1]
    png = CompressedImage(format="png", data=cv2.imencode(".png", bgr)[1].tobytes())
    np.testing.assert_array_equal(compressed_to_rgb8(png), rgb)
    jpeg = cv2.imencode(".jpg", bgr)[1]
    jpg = CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes())
    np.testing.assert_array_equal(compressed_to_rgb8(jpg), cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1])
    assert np.abs(compressed_to_rgb8(jpg).astype(float) - rgb).mean() < 8.0
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    png16 = CompressedImage(format="png", data=cv2.imencode(".png", grey.astype(np.uint16) << 8)[1].tobytes())
    np.testing.assert_array_equal(compressed_to_rgb8(png16), np.dstack([grey] * 3))
    for bad in (b"", b"\xff\xd8 garbage"):
        with pytest.raises(ImageError):
            compressed_to_rgb8(CompressedImage(format="jpeg", data=bad))


def test_malformed_images_raise_image_error(rgb):
    good = _msg(rgb, "rgb8")
    cases = [
        dict(encoding="xyz42"), dict(data=good.data[:1000]), dict(data=b""), dict(step=100),
        dict(width=0), dict(height=0),
    ]
    for change in cases:
        msg = _msg(rgb, "rgb8")
        for k, v in change.items():
            setattr(msg, k, v)
        with pytest.raises(ImageError):
            image_to_rgb8(msg)


def test_array_to_image_round_trip():
    depth = np.linspace(0.5, 80, 6 * 9, dtype=np.float32).reshape(6, 9)
    depth[2, 3] = np.nan
    header = Header(frame_id="cam")
    msg = array_to_image(depth, "32FC1", header)
    assert (msg.encoding, msg.step, msg.is_bigendian, msg.header.frame_id) == ("32FC1", 36, 0, "cam")
    np.testing.assert_array_equal(image_to_array(msg), depth)
    with pytest.raises(ImageError):
        array_to_image(depth[..., None].repeat(3, 2), "32FC1")


def test_colorize_depth_near_is_warm_and_nan_black():
    depth = np.array([[1.0, 70.0, np.nan]], np.float32)
    col = colorize_inverse_depth(depth, 0.5, 80.0)
    assert col.shape == (1, 3, 3) and col.dtype == np.uint8
    assert col[0, 0, 0] > col[0, 0, 2] and col[0, 1, 2] > col[0, 1, 0]  # red near, blue far
    np.testing.assert_array_equal(col[0, 2], [0, 0, 0])


# ------------------------------------------------------------------ point clouds -------------
K = np.array([[721.5377, 0.0, 609.5593], [0.0, 721.5377, 172.854], [0.0, 0.0, 1.0]])


def test_pointcloud_layout_parses_back_like_depth_image_proc(rgb):
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 60, (h, w)).astype(np.float32)
    depth[:5] = np.nan
    valid = depth < 50
    header = Header(frame_id="cam2_optical")
    for rgb_in, decimation in ((rgb, 1), (None, 1), (rgb, 3)):
        cloud = PointCloudBuilder().build(depth, K, header, valid, rgb_in, decimation)
        step = 32 if rgb_in is not None else 16
        names = ["x", "y", "z"] + (["rgb"] if rgb_in is not None else [])
        assert [f.name for f in cloud.fields] == names
        assert [f.offset for f in cloud.fields] == [0, 4, 8, 16][: len(names)]
        assert all(f.datatype == PointField.FLOAT32 and f.count == 1 for f in cloud.fields)
        assert (cloud.point_step, cloud.is_dense, cloud.is_bigendian) == (step, False, False)
        assert (cloud.height, cloud.width) == (-(-h // decimation), -(-w // decimation))
        assert cloud.row_step == cloud.width * step and len(cloud.data) == cloud.row_step * cloud.height
        pts = read_points(cloud)
        v, u = np.mgrid[0:h:decimation, 0:w:decimation]
        d = depth[::decimation, ::decimation].astype(np.float64)
        ok = np.isfinite(d) & valid[::decimation, ::decimation]
        np.testing.assert_allclose(pts["x"][ok], ((u - K[0, 2]) / K[0, 0] * d)[ok], atol=1e-4)
        np.testing.assert_allclose(pts["y"][ok], ((v - K[1, 2]) / K[1, 1] * d)[ok], atol=1e-4)
        np.testing.assert_allclose(pts["z"][ok], d[ok], atol=1e-4)
        assert np.isnan(pts["x"][~ok]).all() and np.isnan(pts["z"][~ok]).all()
        if rgb_in is not None:
            raw = np.frombuffer(cloud.data, np.uint8).reshape(cloud.height, cloud.width, 32)
            # PCL's packed rgb: bytes b, g, r at offsets 16, 17, 18.
            np.testing.assert_array_equal(raw[..., 16:19], rgb[::decimation, ::decimation, ::-1])


def test_intrinsics_follow_resize_binning_and_roi():
    info = CameraInfo(width=1242, height=375, k=list(K.ravel()))
    np.testing.assert_allclose(intrinsics_for_image(info, 1242, 375), K)
    half = intrinsics_for_image(info, 621, 187)  # 375 / 2 rounds down: 0.3 % aspect change is a resize
    assert half[0, 0] == pytest.approx(K[0, 0] / 2) and half[1, 1] == pytest.approx(K[1, 1] * 187 / 375)
    assert half[0, 2] == pytest.approx((K[0, 2] + 0.5) / 2 - 0.5)
    binned = CameraInfo(width=1242, height=375, k=list(K.ravel()), binning_x=2, binning_y=2)
    np.testing.assert_allclose(intrinsics_for_image(binned, 621, 187)[:2], K[:2] / 2)
    roi = CameraInfo(width=1242, height=375, k=list(K.ravel()))
    roi.roi.x_offset, roi.roi.y_offset, roi.roi.width, roi.roi.height = 100, 50, 640, 192
    Kr = intrinsics_for_image(roi, 640, 192)
    assert (Kr[0, 2], Kr[1, 2]) == pytest.approx((K[0, 2] - 100, K[1, 2] - 50))
    with pytest.raises(CameraInfoError):
        intrinsics_for_image(CameraInfo(width=640, height=480, k=list(K.ravel())), 1242, 375)
    with pytest.raises(CameraInfoError):
        intrinsics_for_image(CameraInfo(width=1242, height=375), 1242, 375)  # uncalibrated: K = 0
    # a rectified image: P's left 3x3 is its camera (K is the raw camera's), as image_geometry reads it
    K_raw = K.copy()
    K_raw[0, 2] += 7.0
    P = np.hstack([K, [[-387.57], [0.0], [0.0]]])
    rect = CameraInfo(width=1242, height=375, k=list(K_raw.ravel()), p=list(P.ravel()))
    np.testing.assert_allclose(intrinsics_for_image(rect, 1242, 375), K)
    out = camera_info_for_image(rect, half, 621, 187, Header(frame_id="cam"))
    np.testing.assert_allclose(np.array(out.p).reshape(3, 4)[:, 3], [-387.57 / 2, 0, 0])
    out = camera_info_for_image(info, half, 621, 187, Header(frame_id="cam"))
    assert (out.width, out.height, out.header.frame_id) == (621, 187, "cam")
    np.testing.assert_allclose(np.array(out.p).reshape(3, 4)[:, :3], half)
