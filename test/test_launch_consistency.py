"""launch/depth.launch.py, config/depth.yaml and config/depth.rviz agree with the package.

test_launch.py runs the launch file for real (package lookup, executable, remaps, params file,
Ctrl-C). This reads it with `ast` for what one run does not reach: the defaults it did not
take (the shipped params file, rviz), remaps of the other transport, the Fast DDS profile.
"""
import ast
import pathlib

import pytest
import yaml

pytest.importorskip("rclpy")
from diffsql_ros.depth_node import PUBLISHED_TOPICS, SUBSCRIBED_TOPICS  # noqa: E402
from diffsql_ros.node_params import PARAMETERS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "depth.launch.py"
PARAMS = ROOT / "config" / "depth.yaml"
RVIZ = ROOT / "config" / "depth.rviz"


def _const(node):
    return node.value if isinstance(node, ast.Constant) else None


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.fixture(scope="module")
def launch_tree():
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


@pytest.fixture(scope="module")
def launch_args(launch_tree):
    return {_const(c.args[0]): _const(_kw(c, "default_value")) for c in _calls(launch_tree, "DeclareLaunchArgument")}


def test_launch_arguments_and_files(launch_tree, launch_args):
    calls = _calls(launch_tree, "Node") + _calls(launch_tree, "LifecycleNode")
    assert {_const(_kw(c, "executable")) for c in calls} == {"depth_node", "managed_depth_node", "rviz2"}
    assert {_const(_kw(c, "package")) for c in ast.walk(launch_tree) if isinstance(c, ast.Call)} >= {"diffsql_ros", "rviz2"}
    assert {"params_file", "checkpoint", "image", "camera_info", "rviz", "camera_frame"} <= set(launch_args)
    used = {_const(c.args[0]) for c in _calls(launch_tree, "LaunchConfiguration") + _calls(launch_tree, "arg")}
    used.discard(None)  # arg(name): the names come from the arg("...") calls
    assert used <= set(launch_args), used - set(launch_args)
    # The default params file and rviz config are config/depth.yaml and config/depth.rviz of the share dir.
    joins = [[_const(e) for e in c.args[0].elts] for c in _calls(launch_tree, "PathJoinSubstitution")]
    assert [None, "config", "depth.yaml"] in joins and [None, "config", "depth.rviz"] in joins


def test_remappings_name_topics_the_node_uses(launch_tree):
    fn = next(n for n in ast.walk(launch_tree) if isinstance(n, ast.FunctionDef) and n.name == "_remappings")
    single = next(n for n in ast.walk(fn) if isinstance(n, ast.Return) and isinstance(n.value, ast.List))
    remaps = [_const(t.elts[0]) for t in single.value.elts]
    # Every input the node subscribes (and nothing else) can be remapped from the launch file.
    assert set(remaps) == set(SUBSCRIBED_TOPICS)


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def test_every_params_file_key_is_declared_with_the_same_type():
    doc = yaml.safe_load(PARAMS.read_text())
    assert list(doc) == ["/**"] and list(doc["/**"]) == ["ros__parameters"]
    values = dict(_flatten(doc["/**"]["ros__parameters"]))
    declared = {p.name: p for p in PARAMETERS}
    assert set(values) <= set(declared), set(values) - set(declared)
    for name, value in values.items():
        p = declared[name]
        # rclpy refuses an int for a double parameter: the YAML literal must have the declared type.
        assert type(value) is type(p.default), (name, value, p.default)
        assert value == p.default, f"{name}: params file {value!r} != declared default {p.default!r}"
        if p.choices:
            assert value in p.choices
    assert all(p.description for p in PARAMETERS)


def test_rviz_config_shows_the_node_outputs(launch_args):
    cfg = yaml.safe_load(RVIZ.read_text())["Visualization Manager"]
    displays = {d["Class"].split("/")[-1] + ":" + d["Topic"]["Value"]: d for d in cfg["Displays"] if "Topic" in d}
    assert set(displays) == {"Image:/depth/colored", "Image:/depth/uncertainty", "PointCloud2:/points"}
    for d in displays.values():
        assert d["Topic"]["Value"].lstrip("/") in PUBLISHED_TOPICS
        # The node publishes reliable by default; a Reliable subscription matches it.
        assert d["Topic"]["Reliability Policy"] == "Reliable"
    default_rel = next(p.default for p in PARAMETERS if p.name == "output_reliability")
    assert default_rel == "reliable"
    # The colouring must exist in the default cloud: RGB8 needs points.rgb; AxisColor on z (the
    # optical axis, so colour = depth) works for x/y/z alone.
    rgb_default = next(p.default for p in PARAMETERS if p.name == "points.rgb")
    cloud = displays["PointCloud2:/points"]
    if rgb_default:
        assert cloud["Color Transformer"] == "RGB8"
    else:
        assert (cloud["Color Transformer"], cloud["Axis"]) == ("AxisColor", "Z")
    assert cfg["Global Options"]["Fixed Frame"] == launch_args["camera_frame"]


def test_fastdds_profile_argument_sets_the_variable_before_any_process(launch_tree, launch_args):
    assert launch_args["fastdds_profile"] == ""  # DDS left as the robot configures it by default
    (env,) = _calls(launch_tree, "SetEnvironmentVariable")
    assert _const(env.args[0]) == "FASTDDS_DEFAULT_PROFILES_FILE"
    assert _const(env.args[1].args[0]) == "fastdds_profile"
    # Launch hands its environment to the processes started after the action: it comes first.
    description = next(c for c in _calls(launch_tree, "LaunchDescription"))
    order = [getattr(e.func, "id", None) for e in description.args[0].elts]
    assert order.index("SetEnvironmentVariable") < order.index("OpaqueFunction") < order.index("Node")
