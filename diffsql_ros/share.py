"""Files the package ships under config/: this checkout's, else the installed share folder's."""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config_path(name: str) -> pathlib.Path:
    """config/<name> of this checkout, else of `ros2 pkg prefix diffsql_ros`/share/diffsql_ros
    (a colcon install puts the Python package and config/ in different trees)."""
    local = ROOT / "config" / name
    if local.is_file():
        return local
    try:
        from ament_index_python.packages import get_package_share_directory

        return pathlib.Path(get_package_share_directory("diffsql_ros")) / "config" / name
    except Exception:  # no ament index (pip-only machine) or not installed: report the local path
        return local
