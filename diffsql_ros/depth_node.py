"""ROS 2 depth node: camera stream(s) -> REP 118 depth, uncertainty, colour map, point cloud.

The plain node: it loads the model and serves its cameras from the start. The work itself is
`depth_pipeline.DepthPipeline`; `managed_depth_node` is the same as a lifecycle node.
"""
from __future__ import annotations

import sys

from rclpy.node import Node

from diffsql_ros.depth_pipeline import DepthPipeline, spin

SUBSCRIBED_TOPICS = ("image", "image/compressed", "camera_info")
PUBLISHED_TOPICS = ("depth", "depth/camera_info", "points", "depth/uncertainty", "depth/colored", "/diagnostics")


class DepthNode(Node):
    def __init__(self, **kwargs):
        super().__init__("depth_node", **kwargs)
        self.pipeline = DepthPipeline(self)
        self.pipeline.configure()
        self.pipeline.activate()


def main(args=None) -> int:
    return spin(DepthNode, args)


if __name__ == "__main__":
    sys.exit(main())
