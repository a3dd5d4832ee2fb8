"""requirements-robot.txt: the ranges a robot's pip resolves next to its ROS 2 distro.

Always: each line is a range, admits the distro's own numpy / scipy / PyYAML / tqdm / Pillow, and
the file covers every third-party import the console scripts and the launch file reach.
With `-m registry` (`make test-registry`, needs PyPI): pip resolves the file to binary wheels for
CPython 3.10 (Humble) and 3.12 (Jazzy, Kilted) on manylinux x86_64 and aarch64, alone and with
the distro's numpy and scipy pinned, the way a venv with --system-site-packages keeps them.

pip evaluates environment markers (`python_version < "3.11"`) with the interpreter that runs it,
whatever --python-version says, so each resolve runs under a real Python of the target version,
and the dependencies the target's markers add are checked against the result afterwards
(platform markers stay the host's). A recent pip with fast-deps reads metadata through HTTP range
requests: nothing resolves by downloading the multi-GB torch and CUDA wheels."""
from __future__ import annotations

import ast
import concurrent.futures
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-robot.txt"
INDEX = os.environ.get("ROBOT_INDEX_URL", "https://pypi.org/simple")
PIP = "26.3"  # has fast-deps and leaves the wheels alone in --dry-run (pypa/pip#13482)

# What the Ubuntu archive installs through rosdep (package.xml): python3-numpy, python3-scipy...
DISTROS = {
    "humble": {"python": "3.10", "glibc": 35,  # Ubuntu 22.04
               "packages": {"numpy": "1.21.5", "scipy": "1.8.0", "PyYAML": "5.4.1",
                            "tqdm": "4.57.0", "Pillow": "9.0.1"}},
    "jazzy/kilted": {"python": "3.12", "glibc": 39,  # Ubuntu 24.04
                     "packages": {"numpy": "1.26.4", "scipy": "1.11.4", "PyYAML": "6.0.1",
                                  "tqdm": "4.66.2", "Pillow": "10.2.0"}},
}
# Pinned in the "distro" resolves: numpy (the ABI the distro's compiled modules were built for),
# scipy (built against it) and Pillow. PyYAML 5.4.1 has no cp310 wheel; tqdm is pure Python.
DISTRO_PINNED = ("numpy", "scipy", "Pillow")

IMPORT_NAMES = {"opencv-python-headless": "cv2", "pillow": "PIL", "pyyaml": "yaml"}
NOT_IMPORTED = {"accelerate": "diffusers needs it for device_map loading (sd_weights.py)"}
DISTRO_PROVIDED = {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "diagnostic_msgs",
                   "builtin_interfaces", "rcl_interfaces", "lifecycle_msgs", "launch",
                   "launch_ros", "ament_index_python", "rosidl_runtime_py"}
# The `runtime` setting's optional engines (requirements-gpu.txt, or installed by hand).
OPTIONAL_RUNTIMES = {"torch_tensorrt", "tensorrt", "onnxruntime", "onnx", "onnxscript"}
OWN = {"diffsql_model", "diffsql_ros"}


def robot_requirements() -> Dict[str, Requirement]:
    reqs = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def entry_modules() -> List[str]:
    """The modules of setup.py's console scripts: the node(s) and the CLIs."""
    return re.findall(r'"[\w-]+\s*=\s*([\w.]+):\w+"', (ROOT / "setup.py").read_text())


def module_file(name: str) -> Optional[pathlib.Path]:
    path = ROOT / name.replace(".", "/")
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def runtime_imports() -> Dict[str, str]:
    """Third-party top-level module -> first file importing it, over the own modules the console
    scripts and the launch files reach (imports inside functions included)."""
    todo: List[str] = entry_modules()
    files = sorted((ROOT / "launch").glob("*.py"))
    seen, found = set(), {}
    while todo or files:
        if files:
            path, package = files.pop(), ""
        else:
            name = todo.pop()
            todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # parents
            path = module_file(name)
            if path is None or path in seen:
                continue
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in OWN:
                    todo.append(name)  # a module, or a name in one (module_file: None)
                    continue
                found.setdefault(top, path.relative_to(ROOT).as_posix())
                if name.startswith("torch.utils.tensorboard"):  # the trainer's SummaryWriter
                    found.setdefault("tensorboard", path.relative_to(ROOT).as_posix())
    return found


def test_the_import_scan_follows_the_console_scripts():
    imports = runtime_imports()
    assert {"diffsql_ros.depth_node", "diffsql_model.train.cli"} <= set(entry_modules())
    assert imports["rclpy"].startswith("diffsql_ros/")  # the node, through its own modules
    assert imports["tensorboard"] == "diffsql_model/train/progress.py"  # diffsql-train, lazily
    assert {"torch", "cv2", "rosbags", "diffusers", "transformers", "launch"} <= set(imports)


def test_every_line_is_a_range_without_ros_or_test_packages():
    reqs = robot_requirements()
    assert len(reqs) >= 10
    for name, req in reqs.items():
        ops = {s.operator for s in req.specifier}
        assert ops == {">=", "<"}, f"{req}: want a range `>=low,<high`, not {sorted(ops)}"
        assert not name.startswith("ros-") and name not in {"rclpy", "pytest"}, req


@pytest.mark.parametrize("distro", sorted(DISTROS))
def test_ranges_accept_the_distro_packages(distro):
    reqs = robot_requirements()
    for name, version in DISTROS[distro]["packages"].items():
        req = reqs[canonicalize_name(name)]
        assert req.specifier.contains(version), f"{req} refuses {distro}'s {name} {version}"


def test_every_runtime_import_is_required():
    stdlib = set(sys.stdlib_module_names)
    reqs = robot_requirements()
    wanted = {IMPORT_NAMES.get(n, n.replace("-", "_")): n for n in reqs}
    imports = runtime_imports()
    third_party = {m: f for m, f in imports.items()
                   if m not in stdlib | OWN | DISTRO_PROVIDED | OPTIONAL_RUNTIMES | {"__future__"}}
    missing = {m: f for m, f in third_party.items() if m not in wanted}
    assert not missing, f"imported by the runtime code but not in {REQUIREMENTS.name}: {missing}"
    unused = {n for m, n in wanted.items() if m not in third_party and n not in NOT_IMPORTED}
    assert not unused, f"in {REQUIREMENTS.name} but never imported by the runtime code: {unused}"
    assert "pytest" not in imports


# ---- the registry part ----------------------------------------------------------------------

CASES = [(distro, arch, mode) for distro in sorted(DISTROS) for arch in ("x86_64", "aarch64")
         for mode in ("alone", "distro")]


def case_id(case) -> str:
    distro, arch, mode = case
    return f"py{DISTROS[distro]['python']}-{arch}-{mode}"


def platforms(arch: str, glibc: int) -> List[str]:
    """The manylinux platform tags pip accepts on this glibc (as `pip debug --verbose` lists)."""
    first = 5 if arch == "x86_64" else 17
    tags = [f"manylinux_2_{m}_{arch}" for m in range(glibc, first - 1, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def find_python(version: str) -> Optional[str]:
    """A CPython of `version` ("3.10"): $PYTHON310, pythonX.Y on PATH, pyenv, /usr/bin."""
    env = os.environ.get("PYTHON" + version.replace(".", ""))
    pyenv = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    candidates = [env, sys.executable, shutil.which(f"python{version}"), *pyenv,
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for c in filter(None, candidates):
        try:
            out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return c
    return None


def pip_wheel(tmp: pathlib.Path) -> pathlib.Path:
    """pip PIP as a wheel: `python pip-X.whl/pip` runs it under any interpreter."""
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check",
                    "download", "-q", "--no-deps", "--only-binary=:all:", "--index-url", INDEX,
                    "-d", str(tmp), f"pip=={PIP}"],
                   check=True, timeout=300)
    (wheel,) = tmp.glob(f"pip-{PIP}-*.whl")
    return wheel


def resolve(python: str, wheel: pathlib.Path, case, out: pathlib.Path) -> dict:
    distro, arch, mode = case
    d = DISTROS[distro]
    cmd = [python, str(wheel / "pip"), "--isolated", "--disable-pip-version-check", "install",
           "--dry-run", "--ignore-installed",
           "--only-binary=:all:", "--use-feature=fast-deps", "--no-cache-dir",
           "--python-version", d["python"], "--implementation", "cp", "--index-url", INDEX,
           "-r", str(REQUIREMENTS), "--report", str(out / "report.json")]
    for p in platforms(arch, d["glibc"]):
        cmd += ["--platform", p]
    if mode == "distro":
        pins = [f"{n}=={d['packages'][n]}" for n in DISTRO_PINNED]
        (out / "constraints.txt").write_text("\n".join(pins) + "\n")
        cmd += ["-c", str(out / "constraints.txt")]
    t = time.monotonic()
    with open(out / "pip.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode
    report = json.loads((out / "report.json").read_text()) if rc == 0 else None
    return {"rc": rc, "report": report, "log": (out / "pip.log").read_text(),
            "seconds": time.monotonic() - t}


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory):
    """Every case at once: each pip spends most of its time waiting on HTTP range requests."""
    pythons = {v: find_python(v) for v in sorted({d["python"] for d in DISTROS.values()})}
    wheel = pip_wheel(tmp_path_factory.mktemp("pip"))
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        futures = {case: pool.submit(resolve, pythons[DISTROS[case[0]]["python"]], wheel, case,
                                     tmp_path_factory.mktemp(case_id(case)))
                   for case in CASES if pythons[DISTROS[case[0]]["python"]]}
        results = {case: f.result() for case, f in futures.items()}
    return pythons, results


def target_environment(python: str, arch: str) -> dict:
    env = default_environment()
    env.update(python_version=python, python_full_version=python + ".0",
               implementation_version=python + ".0", platform_machine=arch,
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", os_name="posix")
    return env


def foreign_wheels(got: Dict[str, dict], python: str, arch: str, glibc: int) -> List[str]:
    """Resolved files that are not wheels installable on CPython `python` / manylinux `arch`."""
    py = tuple(int(x) for x in python.split("."))
    cp = f"cp{py[0]}{py[1]}"
    supported = set(cpython_tags(py, abis=[cp], platforms=platforms(arch, glibc)))
    supported |= set(compatible_tags(py, cp, platforms(arch, glibc)))
    files = [item["download_info"]["url"].rsplit("/", 1)[1] for item in got.values()]
    return [f for f in files if not f.endswith(".whl") or not parse_wheel_filename(f)[3] & supported]


def missing_for_target(got: Dict[str, dict], env: dict) -> List[str]:
    """Dependencies the target's markers ask for (pip read the host's) that were not resolved."""
    missing = []
    for name, item in got.items():
        extras = item.get("requested_extras") or [""]
        for dep in map(Requirement, item["metadata"].get("requires_dist", [])):
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                have = got.get(canonicalize_name(dep.name))
                if have is None or not dep.specifier.contains(have["metadata"]["version"], prereleases=True):
                    missing.append(f"{name} -> {dep}")
    return missing


@pytest.mark.registry
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pip_resolves_binary_wheels(resolutions, case):
    distro, arch, mode = case
    d = DISTROS[distro]
    pythons, results = resolutions
    if pythons[d["python"]] is None:
        pytest.skip(f"no Python {d['python']} here (set PYTHON{d['python'].replace('.', '')}): "
                    "pip reads markers from the Python that runs it")
    r = results[case]
    assert r["rc"] == 0, f"pip failed for {case_id(case)}:\n{r['log'][-4000:]}"
    full = re.findall(r"Downloading (\S+\.whl) \(", r["log"])
    assert not full, f"pip downloaded whole wheels to resolve: {full[:5]}"

    got = {canonicalize_name(i["metadata"]["name"]): i for i in r["report"]["install"]}
    foreign = foreign_wheels(got, d["python"], arch, d["glibc"])
    assert not foreign, f"not installable on CPython {d['python']} {arch}: {foreign}"
    versions = {}
    for name, req in robot_requirements().items():
        assert name in got, f"{req} was not resolved"
        versions[name] = got[name]["metadata"]["version"]
        assert req.specifier.contains(versions[name]), f"{name} {versions[name]} outside {req}"
    if mode == "distro":
        for n in DISTRO_PINNED:
            assert Version(versions[canonicalize_name(n)]) == Version(d["packages"][n])
    missing = missing_for_target(got, target_environment(d["python"], arch))
    assert not missing, f"needed on CPython {d['python']} {arch} but not resolved: {missing}"

    print(f"\n{case_id(case)} ({distro}): {len(got)} wheels in {r['seconds']:.0f} s: "
          + ", ".join(f"{n} {v}" for n, v in versions.items()))
