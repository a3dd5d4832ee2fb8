"""The depth node as a ROS 2 lifecycle (managed) node, for a lifecycle manager such as Nav2's.

- configure: load the model (and warm it up); a missing or bad checkpoint returns FAILURE and
  logs the reason, and the node stays unconfigured.
- activate: create every camera's subscriptions and publishers, start inference.
- deactivate: stop inference and drop the topics; the model stays loaded.
- cleanup: free the model and its GPU memory.
- shutdown (from any state): deactivate and clean up.
Parameters are the plain node's (`node_params.py`).
"""
from __future__ import annotations

import sys

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from diffsql_ros.depth_pipeline import STARTUP_ERRORS, DepthPipeline, spin

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class ManagedDepthNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("depth_node", **kwargs)
        self.pipeline = DepthPipeline(self)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.pipeline.configure()
        except STARTUP_ERRORS as e:
            self.get_logger().error(f"configure failed: {e}")
            self.pipeline.cleanup()
            return FAILURE
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.activate()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.cleanup()
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.cleanup()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        # An exception in a transition: free everything, back to unconfigured (can configure again).
        self.get_logger().error(f"error in lifecycle transition from {state.label}: cleaning up")
        self.pipeline.cleanup()
        return SUCCESS


def main(args=None) -> int:
    return spin(ManagedDepthNode, args)


if __name__ == "__main__":
    sys.exit(main())
