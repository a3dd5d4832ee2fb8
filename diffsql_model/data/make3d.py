"""Make3D laser + image pairs (`img-<name>.jpg`, `depth_sph_corr-<name>.mat`) and the crop
the usual zero-shot protocol applies (shared PROTOCOLS.md, "Make3D")."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import scipy.io

from diffsql_model.data.ground_truth import GroundTruthError, MissingGroundTruth
from diffsql_model.data.images import load_rgb

IMAGE_PREFIX = "img-"
DEPTH_PREFIX = "depth_sph_corr-"
GRID_KEY = "Position3DGrid"
GRID_SHAPE = (55, 305, 4)  # rows x columns x (x, y, z, range)
DEPTH_CHANNEL = 3  # spherical range in metres (capped at 80 by the dataset)
GT_CROP_ROWS = 21  # of 55: the ground-truth rows matching the 2:1 image crop


@dataclasses.dataclass(frozen=True)
class Make3DPair:
    name: str
    image_path: pathlib.Path
    depth_path: pathlib.Path | None  # None: the image has no laser grid next to it


def find_make3d_pairs(folder: str | pathlib.Path) -> list[Make3DPair]:
    """Every `img-<name>.jpg` of `folder`, sorted by name, with its `depth_sph_corr-<name>.mat`."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Make3D folder not found: {folder}")
    pairs = []
    for image in sorted(folder.glob(f"{IMAGE_PREFIX}*.jpg")):
        name = image.stem[len(IMAGE_PREFIX):]
        depth = folder / f"{DEPTH_PREFIX}{name}.mat"
        pairs.append(Make3DPair(name, image, depth if depth.is_file() else None))
    if not pairs:
        raise FileNotFoundError(f"no {IMAGE_PREFIX}*.jpg images in Make3D folder {folder}")
    return pairs


def load_make3d_depth(path: str | pathlib.Path) -> np.ndarray:
    """Laser grid -> 55 x 305 float32 depth in metres (channel 3 of `Position3DGrid`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingGroundTruth(f"Make3D depth file not found: {path}")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for truncated / non-MAT files
        raise GroundTruthError(f"Make3D depth file {path} is corrupt: {e}") from None
    if GRID_KEY not in mat:
        raise GroundTruthError(f"{path} has no {GRID_KEY!r} (keys: {sorted(k for k in mat if not k.startswith('__'))})")
    grid = mat[GRID_KEY]
    if grid.shape != GRID_SHAPE:
        raise GroundTruthError(f"{path}: {GRID_KEY} has shape {grid.shape}, expected {GRID_SHAPE}")
    return grid[:, :, DEPTH_CHANNEL].astype(np.float32)


def load_make3d_image(path: str | pathlib.Path) -> np.ndarray:
    """Make3D JPEG -> H x W x 3 uint8 RGB (2272 x 1704 for the dataset's images), decoded as the
    training loaders decode (`images.load_rgb`)."""
    return load_rgb(pathlib.Path(path))


def image_crop_rows(height: int, width: int) -> tuple[int, int]:
    """Centre rows giving a 2:1 (w:h) image: 710..1562 of 2272 for a 1704-wide image."""
    crop = width // 2
    if crop > height:
        raise ValueError(f"image {width}x{height} is already wider than 2:1")
    return int((height - crop) / 2), int((height + crop) / 2)


def gt_crop_rows(height: int = GRID_SHAPE[0]) -> tuple[int, int]:
    """Ground-truth rows matching the image crop: int((55 - 21)/2) .. int((55 + 21)/2) = 17..38."""
    return int((height - GT_CROP_ROWS) / 2), int((height + GT_CROP_ROWS) / 2)


def crop_make3d_image(image: np.ndarray) -> np.ndarray:
    top, bottom = image_crop_rows(image.shape[0], image.shape[1])
    return image[top:bottom]


def crop_make3d_depth(depth: np.ndarray) -> np.ndarray:
    top, bottom = gt_crop_rows(depth.shape[0])
    return depth[top:bottom]
