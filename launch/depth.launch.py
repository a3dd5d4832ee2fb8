"""DiffSQL depth node (+ rviz2): camera stream in, depth / point cloud / diagnostics out.

  ros2 launch diffsql_ros depth.launch.py checkpoint:=/path/model.pt \
      image:=/camera/image_raw camera_info:=/camera/camera_info rviz:=true

Several cameras, one model: cameras:=front,left serves /front/image_raw + /front/camera_info
(the image name from camera_image) and publishes /front/depth, /front/points, ...

managed:=true starts the lifecycle node (managed_depth_node): with autostart:=true launch
configures and activates it; with autostart:=false it waits unconfigured for a lifecycle manager
(e.g. Nav2's lifecycle_manager with node_names: [depth_node]).

fastdds_profile:=<share>/config/fastdds_large_data.xml gives the node and rviz2 Fast DDS shared
memory big enough for camera frames and clouds, and the node asynchronous publication (see that
file; the camera driver needs it too).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.events.matchers import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition


def _remappings(image: str, camera_info: str, cameras: list, camera_image: str) -> list:
    """The node's inputs -> the camera's topics; with `cameras`, per camera namespace."""
    if not cameras:
        return [("image", image), ("image/compressed", image + "/compressed"), ("camera_info", camera_info)]
    remaps = []
    for c in cameras:
        remaps += [(f"{c}/image", f"/{c}/{camera_image}"), (f"{c}/image/compressed", f"/{c}/{camera_image}/compressed"),
                   (f"{c}/camera_info", f"/{c}/camera_info")]
    return remaps


def _transition(node, transition_id):
    return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition_id))


def _depth_node(context):
    arg = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    params = [arg("params_file")]
    if arg("checkpoint"):  # only override the params file when a checkpoint is given here
        params.append({"checkpoint": arg("checkpoint")})
    cameras = [c.strip().strip("/") for c in arg("cameras").strip("[]").replace(",", " ").split()]
    if cameras:
        params.append({"cameras": cameras})
    common = dict(package="diffsql_ros", name="depth_node", namespace="", output="screen", emulate_tty=True,
                  parameters=params,
                  remappings=_remappings(arg("image"), arg("camera_info"), cameras, arg("camera_image")))
    if arg("managed").lower() not in ("true", "1"):
        return [Node(executable="depth_node", **common)]
    node = LifecycleNode(executable="managed_depth_node", **common)
    if arg("autostart").lower() not in ("true", "1"):
        return [node]
    # Configured, then activated once it is inactive: the order Nav2's lifecycle manager uses.
    return [RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, goal_state="inactive",
                                                   entities=[_transition(node, Transition.TRANSITION_ACTIVATE)])),
            node, _transition(node, Transition.TRANSITION_CONFIGURE)]


def generate_launch_description():
    share = FindPackageShare("diffsql_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "depth.yaml"]),
                              description="YAML parameters of the depth node"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="DiffSQL checkpoint; empty = the one in params_file"),
        DeclareLaunchArgument("image", default_value="/camera/image_raw",
                              description="input image topic (image/compressed follows it)"),
        DeclareLaunchArgument("camera_info", default_value="/camera/camera_info",
                              description="camera_info topic of the input camera"),
        DeclareLaunchArgument("cameras", default_value="",
                              description="several cameras, one model: namespaces, e.g. front,left; "
                                          "empty = the one camera of image / camera_info"),
        DeclareLaunchArgument("camera_image", default_value="image_raw",
                              description="with cameras: each camera's image topic name in its namespace"),
        DeclareLaunchArgument("managed", default_value="false",
                              description="true: the lifecycle (managed) node managed_depth_node"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="with managed: configure and activate at launch; false = "
                                          "leave it to a lifecycle manager"),
        DeclareLaunchArgument("rviz", default_value="false", description="start rviz2 with config/depth.rviz"),
        DeclareLaunchArgument("camera_frame", default_value="camera_optical_frame",
                              description="rviz2 fixed frame: the camera's optical frame"),
        DeclareLaunchArgument("fastdds_profile", default_value="",
                              description="Fast DDS XML profile for the node and rviz2 (e.g. config/"
                                          "fastdds_large_data.xml); empty = leave DDS as configured"),
        # Before the nodes: launch passes its environment to the processes started after it.
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"),
                               condition=IfCondition(PythonExpression(
                                   ["'", LaunchConfiguration("fastdds_profile"), "' != ''"]))),
        OpaqueFunction(function=_depth_node),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", PathJoinSubstitution([share, "config", "depth.rviz"]),
                       "-f", LaunchConfiguration("camera_frame")],
            condition=IfCondition(LaunchConfiguration("rviz")),
        ),
    ])
