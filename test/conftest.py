"""Shared test set-up: where the real sample data lives, and DDS kept on loopback."""
import os
import pathlib

import pytest

# Every ROS process a test starts (in-process or a subprocess inheriting os.environ) stays on
# loopback, on a DDS domain of its own for this test run.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DIFFSQL_SHARED", ROOT.parent / "shared")).resolve()
KITTI_RAW = SHARED / "data" / "kitti" / "raw"
KITTI_DEPTH = SHARED / "data" / "kitti" / "depth"
MAKE3D = SHARED / "data" / "make3d"
SPLITS = SHARED / "kitti_splits"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not (SHARED / "data").is_dir():
        pytest.fail(f"real sample data not found at {SHARED} (set DIFFSQL_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def kitti_raw(shared_dir) -> pathlib.Path:
    return KITTI_RAW


@pytest.fixture(scope="session")
def kitti_depth(shared_dir) -> pathlib.Path:
    return KITTI_DEPTH


@pytest.fixture(scope="session")
def make3d_dir(shared_dir) -> pathlib.Path:
    return MAKE3D


@pytest.fixture(scope="session")
def splits_dir(shared_dir) -> pathlib.Path:
    return SPLITS


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny Stable Diffusion diffusers folder: vae/, unet/, text_encoder/, tokenizer/."""
    from diffsql_model.tiny_sd import build_tiny_sd_folder

    path = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_sd_folder(path)
    return path
