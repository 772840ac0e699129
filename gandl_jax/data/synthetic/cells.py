"""The two cell models of the synthetic renderer; `render.render_site` picks
one by the design's `cells`.

* `intensity_cells` (`IntensityDesign`, "easy"): cells as soft ellipses on
  a jittered hexagonal lattice: nucleus (w1), ER around the nucleus (w2),
  cortical actin ring (w3), nucleoli plus cytoplasmic RNA (w4), Golgi spot
  plus plasma membrane (w5) and, for RxRx1, granular mitochondria (w6).
  Infected cells are rounded, smaller, with bright cytoplasmic RNA, enlarged
  nucleoli, disrupted actin and dispersed Golgi; dying cells (toxicity) have
  condensed, bright nuclei. Output levels are final 8-bit intensities.
* `morphology_cells` (`MorphologyDesign`, "hard", "hard2"): the same
  compartments, with the design's phenotype (syncytia, rounding, clumping,
  nucleolar changes, Golgi fragmentation or swelling, actin disruption, ER
  vesicles or collapse, RNA foci) and arrangement (lattice regularity and
  orientation per cell type). Output levels are arbitrary: the renderer
  replaces every channel's intensity distribution afterwards.

Sizes are defined for a `field`-wide field (256 for the intensity model) and
scale with `size`, so a 64x64 site is the same field of view at a lower
resolution. All cells of a site are drawn at once (`geometry.py`).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

from gandl_jax.data.synthetic import designs
from gandl_jax.data.synthetic.geometry import (lattice, points_in, soft_disc,
                                               splat, spots, torus_delta,
                                               window, window_uv)

# Intensity model: peak intensities (8-bit levels) of the cell compartments
# before plate gain, and the background level.
_AMP_I = dict(nucleus=120.0, er=55.0, actin_ring=75.0, actin_diffuse=22.0,
              rna_cyto=20.0, nucleoli=80.0, golgi=95.0, membrane=30.0, mito=65.0)
BACKGROUND = 8.0
# Morphology model: peak intensities in arbitrary units (histogram matching
# sets the final levels; these fix the relative brightness inside a channel).
_AMP_M = dict(nucleus=120.0, er=55.0, er_puncta=70.0, actin_ring=75.0,
              fibres=35.0, actin_diffuse=15.0, actin_patch=90.0, rna_cyto=20.0,
              rna_foci=60.0, nucleoli=80.0, golgi=95.0, golgi_puncta=70.0,
              membrane=30.0, mito=65.0)


def intensity_cells(rng: np.random.Generator, size: int,
                    morph: designs.Morphology, des: designs.IntensityDesign,
                    num_channels: int, severity: float, toxicity: float,
                    effect: Sequence[float] = (1.0,) * 9
                    ) -> Tuple[np.ndarray, dict]:
  """Renders one field of cells: float32 (C, size, size) intensities >= 0.

  `severity` is the probability that a cell is infected, `toxicity` in [0, 1]
  the compound toxicity; `effect` scales (cell radius, nucleus radius,
  occupancy, brightness w1..w6) for RxRx1 siRNAs. Returns the image and a dict
  of per-site truth (cell count, infected fraction).
  """
  scale = size / 256.0
  occupancy = morph.occupancy * effect[2] * (1.0 - des.infection_loss * severity) \
      * (1.0 - designs.TOXIC_DEATH * toxicity)
  cx, cy = lattice(rng, morph.spacing * scale, size, min(occupancy, 1.0))
  n = cx.size
  img = np.zeros((num_channels, size, size), np.float64)
  bright = np.asarray(morph.brightness[:num_channels]) * np.asarray(effect[3:3 + num_channels])
  if n == 0:
    return (img + BACKGROUND).astype(np.float32), dict(n_cells=0, infected_fraction=0.0)

  infected = rng.random(n) < severity
  inf = infected.astype(np.float32)
  dying = rng.random(n) < toxicity          # condensed (pyknotic) nuclei
  dy_ = dying.astype(np.float32)

  # Cell body geometry: infected cells round up and shrink.
  elong = np.maximum(1.0, rng.normal(morph.elongation, morph.elongation_sd, n))
  elong = np.where(infected, 1.0 + 0.3 * (elong - 1.0), elong)
  radius = morph.cell_radius * scale * effect[0] * rng.lognormal(0.0, 0.12, n)
  radius *= np.where(infected, 0.8, 1.0)
  a = radius * np.sqrt(elong)
  b = radius / np.sqrt(elong)
  theta = rng.uniform(0.0, np.pi, n)
  # Per-cell stain variability.
  jitter = rng.lognormal(0.0, 0.2, (num_channels, n)).astype(np.float32)

  rho2, flat = window(size, cx, cy, a, b, theta, reach=1.25)
  disc = soft_disc(rho2, 10.0)
  # w2: ER, brightest near the nucleus.
  er = np.exp(-1.3 * rho2) * disc
  img[1] += splat(size, flat, er * (_AMP_I["er"] * jitter[1])[:, None, None])
  # w3: cortical actin ring; infection disrupts it into diffuse actin.
  ring = np.exp(-((np.sqrt(rho2) - 0.92) / 0.13) ** 2)
  ring_amp = _AMP_I["actin_ring"] * (1.0 - 0.55 * inf)
  diffuse_amp = _AMP_I["actin_diffuse"] * (1.0 + 1.5 * inf)
  img[2] += splat(size, flat, ring * ring_amp[:, None, None] * jitter[2][:, None, None]
                  + disc * (diffuse_amp * jitter[2])[:, None, None])
  # w4: cytoplasmic RNA, strongly up in infected cells (viral replication).
  rna_amp = _AMP_I["rna_cyto"] * (1.0 + 3.0 * inf) * jitter[3]
  img[3] += splat(size, flat, np.exp(-1.0 * rho2) * disc * rna_amp[:, None, None])
  # w5: plasma membrane (thin ring).
  mem = np.exp(-((np.sqrt(rho2) - 1.0) / 0.08) ** 2)
  img[4] += splat(size, flat, mem * (_AMP_I["membrane"] * jitter[4])[:, None, None])
  if num_channels > 5:
    # w6: mitochondria, perinuclear and granular (texture added below).
    img[5] += splat(size, flat, np.exp(-0.9 * rho2) * disc
                    * (_AMP_I["mito"] * jitter[5])[:, None, None])
  del rho2, flat, disc, er, ring, mem

  # w1: nucleus; dying cells have small, bright (condensed) nuclei.
  e_n = 1.0 + 0.4 * (elong - 1.0)
  rn = morph.nucleus_radius * scale * effect[1] * rng.lognormal(0.0, 0.1, n)
  rn *= 1.0 - 0.35 * dy_
  na, nb = rn * np.sqrt(e_n), rn / np.sqrt(e_n)
  ncx = cx + rng.normal(0.0, 0.1, n) * radius
  ncy = cy + rng.normal(0.0, 0.1, n) * radius
  rho2, flat = window(size, ncx, ncy, na, nb, theta, reach=1.4)
  nuc_amp = _AMP_I["nucleus"] * (1.0 + 0.8 * dy_) * jitter[0]
  img[0] += splat(size, flat, soft_disc(rho2, 7.0) * nuc_amp[:, None, None])

  # w4: nucleoli, 2-3 per nucleus, enlarged and brighter on infection.
  k = 3
  ang = rng.uniform(0.0, 2 * np.pi, (n, k))
  dist = np.sqrt(rng.random((n, k))) * 0.5
  present = rng.random((n, k)) < np.array([1.0, 1.0, 0.5])
  ox = (np.cos(ang) * dist * rn[:, None]).ravel()
  oy = (np.sin(ang) * dist * rn[:, None]).ravel()
  sig = (0.2 * rn[:, None] * (1.0 + 0.5 * inf[:, None]) * np.ones((1, k))).ravel()
  sig = np.maximum(sig, 0.35)
  rho2, flat = window(size, np.repeat(ncx, k) + ox, np.repeat(ncy, k) + oy,
                      sig, sig, np.zeros(n * k), reach=2.5)
  nl_amp = (_AMP_I["nucleoli"] * (1.0 + 0.4 * inf)[:, None] * jitter[3][:, None]
            * present).ravel()
  img[3] += splat(size, flat, np.exp(-0.5 * rho2) * nl_amp[:, None, None])

  # w5: Golgi, a perinuclear spot; dispersed (larger, dimmer) on infection.
  gang = rng.uniform(0.0, 2 * np.pi, n)
  gd = rn * 1.2
  gr = np.maximum(rn * 0.55 * (1.0 + 0.8 * inf), 0.4)
  rho2, flat = window(size, ncx + np.cos(gang) * gd, ncy + np.sin(gang) * gd,
                      gr, gr * 0.7, gang, reach=2.5)
  g_amp = _AMP_I["golgi"] * (1.0 - 0.5 * inf) * jitter[4]
  img[4] += splat(size, flat, np.exp(-0.5 * rho2 * 2.0) * g_amp[:, None, None])

  img *= bright[:, None, None]
  if num_channels > 5:
    img[5] *= rng.uniform(0.4, 1.6, (size, size))
  img += BACKGROUND
  return img.astype(np.float32), dict(n_cells=int(n),
                                      infected_fraction=float(inf.mean()))


def _syncytia(rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
              infected: np.ndarray, size: float, reach: float, p: float,
              max_members: int) -> np.ndarray:
  """Group label per cell: infected cells fuse with infected neighbours.

  Cells in random order; an unassigned infected cell seeds a syncytium with
  probability `p` and takes its unassigned infected neighbours within `reach`
  (nearest first, at most `max_members` cells). Others are their own group.
  """
  n = x.size
  group = np.arange(n)
  if p <= 0 or max_members < 2 or n < 2:
    return group
  dx = torus_delta(x[:, None] - x[None, :], size)
  dy = torus_delta(y[:, None] - y[None, :], size)
  dist = np.hypot(dx, dy)
  free = infected.copy()
  seeds = rng.random(n) < p
  for i in rng.permutation(n):
    if not (free[i] and seeds[i]):
      continue
    cand = np.flatnonzero(free & (dist[i] < reach))
    cand = cand[np.argsort(dist[i, cand], kind="stable")][:max_members]
    if cand.size >= 2:
      group[cand] = i
      free[cand] = False
  return group


def morphology_cells(rng: np.random.Generator, size: int,
                     morph: designs.Morphology, des: designs.MorphologyDesign,
                     cell_type: str, num_channels: int, severity: float,
                     toxicity: float, effect: Sequence[float] = (1.0,) * 9
                     ) -> Tuple[np.ndarray, dict]:
  """One field of cells before intensity matching: float (C, size, size).

  `severity` is the probability that a cell is infected, `toxicity` in [0, 1]
  the compound toxicity, `effect` the RxRx1 siRNA scales (cell radius,
  nucleus radius, occupancy, then per channel the brightness of the
  channel's main compartment relative to the others: after matching only
  that ratio survives).
  """
  scale = size / des.field
  jitter_frac, spread = des.arrangement_of(cell_type)
  occupancy = (morph.occupancy * effect[2] * rng.lognormal(0.0, des.occupancy_sd)
               * (1.0 - des.infection_loss * severity)
               * (1.0 - designs.TOXIC_DEATH * toxicity))
  spacing = morph.spacing * scale
  # Jittered hexagonal lattice (torus); the jitter sets how regular it is.
  nx = max(1, int(round(size / spacing)))
  dxl = size / nx
  ny = max(2, 2 * int(round(size / (dxl * math.sqrt(3)))))
  dyl = size / ny
  iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
  x = (ix + 0.5 * (iy % 2)) * dxl + rng.normal(0.0, jitter_frac * dxl, ix.shape)
  y = iy * dyl + rng.normal(0.0, jitter_frac * dyl, iy.shape)
  keep = rng.random(ix.shape) < min(occupancy, 1.0)
  x, y = x[keep] % size, y[keep] % size
  n = x.size
  img = np.zeros((num_channels, size, size), np.float64)
  if n == 0:
    return img, dict(n_cells=0, infected_fraction=0.0)
  bright = np.ones(num_channels) * np.asarray(effect[3:3 + num_channels])

  infected = rng.random(n) < severity
  strength = np.where(infected, rng.uniform(0.6, 1.0, n), 0.0)
  dying = rng.random(n) < toxicity
  if des.clumping > 0 and infected.sum() >= 2:
    # Detaching infected cells gather: pull each towards its nearest infected
    # neighbour.
    xi, yi = x[infected], y[infected]
    ddx = torus_delta(xi[None, :] - xi[:, None], size)
    ddy = torus_delta(yi[None, :] - yi[:, None], size)
    d = np.hypot(ddx, ddy)
    np.fill_diagonal(d, np.inf)
    j = np.argmin(d, axis=1)
    k = np.arange(xi.size)
    x[infected] = (xi + des.clumping * ddx[k, j]) % size
    y[infected] = (yi + des.clumping * ddy[k, j]) % size

  # Orientation: around one site-wide direction (aligned streams), or random.
  site_theta = rng.uniform(0.0, np.pi)
  if spread < np.pi:
    theta = site_theta + rng.uniform(-1.0, 1.0, n) * min(spread, np.pi / 2)
  else:
    theta = rng.uniform(0.0, np.pi, n)
  elong = np.maximum(1.0, rng.normal(morph.elongation, morph.elongation_sd, n))
  elong = np.where(infected, 1.0 + (1.0 - strength * (1.0 - des.rounding))
                   * (elong - 1.0), elong)
  elong = np.where(dying, 1.0 + 0.3 * (elong - 1.0), elong)
  radius = morph.cell_radius * scale * effect[0] * rng.lognormal(0.0, 0.12, n)
  radius *= np.where(infected, 1.0 - strength * (1.0 - des.infected_radius), 1.0)
  radius *= np.where(dying, 0.7, 1.0)

  # Nuclei (one per cell), before fusion moves them.
  rn = morph.nucleus_radius * scale * effect[1] * rng.lognormal(0.0, 0.1, n)
  rn *= np.where(dying, 0.6, 1.0)
  e_n = 1.0 + 0.4 * (elong - 1.0)
  ncx = x + rng.normal(0.0, 0.1, n) * radius
  ncy = y + rng.normal(0.0, 0.1, n) * radius

  # Syncytia: members become one body at their centroid; nuclei cluster.
  group = _syncytia(rng, x, y, infected & ~dying, size, 1.6 * spacing,
                    des.syncytium, des.syncytium_max)
  roots, body_of = np.unique(group, return_inverse=True)
  nb = roots.size
  counts = np.bincount(body_of, minlength=nb)
  offx = torus_delta(x - x[group], size)
  offy = torus_delta(y - y[group], size)
  bx = x[roots] + np.bincount(body_of, offx, nb) / counts
  by = y[roots] + np.bincount(body_of, offy, nb) / counts
  syncytial = counts[body_of] > 1
  cx_b, cy_b = bx[body_of], by[body_of]
  pull = 0.45
  ncx = np.where(syncytial, cx_b + pull * torus_delta(ncx - cx_b, size), ncx)
  ncy = np.where(syncytial, cy_b + pull * torus_delta(ncy - cy_b, size), ncy)
  body_r = np.sqrt(np.bincount(body_of, radius ** 2, nb))
  body_e = np.where(counts > 1, 1.1, elong[roots])
  body_t = theta[roots]
  body_s = np.bincount(body_of, strength, nb) / counts   # infection strength
  body_a, body_b = body_r * np.sqrt(body_e), body_r / np.sqrt(body_e)
  bx, by = bx % size, by % size

  stain = rng.lognormal(0.0, 0.2, (num_channels, nb))   # per-cell staining
  s = body_s
  # Bodies: ER (w2), actin (w3), cytoplasmic RNA (w4), membrane (w5), mito (w6).
  for sel in (counts == 1, counts > 1):
    if not sel.any():
      continue
    u, v, flat = window_uv(size, bx[sel], by[sel], body_a[sel],
                           body_b[sel], body_t[sel], reach=1.25)
    rho2 = u * u + v * v
    r = np.sqrt(rho2)
    disc = soft_disc(rho2, 10.0)
    ss = s[sel][:, None, None]
    st = stain[:, sel][:, :, None, None]
    k_er = 1.3 * (1.0 + ss * (des.er_collapse - 1.0))
    er = np.exp(-k_er * rho2) * disc * _AMP_M["er"] * bright[1]
    img[1] += splat(size, flat, er * st[1])
    phi = np.arctan2(v, u)
    phase = rng.uniform(0, 2 * np.pi, (int(sel.sum()), 1, 1))
    n_gaps = rng.integers(2, 5, (int(sel.sum()), 1, 1))
    gaps = 1.0 / (1.0 + np.exp(-6.0 * np.cos(n_gaps * phi + phase)))
    integrity = 1.0 - ss * (1.0 - des.ring_integrity) * gaps * 1.6
    ring = np.exp(-((r - 0.9) / 0.13) ** 2) * np.clip(integrity, 0.0, 1.0)
    fib_phase = rng.uniform(0, 2 * np.pi, (int(sel.sum()), 1, 1))
    fibres = disc * (0.5 + 0.5 * np.cos(3.0 * np.pi * v + fib_phase)) ** 4 \
        * np.exp(-(u / 0.75) ** 4) * (1.0 - ss * (1.0 - des.fibres_infected))
    actin = (ring * _AMP_M["actin_ring"] * bright[2] + fibres * _AMP_M["fibres"]
             + disc * _AMP_M["actin_diffuse"])
    img[2] += splat(size, flat, actin * st[2])
    rna = np.exp(-1.0 * rho2) * disc * _AMP_M["rna_cyto"]
    img[3] += splat(size, flat, rna * st[3])
    mem = np.exp(-((r - 1.0) / 0.08) ** 2) * _AMP_M["membrane"]
    img[4] += splat(size, flat, mem * st[4])
    if num_channels > 5:
      mito = np.exp(-0.9 * rho2) * disc * _AMP_M["mito"] * bright[5]
      img[5] += splat(size, flat, mito * st[5])
    del u, v, flat, rho2, r, disc, er, phi, gaps, ring, fibres, actin, rna, mem

  # Infection puncta: ER vesicles (w2), RNA foci (w4), Golgi fragments (w5),
  # actin patches (w3); their number scales with the infection strength.
  unit = scale
  for ch, count, amp, sigma, spread_ in (
      (1, des.er_puncta, _AMP_M["er_puncta"], 0.9, 0.7),
      (3, des.rna_foci, _AMP_M["rna_foci"], 0.8, 0.6),
      (4, des.golgi_puncta, _AMP_M["golgi_puncta"], 0.8, 0.85),
      (2, des.actin_patches, _AMP_M["actin_patch"], 1.0, 0.9)):
    if count <= 0:
      continue
    k = rng.poisson(count * s * np.maximum(counts, 1) ** 0.5)
    idx, px, py = points_in(rng, bx, by, body_a, body_b, body_t, k, spread_)
    img[ch] += spots(size, px % size, py % size, sigma * unit,
                      amp * stain[ch, idx] * (bright[ch] if ch != 3 else 1.0))
  if num_channels > 5:
    # Mitochondria are granular: a fixed-density punctate texture.
    k = rng.poisson(10 * counts)
    idx, px, py = points_in(rng, bx, by, body_a, body_b, body_t, k, 0.8)
    img[5] += spots(size, px % size, py % size, 0.8 * unit,
                     0.6 * _AMP_M["mito"] * stain[5, idx])

  # Nuclei (w1): dying ones condensed and bright.
  st_n = stain[:, body_of]
  na, nbx = rn * np.sqrt(e_n), rn / np.sqrt(e_n)
  rho2, flat = window(size, ncx % size, ncy % size, na, nbx, theta,
                      reach=1.4)
  nuc = soft_disc(rho2, 7.0) * (_AMP_M["nucleus"] * (1.0 + 0.8 * dying)
                                * st_n[0] * bright[0])[:, None, None]
  img[0] += splat(size, flat, nuc)
  del rho2, flat, nuc

  # Nucleoli (w4).
  s_c = strength
  lo_h, hi_h = des.nucleoli_healthy
  lo_i, hi_i = des.nucleoli_infected
  n_h = rng.integers(lo_h, hi_h + 1, n)
  n_i = rng.integers(lo_i, hi_i + 1, n)
  n_nl = np.where(infected & (rng.random(n) < s_c + 0.2), n_i, n_h)
  n_nl = np.where(dying, 0, n_nl)
  idx = np.repeat(np.arange(n), n_nl)
  ang = rng.uniform(0.0, 2 * np.pi, idx.size)
  dist = np.sqrt(rng.random(idx.size)) * 0.5 * rn[idx]
  size_f = np.where(infected, 1.0 + s_c * (des.nucleoli_size_infected - 1.0), 1.0)
  img[3] += spots(size, (ncx[idx] + np.cos(ang) * dist) % size,
                   (ncy[idx] + np.sin(ang) * dist) % size,
                   0.2 * rn[idx] * size_f[idx],
                   _AMP_M["nucleoli"] * st_n[3, idx] * bright[3])

  # Golgi (w5): a compact perinuclear ribbon per nucleus; on infection it
  # fades as it fragments (puncta above) or swells.
  gang = rng.uniform(0.0, 2 * np.pi, n)
  gd = rn * 1.3
  gr = rn * 0.55 * (1.0 + s_c * (des.golgi_swelling - 1.0))
  fade = 1.0 - s_c * (0.8 if des.golgi_puncta > 0 else 0.3)
  gx, gy = (ncx + np.cos(gang) * gd) % size, (ncy + np.sin(gang) * gd) % size
  rho2, flat = window(size, gx, gy, np.maximum(gr, 0.4),
                      np.maximum(gr * 0.7, 0.4), gang, reach=2.5)
  g_amp = _AMP_M["golgi"] * fade * st_n[4] * bright[4] * (1 - 0.7 * dying)
  img[4] += splat(size, flat, np.exp(-rho2) * g_amp[:, None, None])
  return img, dict(n_cells=int(n), infected_fraction=float(infected.mean()))
