"""Message types of the bags we read and write, and the rosbags typestore both sides use."""
from __future__ import annotations

from rosbags.typesys import Stores, get_typestore, get_types_from_msg

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
TF_TYPE = "tf2_msgs/msg/TFMessage"
TF_STATIC_TOPIC = "/tf_static"

# noetic's typestore lacks tf2_msgs; its definition is one line
TF_MESSAGE_MSG = "geometry_msgs/TransformStamped[] transforms"


def get_bag_typestore(ros1: bool):
    """rosbags typestore for writing/reading: noetic (+ tf2_msgs/TFMessage, absent there) or kilted."""
    if not ros1:
        return get_typestore(Stores.ROS2_KILTED)
    store = get_typestore(Stores.ROS1_NOETIC)
    if TF_TYPE not in store.types:
        store.register(get_types_from_msg(TF_MESSAGE_MSG, TF_TYPE))
    return store
