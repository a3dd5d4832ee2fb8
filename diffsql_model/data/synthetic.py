"""Procedural synthetic driving sequences with exact depth and poses (numpy ray casting).

The world uses the camera's optical axes at the start pose: x right, y DOWN, z forward; the
ground is the plane y = camera_height. Geometry is a road lined with building blocks, parked
cars and poles, all axis-aligned boxes; anything farther than `far` (or no hit) is sky, whose
depth is 0 = invalid (the KITTI ground-truth convention). Textures are functions of world
coordinates (value noise of several frequencies, lane marks, windows, bands) and shading
depends only on the surface normal, so every surface looks the same from every frame: warping
a frame with the true depth and relative pose reproduces its neighbour. Pixel (u, v) has its
centre at integer coordinates, the convention of `diffsql_model.geometry`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..camera import ray_grid
from ..yaml_config import ConfigError, YamlConfig

# KITTI-like velodyne mount: x forward, y left, z up; 0.27 m behind and 0.08 m above the camera.
T_VELO_TO_CAM = np.array([[0.0, -1.0, 0.0, 0.0],
                          [0.0, 0.0, -1.0, -0.08],
                          [1.0, 0.0, 0.0, -0.27],
                          [0.0, 0.0, 0.0, 1.0]])
_HAZE = np.array([0.75, 0.8, 0.85])
GROUND, BUILDING, CAR, POLE = 0, 1, 2, 3
# Corner pairs joined by a box edge (corner index 4 i + 2 j + k for x, y, z choices i, j, k).
_BOX_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]
# Facade styles: value noise with a window grid (the demo's), noise alone, a strong window grid
# of per-building spacing, horizontal bands of per-building pitch.
FACADES = ("noise_windows", "noise", "windows", "stripes")
SKIES = ("gradient", "flat", "clouds")
# (style, window spacing along the wall, up it, stripe pitch, window x0, x1, y0, y1 in the cell),
# metres: the demo's 3.0 x 3.2 m cells with 1.4 x 1.4 m windows.
_DEMO_FACADE = (0, 3.0, 3.2, 0.0, 0.8, 2.2, 1.0, 2.4)


@dataclasses.dataclass
class SyntheticConfig(YamlConfig):
    """One procedural drive: image size, KITTI-style normalised intrinsics, motion, scene seed."""

    width: int = 640
    height: int = 192
    num_frames: int = 20
    seed: int = 0
    speed: float = 10.0  # m/s, varied +-15 % along the drive
    fps: float = 10.0
    fx_ratio: float = 0.58  # fx = fx_ratio * width (KITTI normalised intrinsics)
    fy_ratio: float = 1.92
    camera_height: float = 1.65
    baseline: float = 0.54  # right camera offset along +x, metres
    far: float = 150.0  # hits beyond this are sky (depth 0)
    sway_amplitude: float = 1.0  # lateral weave of the path, metres (gives small turns)
    sway_period: float = 60.0  # metres of travel per weave
    yaw_amplitude: float = 0.0  # heading oscillation on top of the path's, radians
    yaw_period: float = 40.0  # frames per heading oscillation
    # Street: building set-back from the road centre, height and length ranges (metres).
    building_front: tuple = (7.0, 13.0)
    building_height: tuple = (5.0, 18.0)
    building_length: tuple = (8.0, 25.0)
    facades: tuple = ("noise_windows",)  # drawn per building from FACADES
    car_probability: float = 0.6  # per parking slot
    pole_spacing: tuple = (12.0, 25.0)
    sky: str = "gradient"  # gradient | flat | clouds
    sun_direction: tuple = (0.4, -0.8, -0.45)  # towards the sun, camera axes (y down), any length
    ambient: float = 0.55  # shade = ambient + sun_gain * max(0, n . sun)
    sun_gain: float = 0.45
    exposure: float = 1.0

    def __post_init__(self):
        if self.width < 8 or self.height < 8:
            raise ConfigError(f"synthetic image must be at least 8x8, got {self.width}x{self.height}")
        if self.num_frames < 1 or self.fps <= 0 or self.speed < 0 or self.far <= 0:
            raise ConfigError("synthetic: num_frames >= 1, fps > 0, speed >= 0, far > 0 required")
        for name in ("building_front", "building_height", "building_length", "pole_spacing"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"synthetic.{name} must be a range 0 < lo <= hi, got {getattr(self, name)}")
            setattr(self, name, (float(lo), float(hi)))
        self.facades = tuple(self.facades)
        bad = [f for f in self.facades if f not in FACADES] or ([] if self.facades else ["(none)"])
        if bad:
            raise ConfigError(f"synthetic.facades: unknown {bad}; known: {FACADES}")
        if self.sky not in SKIES:
            raise ConfigError(f"synthetic.sky must be one of {SKIES}, got {self.sky!r}")

    @property
    def sun(self) -> np.ndarray:
        """Unit vector towards the sun in camera axes (x right, y down, z forward)."""
        return np.asarray(self.sun_direction, dtype=np.float64) / np.linalg.norm(self.sun_direction)

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx_ratio * self.width, 0, 0.5 * self.width],
                         [0, self.fy_ratio * self.height, 0.5 * self.height],
                         [0, 0, 1.0]])


@dataclasses.dataclass
class Drive:
    """A rendered drive; arrays are stacked over frames."""

    rgb: np.ndarray  # N x H x W x 3 uint8, left camera
    rgb_right: np.ndarray  # N x H x W x 3 uint8
    depth: np.ndarray  # N x H x W float32, camera z in metres, 0 = sky/invalid
    depth_right: np.ndarray
    pose: np.ndarray  # N x 4 x 4 left camera-to-world
    K: np.ndarray  # 3 x 3
    stamps: np.ndarray  # N seconds
    baseline: float
    T_velo_to_cam: np.ndarray  # 4 x 4

    def relative_pose(self, target: int, source: int) -> np.ndarray:
        """4x4 T mapping target-camera points into the source camera (X_src = T X_tgt)."""
        return np.linalg.inv(self.pose[source]) @ self.pose[target]

    @property
    def stereo_T(self) -> np.ndarray:
        """4x4 left-camera points -> right camera (the right camera sits at +baseline x)."""
        T = np.eye(4)
        T[0, 3] = -self.baseline
        return T


class SyntheticScene:
    """Boxes along a straight road, their textures, and a ray caster for one camera pose."""

    def __init__(self, cfg: SyntheticConfig, z_end: float):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.noise_table = rng.random((256, 256)).astype(np.float32)
        self._flat_table = np.pad(self.noise_table, ((0, 1), (0, 1)), mode="wrap").ravel()
        h = cfg.camera_height
        boxes, kinds, colors, styles = [], [], [], []
        # Facade styles come from a stream of their own: the demo's scene (one style) is unchanged.
        style_rng = np.random.default_rng([cfg.seed, 7])

        def add(x0, x1, y0, y1, z0, z1, kind, color):
            boxes.append([min(x0, x1), min(y0, y1), min(z0, z1), max(x0, x1), max(y0, y1), max(z0, z1)])
            kinds.append(kind)
            colors.append(color)
            styles.append(self._facade_style(style_rng) if kind == BUILDING else _DEMO_FACADE)

        z_lo, z_hi = -30.0, z_end + cfg.far
        for side in (-1.0, 1.0):
            z = z_lo
            while z < z_hi:  # building blocks with occasional gaps
                length = rng.uniform(*cfg.building_length)
                if rng.random() > 0.2:
                    front = rng.uniform(*cfg.building_front)
                    add(side * front, side * (front + 8), h - rng.uniform(*cfg.building_height), h, z,
                        z + length, BUILDING, rng.uniform(0.35, 0.85, 3))
                z += length + rng.uniform(0.5, 3.0)
            z = z_lo
            while z < z_hi:  # parked cars
                z += rng.uniform(6, 20)
                if rng.random() < cfg.car_probability:
                    xc = side * rng.uniform(3.6, 4.4)
                    add(xc - 0.9, xc + 0.9, h - 1.5, h, z, z + 4.2, CAR, rng.uniform(0.1, 0.9, 3))
            z = z_lo + rng.uniform(0, 10)
            while z < z_hi:  # poles
                add(side * 5.4, side * 5.65, h - 7.0, h, z, z + 0.25, POLE, np.full(3, 0.55))
                z += rng.uniform(*cfg.pole_spacing)
        self.boxes = np.array(boxes, dtype=np.float64)
        self.kinds = np.array(kinds, dtype=np.int64)
        self.colors = np.array(colors, dtype=np.float32)
        self.styles = np.array(styles, dtype=np.float32).reshape(-1, len(_DEMO_FACADE))
        # 3 x H x W camera rays with z = 1 (so ray parameter = camera depth); float32 for speed,
        # which keeps depth to ~1e-7 relative.
        rx, ry = ray_grid(cfg.K, cfg.height, cfg.width)
        self.rays = np.stack([rx, ry, np.ones_like(rx)])

    def _facade_style(self, rng) -> tuple:
        """One building's facade: see _DEMO_FACADE for the fields."""
        facades = self.cfg.facades
        name = facades[0] if len(facades) == 1 else facades[rng.integers(len(facades))]
        if name == "noise_windows":
            return _DEMO_FACADE
        sx, sy = rng.uniform(2.0, 4.5), rng.uniform(2.6, 3.8)
        fx, fy = rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.6)  # window share of its cell
        return (FACADES.index(name), sx, sy, rng.uniform(0.4, 1.6),
                sx * (1 - fx) / 2, sx * (1 + fx) / 2, sy * (1 - fy) / 2, sy * (1 + fy) / 2)

    def _noise(self, s: np.ndarray, t: np.ndarray, freq: float) -> np.ndarray:
        """Smooth value noise in [0, 1] on a 1/freq metre lattice (256-periodic table)."""
        x, y = s * np.float32(freq), t * np.float32(freq)
        ix, iy = np.floor(x), np.floor(y)
        fx, fy = x - ix, y - iy
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
        idx = (ix.astype(np.int64) & 255) * 257 + (iy.astype(np.int64) & 255)
        tab = self._flat_table  # 257 x 257 wrapped copy, flattened: neighbours are +1, +257
        a = tab[idx] + (tab[idx + 257] - tab[idx]) * fx
        b = tab[idx + 1] + (tab[idx + 258] - tab[idx + 1]) * fx
        return a + (b - a) * fy

    def _texture(self, P, axis, obj, footprint):
        """Albedo (N x 3) at world points P (3 x N) on faces with normal `axis`, object `obj` (-1 ground)."""
        x, y, z = P
        s = np.where(axis == 0, z, x)
        t = np.where(axis == 1, z, y)
        kind = np.where(obj < 0, GROUND, self.kinds[np.maximum(obj, 0)])
        base = np.where((obj < 0)[:, None], np.float32(0.42), self.colors[np.maximum(obj, 0)])
        tex = np.zeros_like(s)
        for freq, amp in ((0.35, 0.5), (1.3, 0.3), (4.0, 0.2)):
            # Fade octaves finer than ~3 pixels to limit aliasing (almost view-independent).
            lod = np.clip(1.5 - 3.0 * freq * footprint, 0.0, 1.0).astype(np.float32)
            tex += amp * (lod * (self._noise(s + 17.0 * freq, t, freq) - 0.5) + 0.5)
        albedo = base * (0.45 + 1.1 * tex)[:, None]
        g = np.flatnonzero(kind == GROUND)
        xg, zg = x[g], z[g]
        side = g[np.abs(xg) > 4.6]  # pavement tiles
        albedo[side] *= np.where((np.floor(x[side]) + np.floor(z[side])) % 2 == 0, 1.35, 1.05)[:, None]
        ax = np.abs(xg)
        marks = ((ax < 0.08) & (np.mod(zg, 6.0) < 3.0)) | (np.abs(ax - 3.2) < 0.08)  # lane, edges
        albedo[g[marks]] = 0.92
        self._facades(albedo, s, y, axis, obj, kind)
        pole = np.flatnonzero(kind == POLE)
        band = pole[np.mod(self.cfg.camera_height - y[pole], 1.0) < 0.25]
        albedo[band] *= 0.4
        return np.clip(albedo, 0, 1)

    def _facades(self, albedo, s, y, axis, obj, kind) -> None:
        """Window grids (noise_windows, windows) and bands (stripes) on building walls, in place."""
        b = np.flatnonzero((kind == BUILDING) & (axis != 1))
        style, sx, sy, pitch, x0, x1, y0, y1 = self.styles[obj[b]].T
        up = self.cfg.camera_height - y[b]  # height above the ground
        strong = b[(style == FACADES.index("windows"))]
        albedo[strong] = albedo[strong] * 0.6 + 0.25  # plain light walls: the grid carries the texture
        sb, ub = np.mod(s[b], sx), np.mod(up, sy)  # position in the window cell, metres
        windows = (style == FACADES.index("noise_windows")) | (style == FACADES.index("windows"))
        win = b[windows & (sb > x0) & (sb < x1) & (ub > y0) & (ub < y1)]
        albedo[win] = albedo[win] * 0.3 + np.array([0.05, 0.1, 0.2], dtype=np.float32)
        bands = style == FACADES.index("stripes")
        dark = b[bands & (np.mod(up, np.where(bands, pitch, 1.0)) < 0.5 * pitch)]
        albedo[dark] *= 0.45

    def render(self, pose: np.ndarray):
        """Camera-to-world pose 4x4 -> (rgb H x W x 3 uint8, depth H x W float32, 0 = sky)."""
        cfg = self.cfg
        H, W = cfg.height, cfg.width
        R, o = pose[:3, :3].astype(np.float32), pose[:3, 3].astype(np.float32)
        d = np.einsum("ij,jhw->ihw", R, self.rays)  # world ray directions, camera-z step 1
        depth = np.full((H, W), np.inf, dtype=np.float32)
        obj = np.full((H, W), -2, dtype=np.int64)  # -2 sky, -1 ground, >= 0 box
        axis = np.full((H, W), 1, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            tg = (cfg.camera_height - o[1]) / d[1]
            ground = (d[1] > 1e-9) & (tg > 0)
            depth[ground], obj[ground] = tg[ground], -1
            inv_d = 1.0 / d
            w2c = np.linalg.inv(pose)
            K = cfg.K
            for i, box in enumerate(self.boxes):
                bb = self._bbox(box, w2c, K, H, W)
                if bb is None:
                    continue
                r0, r1, c0, c1 = bb
                sl = (slice(None), slice(r0, r1), slice(c0, c1))
                t1 = (box[:3, None, None] - o[:, None, None]).astype(np.float32) * inv_d[sl]
                t2 = (box[3:, None, None] - o[:, None, None]).astype(np.float32) * inv_d[sl]
                tmin = np.minimum(t1, t2)
                tnear = tmin.max(0)
                tfar = np.maximum(t1, t2).min(0)
                dsub = depth[r0:r1, c0:c1]
                hit = (tnear <= tfar) & (tnear > 0.05) & (tnear < dsub)
                dsub[hit] = tnear[hit]
                obj[r0:r1, c0:c1][hit] = i
                axis[r0:r1, c0:c1][hit] = tmin[:, hit].argmax(0)
        sky = ~(depth < cfg.far)
        depth[sky], obj[sky] = 0.0, -2
        rgb = np.empty((H, W, 3), dtype=np.float32)
        m = ~sky
        P = o[:, None] + d[:, m] * depth[m]
        ax, ob, dep = axis[m], obj[m], depth[m]
        footprint = dep / K[0, 0] * np.where(ob < 0, np.maximum(dep / cfg.camera_height, 1.0), 1.0)
        albedo = self._texture(P, ax, ob, footprint)
        normal_sign = -np.sign(d[ax, m])
        shade = cfg.ambient + cfg.sun_gain * np.clip(normal_sign * cfg.sun[ax], 0, 1)
        fog = np.exp(-dep / 400.0)[:, None]
        rgb[m] = albedo * shade[:, None] * fog + _HAZE * (1 - fog)
        rgb[sky] = self._sky(d[:, sky])
        if cfg.exposure != 1.0:
            rgb *= np.float32(cfg.exposure)
        rgb = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
        return rgb, depth.astype(np.float32)

    def _sky(self, d: np.ndarray) -> np.ndarray:
        """Sky colour (N x 3) for world ray directions d (3 x N): depends on direction only, as
        a sky at infinity does (a translating camera sees it unchanged)."""
        if self.cfg.sky == "flat":
            return np.broadcast_to(np.array([0.62, 0.72, 0.86], dtype=np.float32), (d.shape[1], 3))
        elev = np.clip(-d[1] / np.linalg.norm(d, axis=0), 0, 1)
        rgb = _HAZE + elev[:, None] * (np.array([0.35, 0.55, 0.9]) - _HAZE) * 3
        if self.cfg.sky == "clouds":
            azimuth = np.arctan2(d[0], d[2]).astype(np.float32)
            cover = self._noise(azimuth * 12.0, elev.astype(np.float32) * 25.0, 1.0)
            cover = np.clip((cover - 0.45) * 2.5, 0, 1)[:, None]
            rgb = rgb * (1 - cover) + np.float32(0.93) * cover
        return rgb

    @staticmethod
    def _bbox(box, w2c, K, H, W, near=0.05):
        """Pixel rows/cols a box can cover: its corners and, where it straddles the camera's
        near plane, the points where its edges cross that plane; None if out of view."""
        c = np.array(np.meshgrid(*[[box[a], box[a + 3]] for a in range(3)], indexing="ij")).reshape(3, -1)
        cam = w2c[:3, :3] @ c + w2c[:3, 3:]  # 3 x 8, corner index = 4 i + 2 j + k
        front = cam[2] > near
        if not front.any():
            return None
        pts = [cam[:, front]]
        if not front.all():
            for a, b in _BOX_EDGES:
                if front[a] != front[b]:
                    f = (near - cam[2, a]) / (cam[2, b] - cam[2, a])
                    pts.append((cam[:, a] + f * (cam[:, b] - cam[:, a]))[:, None])
        pts = np.hstack(pts)
        uv = (K @ pts)[:2] / pts[2]
        c0, c1 = int(np.floor(uv[0].min())), int(np.ceil(uv[0].max())) + 1
        r0, r1 = int(np.floor(uv[1].min())), int(np.ceil(uv[1].max())) + 1
        c0, c1, r0, r1 = max(c0, 0), min(c1, W), max(r0, 0), min(r1, H)
        if c0 >= c1 or r0 >= r1:
            return None
        return r0, r1, c0, c1


def trajectory(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """(poses N x 4 x 4 camera-to-world, stamps N): forward with speed changes, the path's sway
    and an optional heading oscillation."""
    rng = np.random.default_rng(cfg.seed + 1)
    phase = rng.uniform(0, 2 * np.pi, 3)
    n = np.arange(cfg.num_frames)
    speed = cfg.speed * (1 + 0.15 * np.sin(2 * np.pi * n / 37.0 + phase[0]))
    z = np.concatenate([[0.0], np.cumsum(speed[:-1] / cfg.fps)])
    k = 2 * np.pi / cfg.sway_period
    x = cfg.sway_amplitude * np.sin(k * z + phase[1])
    yaw = np.arctan(cfg.sway_amplitude * k * np.cos(k * z + phase[1]))  # heading follows the path
    if cfg.yaw_amplitude:  # the camera looks around on top of that (a robot's wobble, a driver's head)
        yaw = yaw + cfg.yaw_amplitude * np.sin(2 * np.pi * n / cfg.yaw_period + phase[2])
    poses = np.tile(np.eye(4), (cfg.num_frames, 1, 1))
    c, s = np.cos(yaw), np.sin(yaw)
    poses[:, 0, 0], poses[:, 0, 2], poses[:, 2, 0], poses[:, 2, 2] = c, s, -s, c  # about y (down)
    poses[:, 0, 3], poses[:, 2, 3] = x, z
    return poses, n / cfg.fps


def render_drive(cfg: SyntheticConfig) -> Drive:
    """Render every frame of the drive (left and right cameras) with exact depth and poses."""
    poses, stamps = trajectory(cfg)
    scene = SyntheticScene(cfg, z_end=float(poses[-1, 2, 3]))
    right = np.eye(4)
    right[0, 3] = cfg.baseline
    left_frames = [scene.render(p) for p in poses]
    right_frames = [scene.render(p @ right) for p in poses]
    return Drive(
        rgb=np.stack([f[0] for f in left_frames]), rgb_right=np.stack([f[0] for f in right_frames]),
        depth=np.stack([f[1] for f in left_frames]), depth_right=np.stack([f[1] for f in right_frames]),
        pose=poses, K=cfg.K, stamps=stamps, baseline=cfg.baseline, T_velo_to_cam=T_VELO_TO_CAM.copy())
