"""Synthetic worlds: generator settings from which each drive's SyntheticConfig is drawn.

A world names ranges (lo, hi), choice lists [a, b, ...] or fixed values for SyntheticConfig
fields; `drive_config(world, seed)` draws one drive from them, so every drive of a world differs
in speed, heading wobble, sway, street layout, facades, sky and light. `demo` is the demo's fixed
world (today's drives, bit for bit). `varied` is the world to develop against.

HELD_OUT worlds are for checking a result, never for developing it: their settings differ from
`varied` in street shape, facades, sky, light and motion, and nothing is tuned on them.
"""
from __future__ import annotations

import numpy as np

from ..yaml_config import ConfigError
from .synthetic import FACADES, SKIES, SyntheticConfig

FPS = 10.0  # SyntheticConfig's default: speed m/s = 10 x metres a frame


def _sun(elevation_deg: float, azimuth_deg: float) -> tuple:
    el, az = np.deg2rad(elevation_deg), np.deg2rad(azimuth_deg)
    return (float(np.cos(el) * np.sin(az)), float(-np.sin(el)), float(-np.cos(el) * np.cos(az)))


WORLDS: dict[str, dict] = {
    "demo": {},
    "varied": {
        "speed": (5.0, 15.0),  # 0.5-1.5 m a frame
        "yaw_amplitude": (0.0, 0.04), "yaw_period": (15.0, 50.0),
        "sway_amplitude": (0.0, 1.5), "sway_period": (40.0, 90.0),
        "building_front": [(6.0, 10.0), (7.0, 13.0), (9.0, 15.0)],
        "building_height": [(4.0, 12.0), (5.0, 18.0), (8.0, 25.0)],
        "building_length": [(6.0, 18.0), (8.0, 25.0)],
        "facades": [("noise_windows",), ("noise", "windows"), ("windows", "stripes"), FACADES],
        "car_probability": (0.2, 0.8), "pole_spacing": [(8.0, 16.0), (12.0, 25.0)],
        "sky": list(SKIES), "sun": ((25.0, 70.0), (-60.0, 60.0)),
        "ambient": (0.4, 0.65), "sun_gain": (0.3, 0.55), "exposure": (0.8, 1.15),
    },
    # Held out: a narrow downtown canyon, slow, cloudy, low sun from the side.
    "heldout_downtown": {
        "speed": (5.0, 9.0), "yaw_amplitude": (0.01, 0.05), "yaw_period": (10.0, 30.0),
        "sway_amplitude": (0.0, 0.6), "sway_period": (30.0, 60.0),
        "building_front": (5.0, 8.0), "building_height": (12.0, 30.0), "building_length": (10.0, 30.0),
        "facades": [("windows", "stripes"), ("windows",), ("stripes", "noise")],
        "car_probability": (0.6, 0.9), "pole_spacing": (10.0, 20.0),
        "sky": ["clouds", "flat"], "sun": ((15.0, 30.0), (60.0, 90.0)),
        "ambient": (0.45, 0.6), "sun_gain": (0.25, 0.4), "exposure": (0.85, 1.0),
    },
    # Held out: a wide suburban road, fast, low houses, flat sky, high sun, more wobble.
    "heldout_suburb": {
        "speed": (10.0, 15.0), "yaw_amplitude": (0.02, 0.06), "yaw_period": (20.0, 40.0),
        "sway_amplitude": (0.8, 2.0), "sway_period": (60.0, 120.0),
        "building_front": (10.0, 18.0), "building_height": (3.0, 8.0), "building_length": (6.0, 14.0),
        "facades": [("noise",), ("noise", "stripes")],
        "car_probability": (0.1, 0.4), "pole_spacing": (15.0, 30.0),
        "sky": ["flat", "gradient"], "sun": ((55.0, 80.0), (-30.0, 30.0)),
        "ambient": (0.5, 0.7), "sun_gain": (0.35, 0.5), "exposure": (1.0, 1.2),
    },
}
DEVELOPMENT = ("demo", "varied")
HELD_OUT = ("heldout_downtown", "heldout_suburb")


# SyntheticConfig fields that are ranges themselves: a (lo, hi) there is the value, not a draw.
RANGE_FIELDS = ("building_front", "building_height", "building_length", "pole_spacing")


def _draw(rng: np.random.Generator, spec, is_range: bool = False):
    """A list is a choice, a (lo, hi) tuple a uniform draw (unless the field is a range itself),
    anything else a fixed value."""
    if isinstance(spec, list):
        return spec[rng.integers(len(spec))]
    if isinstance(spec, tuple) and len(spec) == 2 and not is_range:
        return float(rng.uniform(*spec))
    return spec


def drive_config(world: str, seed: int, **fixed) -> SyntheticConfig:
    """The SyntheticConfig of drive `seed` in `world`; `fixed` (width, height, num_frames, ...)
    is applied as given. The scene seed is the drive seed, so drives differ within a world."""
    if world not in WORLDS:
        raise ConfigError(f"unknown synthetic world {world!r}; known: {sorted(WORLDS)}")
    rng = np.random.default_rng([seed, 11])
    values: dict = {}
    for name, spec in WORLDS[world].items():
        if name == "sun":
            values["sun_direction"] = _sun(_draw(rng, spec[0]), _draw(rng, spec[1]))
        else:
            values[name] = _draw(rng, spec, name in RANGE_FIELDS)
    return SyntheticConfig(**{**values, "seed": seed, **fixed})
