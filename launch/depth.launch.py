"""DiffSQL depth node (+ rviz2): camera stream in, depth / point cloud / diagnostics out.

  ros2 launch diffsql_ros depth.launch.py checkpoint:=/path/model.pt \
      image:=/camera/image_raw camera_info:=/camera/camera_info rviz:=true

fastdds_profile:=<share>/config/fastdds_large_data.xml gives the node and rviz2 Fast DDS shared
memory big enough for camera frames and clouds, and the node asynchronous publication (see that
file; the camera driver needs it too).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _depth_node(context):
    image = LaunchConfiguration("image").perform(context)
    params = [LaunchConfiguration("params_file").perform(context)]
    checkpoint = LaunchConfiguration("checkpoint").perform(context)
    if checkpoint:  # only override the params file when a checkpoint is given here
        params.append({"checkpoint": checkpoint})
    return [Node(
        package="diffsql_ros",
        executable="depth_node",
        name="depth_node",
        output="screen",
        emulate_tty=True,
        parameters=params,
        remappings=[
            ("image", image),
            ("image/compressed", image + "/compressed"),
            ("camera_info", LaunchConfiguration("camera_info").perform(context)),
        ],
    )]


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
