"""Relative pose error of a pose network against ground truth, up to the monocular scale.

For each frame pair, with T = [R | t] mapping target-camera points into the source camera:
- rotation error: the angle of R_pred^T R_gt (degrees);
- translation direction error: the angle between t_pred and t_gt (degrees), scale-free;
- translation magnitude: r = |t_pred| / |t_gt|. Monocular training fixes no scale, so the
  sequence's median r is divided out; the error is mean |r / median(r) - 1|, and median(r) is
  reported as `translation_scale` (it drifts with the depth scale).
Pairs whose true translation is under `min_translation` metres are skipped for the translation
terms (their direction is undefined).
"""
from __future__ import annotations

import numpy as np


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Rotation angle of N x 3 x 3 rotation matrices, degrees (trace formula, clipped)."""
    cos = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def relative_pose_errors(T_pred: np.ndarray, T_gt: np.ndarray, min_translation: float = 1e-3) -> dict:
    """T_pred, T_gt: N x 4 x 4 relative poses of the same frame pairs -> mean errors (see module)."""
    T_pred, T_gt = np.asarray(T_pred, np.float64), np.asarray(T_gt, np.float64)
    if T_pred.shape != T_gt.shape or T_pred.ndim != 3 or T_pred.shape[1:] != (4, 4):
        raise ValueError(f"expected two N x 4 x 4 pose stacks, got {T_pred.shape} and {T_gt.shape}")
    if not len(T_pred):
        raise ValueError("no poses to compare")
    R_err = np.swapaxes(T_pred[:, :3, :3], 1, 2) @ T_gt[:, :3, :3]
    rot = rotation_angle_deg(R_err)
    t_pred, t_gt = T_pred[:, :3, 3], T_gt[:, :3, 3]
    n_pred, n_gt = np.linalg.norm(t_pred, axis=1), np.linalg.norm(t_gt, axis=1)
    ok = (n_gt >= min_translation) & (n_pred > 0)
    out = {"rotation_deg": float(rot.mean()), "pairs": int(len(rot)),
           "translation_dir_deg": float("nan"), "translation_mag_err": float("nan"),
           "translation_scale": float("nan")}
    if ok.any():
        cos = (t_pred[ok] * t_gt[ok]).sum(1) / (n_pred[ok] * n_gt[ok])
        ratio = n_pred[ok] / n_gt[ok]
        scale = float(np.median(ratio))
        out.update(translation_dir_deg=float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean()),
                   translation_mag_err=float(np.abs(ratio / scale - 1).mean()),
                   translation_scale=scale)
    return out
