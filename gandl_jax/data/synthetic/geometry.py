"""Drawing primitives of the synthetic renderer (pure numpy): cell centres on
a jittered hexagonal lattice, elliptical windows around many centres at
once, scatter-add onto a canvas (`np.bincount`) and Gaussian spots. Every
canvas is a torus (coordinates wrap), so there are no edge effects.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np


def lattice(rng: np.random.Generator, spacing: float, size: int,
             occupancy: float) -> Tuple[np.ndarray, np.ndarray]:
  """Jittered hexagonal lattice on a torus; returns x, y of the kept points."""
  nx = max(1, int(round(size / spacing)))
  dx = size / nx
  ny = max(2, 2 * int(round(size / (dx * math.sqrt(3)))))
  dy = size / ny
  iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
  x = (ix + 0.5 * (iy % 2)) * dx + rng.normal(0.0, 0.2 * dx, ix.shape)
  y = iy * dy + rng.normal(0.0, 0.2 * dy, iy.shape)
  keep = rng.random(ix.shape) < occupancy
  return (x[keep] % size).astype(np.float32), (y[keep] % size).astype(np.float32)


def window(size: int, cx: np.ndarray, cy: np.ndarray, a: np.ndarray,
            b: np.ndarray, theta: np.ndarray, reach: float):
  """Normalized elliptical radius^2 around each centre, plus flat pixel ids.

  Returns `rho2` of shape (N, W, W) (1.0 on the ellipse with semi-axes a, b)
  and `flat` (N, W, W) int indices into a (size*size) canvas (wrapped).
  """
  u, v, flat = window_uv(size, cx, cy, a, b, theta, reach)
  rho2 = u * u + v * v
  return rho2, flat


def window_uv(size: int, cx: np.ndarray, cy: np.ndarray, a: np.ndarray,
              b: np.ndarray, theta: np.ndarray, reach: float):
  """Elliptical coordinates around each centre, plus flat pixel ids.

  Returns `u`, `v` of shape (N, W, W), the offsets along the major and minor
  axes in units of the semi-axes a and b (u^2 + v^2 = 1 on the ellipse), and
  `flat` (N, W, W) int indices into a (size*size) canvas (wrapped); W covers
  `reach` times the largest semi-axis.
  """
  half = int(math.ceil(reach * float(max(np.max(a), 1e-3)))) + 1
  half = min(half, size // 2)
  off = np.arange(-half, half + 1, dtype=np.float32)
  ix0 = np.floor(cx).astype(np.int64)
  iy0 = np.floor(cy).astype(np.int64)
  fx = (cx - ix0).astype(np.float32)
  fy = (cy - iy0).astype(np.float32)
  dx = off[None, None, :] - fx[:, None, None]
  dy = off[None, :, None] - fy[:, None, None]
  c = np.cos(theta).astype(np.float32)[:, None, None]
  s = np.sin(theta).astype(np.float32)[:, None, None]
  u = (dx * c + dy * s) / a.astype(np.float32)[:, None, None]
  v = (dy * c - dx * s) / b.astype(np.float32)[:, None, None]
  ioff = np.arange(-half, half + 1, dtype=np.int64)
  rows = (iy0[:, None] + ioff[None, :]) % size
  cols = (ix0[:, None] + ioff[None, :]) % size
  flat = rows[:, :, None] * size + cols[:, None, :]
  return u, v, flat


def splat(size: int, flat: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Sums `values` (N, W, W) into a (size, size) canvas at the pixel ids
  `flat` of `window` / `window_uv`."""
  return np.bincount(flat.ravel(), weights=values.ravel().astype(np.float64),
                     minlength=size * size).reshape(size, size)


def soft_disc(rho2: np.ndarray, sharpness: float = 8.0) -> np.ndarray:
  """~1 inside the ellipse (rho2 < 1), ~0 outside, a logistic edge."""
  return 1.0 / (1.0 + np.exp(np.minimum((np.sqrt(rho2) - 1.0) * sharpness, 60.0)))


def torus_delta(d: np.ndarray, size: float) -> np.ndarray:
  """The shortest signed offset on a torus of side `size`."""
  return (d + size / 2) % size - size / 2


def points_in(rng: np.random.Generator, cx, cy, a, b, theta, counts,
               spread: float):
  """`counts[i]` random points inside ellipse i (radius fraction <= spread)."""
  idx = np.repeat(np.arange(cx.size), counts)
  r = np.sqrt(rng.random(idx.size)) * spread
  ang = rng.uniform(0.0, 2 * np.pi, idx.size)
  u, v = r * np.cos(ang) * a[idx], r * np.sin(ang) * b[idx]
  c, s = np.cos(theta[idx]), np.sin(theta[idx])
  return idx, cx[idx] + u * c - v * s, cy[idx] + u * s + v * c


def spots(size: int, x, y, sigma, amp, reach: float = 2.5) -> np.ndarray:
  """Gaussian spots (sigma in pixels, at least 0.35) splatted on a canvas."""
  if np.size(x) == 0:
    return np.zeros((size, size))
  sig = np.maximum(np.broadcast_to(np.asarray(sigma, np.float64), np.shape(x)),
                   0.35)
  rho2, flat = window(size, np.asarray(x), np.asarray(y), sig, sig,
                      np.zeros(np.size(x)), reach)
  return splat(size, flat, np.exp(-0.5 * rho2)
               * np.asarray(amp, np.float64)[:, None, None])
