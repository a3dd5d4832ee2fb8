"""ament_python package: `colcon build` on a ROS 2 distro, `pip install -e .` elsewhere."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "diffsql_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=["diffsql_ros", "diffsql_ros.*", "diffsql_model", "diffsql_model.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz") + glob("config/*.xml")),
        (f"share/{PACKAGE}/config/train", glob("config/train/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="diffsql_ros maintainers",
    maintainer_email="diffsql-ros@example.com",
    description="DiffSQL monocular depth for ROS 2: depth node, training and evaluation tools.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "depth_node = diffsql_ros.depth_node:main",
            "managed_depth_node = diffsql_ros.managed_depth_node:main",
            "diffsql-bag-eval = diffsql_ros.bag_eval:main",
            "diffsql-train = diffsql_model.train.cli:main",
            "diffsql-eval = diffsql_model.eval.cli:main",
            "diffsql-make-sample = diffsql_model.data.sample_cli:main",
            "diffsql-export = diffsql_model.export:main",
        ],
    },
)
