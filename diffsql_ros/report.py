"""HTML evaluation report: pictures (input | depth | uncertainty | point cloud), tables and plots.

Pictures are PNG files written next to the page with OpenCV and referenced by relative paths,
so the page opens offline and the images can be reused. Plots (plots.py) are small PNGs
embedded in the page itself as data URIs: they belong to that page's numbers. Point clouds are rendered here with a
small numpy z-buffer splatter from a raised, pitched-down virtual camera: no GL on a headless
CPU box, and a few thousand points render in milliseconds.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import math
import pathlib
from typing import Optional, Sequence

import cv2
import numpy as np

from diffsql_model.camera import project_points
from diffsql_model.colormaps import apply_colormap, depth_picture_bgr, range_index, uncertainty_picture_bgr
from diffsql_model.eval.sparsification import RANKINGS

METRIC_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")
METRIC_LABELS = {"abs_rel": "AbsRel", "sq_rel": "SqRel", "rmse": "RMSE", "rmse_log": "RMSElog",
                 "a1": "δ<1.25", "a2": "δ<1.25²", "a3": "δ<1.25³", "log10": "log10"}


@dataclasses.dataclass
class Table:
    header: list
    rows: list  # list of lists of cells (str or numbers)
    caption: str = ""


@dataclasses.dataclass
class FrameRow:
    caption: str
    images: list  # [(label, path relative to the page)]


@dataclasses.dataclass
class Figure:
    caption: str
    png: bytes  # embedded in the page (plots.py makes them)


@dataclasses.dataclass
class Section:
    title: str
    paragraphs: list = dataclasses.field(default_factory=list)
    tables: list = dataclasses.field(default_factory=list)
    frames: list = dataclasses.field(default_factory=list)
    figures: list = dataclasses.field(default_factory=list)  # [Figure]


# ----------------------------------------------------------------------------- pictures

def label(image_bgr: np.ndarray, text: str) -> np.ndarray:
    """Burn a short caption (value range, units) into the top-left corner."""
    out = image_bgr.copy()
    scale = max(0.4, out.shape[1] / 1400)
    org = (6, int(18 * scale / 0.5))
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def render_point_cloud(xyz: np.ndarray, rgb: Optional[np.ndarray] = None, size=(640, 360),
                       height: float = 6.0, back: float = 8.0, pitch_deg: float = 25.0,
                       fov_deg: float = 70.0, max_range: float = 60.0, point_px: int = 2) -> np.ndarray:
    """Render (N,3) points given in a camera optical frame as seen from a virtual camera
    `height` m above and `back` m behind it, pitched down `pitch_deg`. Colours: `rgb` (N,3
    uint8, RGB) where given, otherwise distance through turbo. Returns HxWx3 BGR uint8."""
    w, h = size
    canvas = np.full((h, w, 3), 24, np.uint8)
    xyz = np.asarray(xyz, np.float32).reshape(-1, 3)
    keep = np.isfinite(xyz).all(axis=1) & (xyz[:, 2] > 0) & (xyz[:, 2] < max_range)
    xyz = xyz[keep]
    if rgb is not None:
        rgb = np.asarray(rgb, np.uint8).reshape(-1, 3)[keep]
    if len(xyz) == 0:
        return label(canvas, "no points")
    th = math.radians(pitch_deg)
    # Rows: the virtual camera's x, y, z axes in the optical frame (y is down, so "down" is +y).
    R = np.array([[1, 0, 0], [0, math.cos(th), -math.sin(th)], [0, math.sin(th), math.cos(th)]], np.float32)
    centre = np.array([0.0, -height, -back], np.float32)
    p = (xyz - centre) @ R.T
    f = 0.5 * w / math.tan(math.radians(fov_deg) / 2)
    front = p[:, 2] > 0.1
    p = p[front]
    u, v = project_points(np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]]), p)
    u, v = np.round(u).astype(np.int64), np.round(v).astype(np.int64)
    if rgb is not None:
        colours = rgb[front][:, ::-1]
    else:
        dist = np.linalg.norm(xyz[front], axis=1)
        colours = apply_colormap(range_index(dist, 0.0, max_range), "turbo", bgr=True)
    # Painter's algorithm: draw far to near so the nearest point of a pixel is written last.
    order = np.argsort(-p[:, 2], kind="stable")
    u, v, colours = u[order], v[order], colours[order]
    for du in range(point_px):
        for dv in range(point_px):
            uu, vv = u + du, v + dv
            inside = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
            canvas[vv[inside], uu[inside]] = colours[inside]
    return canvas


def frame_pictures(out_dir: pathlib.Path, stem: str, image_rgb: np.ndarray, depth: np.ndarray,
                   uncertainty: Optional[np.ndarray], xyz: Optional[np.ndarray],
                   xyz_rgb: Optional[np.ndarray] = None, cloud_note: str = "") -> list:
    """Write the four pictures of one frame as PNGs; returns [(label, file name)] for FrameRow."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    valid = np.isfinite(depth) & (depth > 0)
    lo, hi = (np.percentile(depth[valid], [1, 99]) if valid.any() else (0.0, 0.0))
    pics = [("input", image_rgb[..., ::-1].copy()),
            ("depth", label(depth_picture_bgr(depth, lo, hi), f"depth {lo:.1f}-{hi:.1f} m (warm = near)"))]
    if uncertainty is not None:
        fin = np.isfinite(uncertainty)
        ulo, uhi = (np.percentile(uncertainty[fin], [1, 99]) if fin.any() else (0.0, 0.0))
        pics.append(("uncertainty", label(uncertainty_picture_bgr(uncertainty), f"std {ulo:.2f}-{uhi:.2f} m")))
    if xyz is not None:
        if len(xyz) > 150_000:  # a full-resolution cloud: every k-th point draws the same picture
            k = int(np.ceil(len(xyz) / 150_000))
            xyz, xyz_rgb = xyz[::k], (None if xyz_rgb is None else xyz_rgb[::k])
        cloud = render_point_cloud(xyz, xyz_rgb, size=(640, 360))
        pics.append(("point cloud", label(cloud, cloud_note or f"{len(xyz)} points, oblique view")))
    entries = []
    for name, img in pics:
        fname = f"{stem}_{name.replace(' ', '_')}.png"
        if not cv2.imwrite(str(out_dir / fname), img):
            raise OSError(f"could not write {out_dir / fname}")
        entries.append((name, fname))
    return entries


# ----------------------------------------------------------------------------- tables

def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def metrics_table(rows: Sequence[tuple], caption: str = "", keys=METRIC_KEYS) -> Table:
    """rows: [(name, metrics dict, extra note)] -> Table with the standard metric columns."""
    header = ["run"] + [METRIC_LABELS.get(k, k) for k in keys] + ["frames", "note"]
    body = []
    for name, metrics, note in rows:
        metrics = metrics or {}
        body.append([name] + [fmt(metrics.get(k)) for k in keys] + [fmt(metrics.get("count")), note])
    return Table(header, body, caption)


def latency_table(rows: Sequence[tuple], caption: str = "") -> Table:
    """rows: [(name, summary dict from bag_eval)] -> frames and latency percentiles."""
    header = ["run", "played", "evaluated", "dropped", "no LiDAR", "p50 ms", "p90 ms", "p99 ms", "max ms", "fps"]
    body = []
    for name, s in rows:
        lat = s.get("latency_ms", {})
        body.append([name, fmt(s.get("frames_played")), fmt(s.get("frames_evaluated")),
                     fmt(s.get("frames_dropped")), fmt(s.get("frames_without_lidar")),
                     fmt(lat.get("p50"), 1), fmt(lat.get("p90"), 1), fmt(lat.get("p99"), 1),
                     fmt(lat.get("max"), 1), fmt(s.get("throughput_fps"), 2)])
    return Table(header, body, caption)


def uncertainty_table(rows: Sequence[tuple], caption: str = "") -> Table:
    """rows: [(name, sparsification.mean_over_frames result or None)] -> AUSE / AURG per ranking."""
    header = ["run", "ranked by", "AbsRel AUSE", "AbsRel AURG", "RMSE AUSE", "RMSE AURG", "frames"]
    body = []
    for name, unc in rows:
        for rank in RANKINGS:
            r = (unc or {}).get(rank) or {}
            body.append([name, rank.replace("_over_", "/")]
                        + [fmt((r.get(m) or {}).get(k)) for m in ("abs_rel", "rmse") for k in ("ause", "aurg")]
                        + [fmt((unc or {}).get("n_frames"))])
    return Table(header, body, caption)


def stability_table(rows: Sequence[tuple], caption: str = "") -> Table:
    """rows: [(name, scale.mode, scale_stability.stability result or None)] -> ratio spread, %."""
    header = ["run", "scale.mode", "frames", "ratio median", "ratio CV %", "median change %", "max change %"]
    body = []
    for name, mode, st in rows:
        st = st or {}
        pct = [None if st.get(k) is None else 100 * st[k] for k in ("ratio_cv", "median_change", "max_change")]
        body.append([name, mode, fmt(st.get("n_frames")), fmt(st.get("ratio_median"))] + [fmt(v, 2) for v in pct])
    return Table(header, body, caption)


# ----------------------------------------------------------------------------- page

_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td:last-child{text-align:left}caption{text-align:left;font-style:italic}
.frames td{text-align:center;vertical-align:top;border:none}.frames img{width:320px}
.note{background:#fff6d5;padding:.5em;border-left:4px solid #e0a800}
figure{display:inline-block;margin:.4em 1em .4em 0;vertical-align:top}figcaption{font-size:90%;max-width:560px}"""


def _table_html(t: Table) -> str:
    parts = ["<table>"]
    if t.caption:
        parts.append(f"<caption>{html.escape(t.caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in t.header) + "</tr>")
    for row in t.rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _frames_html(frames: list) -> str:
    parts = ['<table class="frames">']
    for fr in frames:
        parts.append(f'<tr><td colspan="{len(fr.images)}" style="text-align:left"><b>{html.escape(fr.caption)}</b></td></tr>')
        parts.append("<tr>" + "".join(
            f'<td><img src="{html.escape(src, quote=True)}" alt="{html.escape(lbl, quote=True)}"><br>{html.escape(lbl)}</td>'
            for lbl, src in fr.images) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _figures_html(figures: list) -> str:
    parts = []
    for f in figures:
        src = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
        parts.append(f'<figure><img src="{src}" alt="{html.escape(f.caption, quote=True)}">'
                     f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
    return "\n".join(parts)


def write_report(path: str | pathlib.Path, title: str, sections: Sequence[Section], intro: str = "") -> pathlib.Path:
    """Write one self-contained HTML page (pictures by relative path) and return its path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        body.append(f"<p>{html.escape(intro)}</p>")
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        for p in s.paragraphs:
            cls = ' class="note"' if p.startswith("Note:") else ""
            body.append(f"<p{cls}>{html.escape(p)}</p>")
        body.extend(_table_html(t) for t in s.tables)
        if s.figures:
            body.append(_figures_html(s.figures))
        if s.frames:
            body.append(_frames_html(s.frames))
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
