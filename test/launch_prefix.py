"""`ros2 launch diffsql_ros <file> name:=value ...` for tests, on machines without a ROS 2 distro.

build_prefix() lays this package out the way `colcon build` installs it; LaunchProcess runs a
launch file of that prefix through the real `launch.LaunchService` (../shared/vendor/ros2_launch)
in a process group of its own, so a test can Ctrl-C it like a terminal does.

Run as a script (`python launch_prefix.py <package> <launch file> [name:=value ...]`) this file
is that launch process: what `ros2 launch` does, without the ros2cli.
"""
from __future__ import annotations

import configparser
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DIFFSQL_SHARED", ROOT.parent / "shared")).resolve()
VENDOR = SHARED / "vendor" / "ros2_launch" / "python"
PACKAGE = "diffsql_ros"


def _launch_main(package: str, launch_file: str, launch_args: list[str]) -> int:
    # A background job of a non-interactive shell starts with SIGINT ignored, and so would every
    # process launched from here: Ctrl-C must reach launch (and the node) as in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    # As ros2launch.api: the file from the package's share/<package>/launch, its arguments as
    # (name, value) pairs, shutdown once every process has ended.
    path = pathlib.Path(get_package_share_directory(package)) / "launch" / launch_file
    pairs = [tuple(a.split(":=", 1)) for a in launch_args]
    service = LaunchService(argv=launch_args)
    service.include_launch_description(IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(path)), launch_arguments=pairs))
    return service.run()


def build_prefix(dest: pathlib.Path) -> pathlib.Path:
    """dest laid out as colcon installs this ament_python package from setup.py: share/ from its
    data_files (launch/, config/, package.xml, the ament index marker), and each console script
    as an executable where setup.cfg's install_scripts puts it (lib/<package>/)."""
    with tempfile.TemporaryDirectory() as egg_base:
        done = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", egg_base,
                               "install_data", "--install-dir", str(dest)], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        entry_points = configparser.ConfigParser()
        entry_points.read(pathlib.Path(egg_base) / f"{PACKAGE}.egg-info" / "entry_points.txt")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = pathlib.Path(cfg["install"]["install_scripts"].replace("$base", str(dest)))
    scripts.mkdir(parents=True, exist_ok=True)
    for name, target in entry_points["console_scripts"].items():
        # What setuptools writes for an entry point, with the interpreter that runs the tests.
        module, func = target.split(":")
        exe = scripts / name
        exe.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        exe.chmod(0o755)
    return dest


def launch_env(prefix: pathlib.Path, log_dir: pathlib.Path) -> dict:
    """The environment of a sourced workspace: launch importable, the prefix on the ament index."""
    env = dict(os.environ)  # conftest.py's ROS_AUTOMATIC_DISCOVERY_RANGE and ROS_DOMAIN_ID included
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(VENDOR), env.get("PYTHONPATH", "")) if p)
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in (str(prefix), env.get("AMENT_PREFIX_PATH", "")) if p)
    env["ROS_LOG_DIR"] = str(log_dir)  # launch's and the node's log files stay in the test's tmp
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # two shared cores: leave one to the test process
    return env


class LaunchProcess:
    """One `ros2 launch` in its own process group; its screen output goes to `log`."""

    def __init__(self, prefix: pathlib.Path, log: pathlib.Path, launch_file: str, launch_args: dict):
        self.log = log
        args = [f"{k}:={v}" for k, v in launch_args.items()]
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, __file__, PACKAGE, launch_file, *args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                         env=launch_env(prefix, log.parent / "ros_log"),
                                         start_new_session=True)  # pgid = pid, like a shell job

    def text(self) -> str:
        return self.log.read_text()

    def process_pids(self) -> dict:
        """{launch's process name (e.g. 'depth_node-1'): pid} of the processes launch started."""
        return {name: int(pid) for name, pid in re.findall(r"\[INFO\] \[(\S+)\]: process started with pid \[(\d+)\]",
                                                             self.text())}

    def assert_running(self) -> None:
        """launch and every process it started are still running."""
        text = self.text()
        assert self.proc.poll() is None, f"launch exited ({self.proc.returncode}):\n{text[-3000:]}"
        assert "process has died" not in text, text[-3000:]

    def ctrl_c(self, timeout: float) -> int:
        """SIGINT to the whole group, as a terminal's Ctrl-C; launch's exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Whatever of the group is still alive (a failed test), so nothing outlives the test."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


if __name__ == "__main__":
    sys.exit(_launch_main(sys.argv[1], sys.argv[2], sys.argv[3:]))
