"""The shipped Fast DDS profile (config/fastdds_large_data.xml) as the tests and benchmarks here
use it: shared memory only.

The robot profile keeps a UDPv4 transport for other hosts. Machines that must keep DDS off the
network (CI, development boxes) run every ROS process with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST,
under which rmw_fastrtps adds its own loopback-only UDP transport; `shm_only` drops the profile's
unrestricted UDPv4 so nothing else is added.
"""
from __future__ import annotations

import pathlib
import xml.etree.ElementTree as ET

from diffsql_ros.share import config_path

PROFILE = config_path("fastdds_large_data.xml")
_NS = "http://www.eprosima.com"


def shm_only(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """Write `src` without its UDP transports (descriptors and references) to `dst`."""
    ET.register_namespace("", _NS)
    tree = ET.parse(src)
    q = lambda tag: f"{{{_NS}}}{tag}"  # noqa: E731
    dropped = set()
    for parent in tree.iter(q("transport_descriptors")):
        for desc in list(parent):
            if desc.findtext(q("type"), "").startswith("UDP"):
                dropped.add(desc.findtext(q("transport_id")))
                parent.remove(desc)
    for parent in tree.iter(q("userTransports")):
        for ref in list(parent):
            if ref.text in dropped:
                parent.remove(ref)
    if not dropped:
        raise ValueError(f"{src} has no UDP transport to drop")
    tree.write(dst, encoding="UTF-8", xml_declaration=True)
    return dst
