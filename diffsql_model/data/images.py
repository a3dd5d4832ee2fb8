"""Image files -> uint8 RGB arrays, one decoder for every loader (training, evaluation, bags),
so a JPEG decodes the same everywhere. Light: PIL and numpy only."""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


class ImageReadError(FileNotFoundError):
    """An image file that is missing, corrupt or unreadable."""


def load_rgb(path: str | pathlib.Path) -> np.ndarray:
    """Image file -> H x W x 3 uint8 RGB (clear error for a missing or corrupt file)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except OSError as err:
        raise ImageReadError(f"image {path} is corrupt or unreadable: {err}") from err
