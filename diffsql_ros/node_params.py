"""The depth node's parameters: one table with defaults, descriptions, ranges and choices.

`config/depth.yaml` sets these; read-only ones need a restart (they rebuild the model or the
subscriptions), the rest change at runtime (`ros2 param set`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.parameter import Parameter

from diffsql_model.device import DEVICES, PRECISIONS
from diffsql_model.runtimes import RUNTIMES
from diffsql_model.yaml_config import ConfigError
from diffsql_ros.camera_stream import stream_names
from diffsql_ros.scale import SCALE_MODES, ScaleConfig

_SCALE = ScaleConfig()  # the scale.* defaults live in ScaleConfig only


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    choices: Optional[tuple] = None
    range: Optional[tuple] = None  # (from, to, step); step 0 = continuous for floats
    read_only: bool = False


PARAMETERS = (
    Param("checkpoint", "", "DiffSQL checkpoint (.pt from diffsql-train) to load", read_only=True),
    Param("sd_path", "", "local Stable Diffusion folder for checkpoints that leave out the frozen SD "
          "weights; empty = the folder the checkpoint was trained with", read_only=True),
    Param("device", "auto", "auto (cuda when available), cuda or cpu", DEVICES, read_only=True),
    Param("precision", "fp32", "fp32, bf16 or fp16 (CUDA only); bf16 for SD models on a GPU (their frozen SD is loaded in it)",
          tuple(PRECISIONS), read_only=True),
    Param("tf32", True, "CUDA, compute capability 8.0+ (Ampere and newer): fp32 matmuls and convolutions on "
          "TF32 tensor cores; false = IEEE fp32. No effect on CPU", read_only=True),
    Param("runtime", "eager", "eager (PyTorch), compile (torch.compile; CUDA graphs on a GPU), onnxruntime "
          "(CPU robots) or tensorrt (requirements-gpu.txt); exported graphs and engines are cached by model, "
          "size, precision and GPU, so the second start is fast", RUNTIMES, read_only=True),
    Param("input_height", 0, "network input height, multiple of 32; 0 = the checkpoint's", range=(0, 2048, 32),
          read_only=True),
    Param("input_width", 0, "network input width, multiple of 32; 0 = the checkpoint's", range=(0, 4096, 32),
          read_only=True),
    Param("cameras", (), "camera namespaces served by one model, e.g. [front, left]: each has its own "
          "<ns>/image and <ns>/camera_info in and <ns>/depth, ... out; frames that arrive together run as one "
          "batch; empty = one camera on the node's own topics", read_only=True),
    Param("output_resolution", "input", "input: outputs at the camera image's size; network: at the network "
          "input size, depth/camera_info's K scaled to it (REP 118; skips the upsample, a smaller cloud)",
          ("input", "network"), read_only=True),
    Param("image_transport", "raw", "raw: sensor_msgs/Image on 'image'; compressed: CompressedImage on "
          "'image/compressed'", ("raw", "compressed"), read_only=True),
    Param("input_qos", "sensor_data", "QoS of the image and camera_info subscriptions",
          ("sensor_data", "reliable"), read_only=True),
    Param("output_reliability", "reliable", "reliability of the outputs (reliable reaches every consumer)",
          ("reliable", "best_effort"), read_only=True),
    Param("diagnostics_period", 1.0, "seconds between /diagnostics messages", range=(0.1, 60.0, 0.0),
          read_only=True),
    Param("camera_info_tolerance", 0.005, "seconds: camera_info within this of the image stamp pairs with it, "
          "else the latest camera_info is used", range=(0.0, 10.0, 0.0)),
    Param("min_depth", 0.1, "metres: depth below is published as NaN", range=(0.0, 1000.0, 0.0)),
    Param("max_depth", 80.0, "metres: depth above is published as NaN", range=(0.001, 10000.0, 0.0)),
    Param("scale.mode", _SCALE.mode, "relative (model units), fixed (times scale.factor), stereo (metric "
          "MS-trained model times scale.stereo_factor), camera_height (ground-plane fit)", SCALE_MODES),
    Param("scale.factor", _SCALE.factor, "metres per model unit in fixed mode", range=(1e-6, 1e6, 0.0)),
    Param("scale.stereo_factor", _SCALE.stereo_factor, "stereo mode factor: 1 when trained with the baseline in metres",
          range=(1e-6, 1e6, 0.0)),
    Param("scale.camera_height", _SCALE.camera_height, "metres from the camera centre to the ground", range=(0.01, 100.0, 0.0)),
    Param("scale.ground_fraction", _SCALE.ground_fraction, "lower fraction of the image searched for the ground plane",
          range=(0.05, 1.0, 0.0)),
    Param("scale.process_noise", _SCALE.process_noise, "camera_height: how far log(scale) may drift per frame "
          "(Kalman filter of the ground fits); smaller = steadier, slower to follow", range=(0.0, 0.999, 0.0)),
    Param("scale.gate", _SCALE.gate, "camera_height: drop a ground fit this many sigmas off the filtered scale; 0 = keep all",
          range=(0.0, 100.0, 0.0)),
    Param("scale.max_gated", _SCALE.max_gated, "camera_height: this many dropped fits in a row restart the filter at "
          "their median (a genuine step)", range=(1, 1000, 1)),
    # 4: one point per 5 cm voxel (Nav2's voxel layer default) out to 0.05 fx / 4 metres, 4.6 m for
    # KITTI-normalised 640x192 (fx 371, obstacle range 2.5 m), 16x fewer points (docs/benchmarks.md).
    Param("points.decimation", 4, "keep every n-th row and column of the cloud (1 = every pixel)", range=(1, 16, 1)),
    Param("points.min_range", 0.0, "metres: closer points are NaN", range=(0.0, 1000.0, 0.0)),
    Param("points.max_range", 80.0, "metres: farther points are NaN", range=(0.0, 10000.0, 0.0)),
    Param("points.max_uncertainty", 0.0, "points with uncertainty / depth above this are NaN; 0 = off",
          range=(0.0, 100.0, 0.0)),
    Param("points.rgb", False, "add packed rgb to the cloud: point_step 32 instead of 16, twice the bytes "
          "(rviz2: Color Transformer RGB8)"),
    Param("publish.depth", True, "publish depth (32FC1) and depth/camera_info"),
    Param("publish.points", True, "publish points (PointCloud2)"),
    Param("publish.uncertainty", True, "publish depth/uncertainty (32FC1, metres)"),
    Param("publish.colored", True, "publish depth/colored (rgb8 colour map of inverse depth)"),
)


def _descriptor(p: Param) -> ParameterDescriptor:
    text = p.description + (f" [{', '.join(p.choices)}]" if p.choices else "")
    d = ParameterDescriptor(name=p.name, description=text, read_only=p.read_only)
    if p.range is not None:
        lo, hi, step = p.range
        if isinstance(p.default, int):
            d.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=step)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=float(step))]
    return d


def declare_all(node) -> None:
    for p in PARAMETERS:
        if isinstance(p.default, tuple):  # a string list: rclpy cannot infer the type of an empty default
            d = _descriptor(p)
            d.type = ParameterType.PARAMETER_STRING_ARRAY
            node.declare_parameter(p.name, Parameter.Type.STRING_ARRAY, d)
        else:
            node.declare_parameter(p.name, p.default, _descriptor(p))


def read_all(node) -> dict:
    """Every parameter's value; a string list left unset (rclpy: uninitialised) is its default."""
    values = {}
    for p in PARAMETERS:
        try:
            values[p.name] = node.get_parameter(p.name).value
        except ParameterUninitializedException:
            values[p.name] = list(p.default)
    return values


def check_params(values: dict) -> None:
    """Choices and cross-parameter rules rclpy ranges cannot express; ConfigError names the problem."""
    for p in PARAMETERS:
        if p.choices and values[p.name] not in p.choices:
            raise ConfigError(f"parameter {p.name} must be one of {p.choices}, got {values[p.name]!r}")
        if isinstance(p.default, tuple) and not isinstance(values[p.name], (list, tuple, type(None))):
            raise ConfigError(f"parameter {p.name} must be a list of strings, got {values[p.name]!r}")
        if isinstance(p.default, bool) and not isinstance(values[p.name], bool):
            raise ConfigError(f"parameter {p.name} must be true or false, got {values[p.name]!r}")
    if values["min_depth"] >= values["max_depth"]:
        raise ConfigError(f"need min_depth < max_depth, got {values['min_depth']} >= {values['max_depth']}")
    if values["points.min_range"] > values["points.max_range"]:
        raise ConfigError("need points.min_range <= points.max_range")
    stream_names(values["cameras"])
    if bool(values["input_height"]) != bool(values["input_width"]):
        raise ConfigError("set both input_height and input_width, or neither (0 = the checkpoint's size)")
