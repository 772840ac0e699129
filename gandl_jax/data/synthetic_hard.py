"""The hard synthetic modes: biology in morphology, not in intensity.

`gandl-synth --difficulty hard` (and `hard2`) renders the same plate layouts,
compounds and planted truth as the easy mode (`synthetic.py`), but the
infection, cell-type and compound effects are carried only by the shape,
texture and arrangement of cells, modelled on what SARS-CoV-2 infected and
treated cells show:

* syncytia (spike-driven fusion of infected cells into multinucleated giant
  cells with clustered nuclei) and cell rounding;
* nucleolar changes (merged, enlarged nucleoli; or fragmented ones);
* Golgi fragmentation (a compact perinuclear ribbon breaks into puncta
  scattered through the cytoplasm; or swells);
* actin disruption (the cortical ring breaks into arcs, stress fibres are
  lost; or actin collapses into patches);
* ER remodelling into replication organelles (double-membrane vesicles,
  punctate ER) and cytoplasmic RNA replication foci;
* rescuing compounds lower the fraction of infected cells (same Hill curves
  as the easy mode), which moves every one of these back towards healthy;
  toxic compounds kill cells and condense nuclei;
* cell types differ in size, elongation, density and arrangement (HRCE: a
  regular epithelial cobblestone; VERO: larger elongated cells in aligned
  streams; RxRx1's four types likewise).

The site gets its spatial nuisances (focus blur and out-of-focus haze per
site, the plate's vignetting). Then every channel's site-level intensity
distribution is replaced by a class-independent target (exact histogram
matching: each pixel keeps its rank and takes the target's value at that
rank). The target is the average quantile function of reference sites that
mix all classes, warped per site by a random gain and gamma drawn from one
shared distribution. So the mean, standard deviation and every percentile of
every channel carry no class information; only where the bright pixels are
does. After matching come the per-plate gain and offset (stronger than the
easy mode), shot and read noise, all functions of the pixel value alone.

`hard2` is a second design with other phenotype parameters (no syncytia but
stronger rounding and clumping, fragmented nucleoli, swollen Golgi, patchy
actin, collapsed ER, different arrangements and magnification), so that a
conclusion that holds only for one design shows up.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from gandl_jax.data import synthetic as syn


@dataclasses.dataclass(frozen=True)
class Design:
  """Phenotype and nuisance parameters of one hard design.

  Lengths of `synthetic.MORPHOLOGY` are read as pixels of a `field`-wide field
  of view (easy mode: 256; a smaller field means larger cells per pixel).
  """
  name: str
  field: float
  # Arrangement per cell type: (lattice jitter as a fraction of the spacing,
  # orientation spread in radians around a site-wide direction; pi = random).
  arrangement: Tuple[Tuple[str, float, float], ...]
  # Infection.
  infection_loss: float        # fraction of cells lost at severity 1
  syncytium: float             # P(an infected cell seeds a syncytium)
  syncytium_max: int           # most nuclei in one syncytium
  rounding: float              # infected elongation: 1 + rounding * (e - 1)
  infected_radius: float       # infected cell radius multiplier
  clumping: float              # infected cells pulled towards each other
  nucleoli_healthy: Tuple[int, int]   # count range (inclusive)
  nucleoli_infected: Tuple[int, int]
  nucleoli_size_infected: float       # size multiplier
  ring_integrity: float        # infected: fraction of the actin ring left
  fibres_infected: float       # infected: fraction of stress fibres left
  actin_patches: int           # infected: actin aggregates per cell
  golgi_puncta: int            # infected: Golgi fragments per cell
  golgi_swelling: float        # infected: compact Golgi size multiplier
  er_puncta: int               # infected: ER vesicles (DMVs) per cell
  er_collapse: float           # infected: ER profile steepness multiplier
  rna_foci: int                # infected: cytoplasmic RNA foci per cell
  # Site-to-site nuisances (independent of every class).
  occupancy_sd: float          # lognormal sd of the site's cell density
  blur_max: float              # focus blur sigma ~ U(0, blur_max) px of the field
  haze: float                  # out-of-focus background, fraction of the peak
  target_gain_sd: float        # per-site, per-channel lognormal gain of the target
  target_gamma_sd: float       # per-site, per-channel lognormal gamma of the target
  # Plates (the easy mode: gain sd 0.18, offset N(6, 4), no vignetting).
  plate_gain_sd: float
  plate_offset: Tuple[float, float]
  plate_vignetting: Tuple[float, float]   # strength ~ U(lo, hi)

  def arrangement_of(self, cell_type: str) -> Tuple[float, float]:
    for ct, jitter, spread in self.arrangement:
      if ct == cell_type:
        return jitter, spread
    raise ValueError(f"design {self.name!r} has no arrangement for cell type "
                     f"{cell_type!r}")


_PI = math.pi
DESIGNS: Dict[str, Design] = {
    "hard": Design(
        name="hard", field=128.0,
        arrangement=(("HRCE", 0.12, _PI), ("VERO", 0.35, 0.35),
                     ("HEPG2", 0.25, _PI), ("HUVEC", 0.30, 0.30),
                     ("RPE", 0.12, _PI), ("U2OS", 0.40, 0.80)),
        infection_loss=0.15, syncytium=0.45, syncytium_max=6, rounding=0.5,
        infected_radius=1.0, clumping=0.0,
        nucleoli_healthy=(2, 4), nucleoli_infected=(1, 2),
        nucleoli_size_infected=1.7,
        ring_integrity=0.3, fibres_infected=0.2, actin_patches=0,
        golgi_puncta=8, golgi_swelling=1.0, er_puncta=6, er_collapse=1.0,
        rna_foci=5,
        occupancy_sd=0.15, blur_max=1.2, haze=0.08,
        target_gain_sd=0.25, target_gamma_sd=0.15,
        plate_gain_sd=0.35, plate_offset=(8.0, 6.0),
        plate_vignetting=(0.1, 0.4)),
    "hard2": Design(
        name="hard2", field=160.0,
        arrangement=(("HRCE", 0.20, 1.2), ("VERO", 0.45, 0.60),
                     ("HEPG2", 0.30, _PI), ("HUVEC", 0.35, 0.45),
                     ("RPE", 0.18, 1.2), ("U2OS", 0.45, 1.0)),
        infection_loss=0.3, syncytium=0.0, syncytium_max=1, rounding=0.15,
        infected_radius=0.8, clumping=0.35,
        nucleoli_healthy=(1, 3), nucleoli_infected=(4, 6),
        nucleoli_size_infected=0.6,
        ring_integrity=0.8, fibres_infected=0.0, actin_patches=5,
        golgi_puncta=0, golgi_swelling=2.2, er_puncta=0, er_collapse=2.5,
        rna_foci=0,
        occupancy_sd=0.2, blur_max=1.5, haze=0.12,
        target_gain_sd=0.3, target_gamma_sd=0.2,
        plate_gain_sd=0.4, plate_offset=(8.0, 7.0),
        plate_vignetting=(0.15, 0.45)),
}

# Peak intensities of the compartments (arbitrary units: histogram matching
# sets the final levels; these fix the relative brightness inside a channel).
_AMP = dict(nucleus=120.0, er=55.0, er_puncta=70.0, actin_ring=75.0,
            fibres=35.0, actin_diffuse=15.0, actin_patch=90.0, rna_cyto=20.0,
            rna_foci=60.0, nucleoli=80.0, golgi=95.0, golgi_puncta=70.0,
            membrane=30.0, mito=65.0)
QUANTILE_GRID = 257           # points of the target quantile functions
_REFERENCE_SITES = 4          # reference sites per (cell type, condition)


def design(difficulty: str) -> Design:
  if difficulty not in DESIGNS:
    raise ValueError(f"difficulty must be one of {list(syn.DIFFICULTIES)}, "
                     f"got {difficulty!r}")
  return DESIGNS[difficulty]


def phenotype_text(difficulty: str) -> str:
  """The infected-cell phenotype of a design, for synthetic_truth.csv."""
  d = design(difficulty)
  parts = []
  if d.syncytium > 0:
    parts.append(f"syncytia (P {d.syncytium} per infected cell, up to "
                 f"{d.syncytium_max} nuclei, clustered)")
  parts.append(f"rounding (elongation x{d.rounding} of its excess)")
  if d.infected_radius != 1.0:
    parts.append(f"radius x{d.infected_radius}")
  if d.clumping > 0:
    parts.append(f"clumping ({d.clumping} of the nearest-infected distance)")
  parts.append(f"nucleoli {d.nucleoli_healthy[0]}-{d.nucleoli_healthy[1]} -> "
               f"{d.nucleoli_infected[0]}-{d.nucleoli_infected[1]}, size "
               f"x{d.nucleoli_size_infected}")
  parts.append(f"actin ring integrity {d.ring_integrity}, stress fibres "
               f"x{d.fibres_infected}" + (f", {d.actin_patches} actin patches"
                                          if d.actin_patches else ""))
  parts.append(f"Golgi fragmented into {d.golgi_puncta} puncta" if d.golgi_puncta
               else f"Golgi swollen x{d.golgi_swelling}")
  parts.append(f"ER: {d.er_puncta} vesicles (DMVs)" if d.er_puncta
               else f"ER collapsed perinuclear (x{d.er_collapse})")
  if d.rna_foci:
    parts.append(f"{d.rna_foci} cytoplasmic RNA foci")
  return "; ".join(parts) + " (per infected cell, scaled by its strength)"


# --------------------------------------------------------------------------
# Cells.


def _torus_delta(d: np.ndarray, size: float) -> np.ndarray:
  return (d + size / 2) % size - size / 2


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
  dx = _torus_delta(x[:, None] - x[None, :], size)
  dy = _torus_delta(y[:, None] - y[None, :], size)
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


def _points_in(rng: np.random.Generator, cx, cy, a, b, theta, counts,
               spread: float):
  """`counts[i]` random points inside ellipse i (radius fraction <= spread)."""
  idx = np.repeat(np.arange(cx.size), counts)
  r = np.sqrt(rng.random(idx.size)) * spread
  ang = rng.uniform(0.0, 2 * np.pi, idx.size)
  u, v = r * np.cos(ang) * a[idx], r * np.sin(ang) * b[idx]
  c, s = np.cos(theta[idx]), np.sin(theta[idx])
  return idx, cx[idx] + u * c - v * s, cy[idx] + u * s + v * c


def _spots(size: int, x, y, sigma, amp, reach: float = 2.5) -> np.ndarray:
  """Gaussian spots (sigma in pixels, at least 0.35) splatted on a canvas."""
  if np.size(x) == 0:
    return np.zeros((size, size))
  sig = np.maximum(np.broadcast_to(np.asarray(sigma, np.float64), np.shape(x)),
                   0.35)
  rho2, flat = syn._window(size, np.asarray(x), np.asarray(y), sig, sig,  # pylint: disable=protected-access
                           np.zeros(np.size(x)), reach)
  return syn._splat(size, flat, np.exp(-0.5 * rho2)  # pylint: disable=protected-access
                    * np.asarray(amp, np.float64)[:, None, None])


def render_cells(rng: np.random.Generator, size: int, morph: syn.Morphology,
                 des: Design, cell_type: str, num_channels: int,
                 severity: float, toxicity: float,
                 effect: Sequence[float] = (1.0,) * 9
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
               * (1.0 - syn.TOXIC_DEATH * toxicity))
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
    ddx = _torus_delta(xi[None, :] - xi[:, None], size)
    ddy = _torus_delta(yi[None, :] - yi[:, None], size)
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
  offx = _torus_delta(x - x[group], size)
  offy = _torus_delta(y - y[group], size)
  bx = x[roots] + np.bincount(body_of, offx, nb) / counts
  by = y[roots] + np.bincount(body_of, offy, nb) / counts
  syncytial = counts[body_of] > 1
  cx_b, cy_b = bx[body_of], by[body_of]
  pull = 0.45
  ncx = np.where(syncytial, cx_b + pull * _torus_delta(ncx - cx_b, size), ncx)
  ncy = np.where(syncytial, cy_b + pull * _torus_delta(ncy - cy_b, size), ncy)
  body_r = np.sqrt(np.bincount(body_of, radius ** 2, nb))
  body_e = np.where(counts > 1, 1.1, elong[roots])
  body_t = theta[roots]
  body_s = np.bincount(body_of, strength, nb) / counts   # infection strength
  body_a, body_b = body_r * np.sqrt(body_e), body_r / np.sqrt(body_e)
  body_dying = dying[roots] & (counts == 1)
  bx, by = bx % size, by % size

  stain = rng.lognormal(0.0, 0.2, (num_channels, nb))   # per-cell staining
  s = body_s
  # Bodies: ER (w2), actin (w3), cytoplasmic RNA (w4), membrane (w5), mito (w6).
  for sel in (counts == 1, counts > 1):
    if not sel.any():
      continue
    u, v, flat = syn.window_uv(size, bx[sel], by[sel], body_a[sel],
                               body_b[sel], body_t[sel], reach=1.25)
    rho2 = u * u + v * v
    r = np.sqrt(rho2)
    disc = syn._soft_disc(rho2, 10.0)  # pylint: disable=protected-access
    ss = s[sel][:, None, None]
    st = stain[:, sel][:, :, None, None]
    k_er = 1.3 * (1.0 + ss * (des.er_collapse - 1.0))
    er = np.exp(-k_er * rho2) * disc * _AMP["er"] * bright[1]
    img[1] += syn._splat(size, flat, er * st[1])  # pylint: disable=protected-access
    phi = np.arctan2(v, u)
    phase = rng.uniform(0, 2 * np.pi, (int(sel.sum()), 1, 1))
    n_gaps = rng.integers(2, 5, (int(sel.sum()), 1, 1))
    gaps = 1.0 / (1.0 + np.exp(-6.0 * np.cos(n_gaps * phi + phase)))
    integrity = 1.0 - ss * (1.0 - des.ring_integrity) * gaps * 1.6
    ring = np.exp(-((r - 0.9) / 0.13) ** 2) * np.clip(integrity, 0.0, 1.0)
    fib_phase = rng.uniform(0, 2 * np.pi, (int(sel.sum()), 1, 1))
    fibres = disc * (0.5 + 0.5 * np.cos(3.0 * np.pi * v + fib_phase)) ** 4 \
        * np.exp(-(u / 0.75) ** 4) * (1.0 - ss * (1.0 - des.fibres_infected))
    actin = (ring * _AMP["actin_ring"] * bright[2] + fibres * _AMP["fibres"]
             + disc * _AMP["actin_diffuse"])
    img[2] += syn._splat(size, flat, actin * st[2])  # pylint: disable=protected-access
    rna = np.exp(-1.0 * rho2) * disc * _AMP["rna_cyto"]
    img[3] += syn._splat(size, flat, rna * st[3])  # pylint: disable=protected-access
    mem = np.exp(-((r - 1.0) / 0.08) ** 2) * _AMP["membrane"]
    img[4] += syn._splat(size, flat, mem * st[4])  # pylint: disable=protected-access
    if num_channels > 5:
      mito = np.exp(-0.9 * rho2) * disc * _AMP["mito"] * bright[5]
      img[5] += syn._splat(size, flat, mito * st[5])  # pylint: disable=protected-access
    del u, v, flat, rho2, r, disc, er, phi, gaps, ring, fibres, actin, rna, mem

  # Infection puncta: ER vesicles (w2), RNA foci (w4), Golgi fragments (w5),
  # actin patches (w3); their number scales with the infection strength.
  unit = scale
  for ch, count, amp, sigma, spread_ in (
      (1, des.er_puncta, _AMP["er_puncta"], 0.9, 0.7),
      (3, des.rna_foci, _AMP["rna_foci"], 0.8, 0.6),
      (4, des.golgi_puncta, _AMP["golgi_puncta"], 0.8, 0.85),
      (2, des.actin_patches, _AMP["actin_patch"], 1.0, 0.9)):
    if count <= 0:
      continue
    k = rng.poisson(count * s * np.maximum(counts, 1) ** 0.5)
    idx, px, py = _points_in(rng, bx, by, body_a, body_b, body_t, k, spread_)
    img[ch] += _spots(size, px % size, py % size, sigma * unit,
                      amp * stain[ch, idx] * (bright[ch] if ch != 3 else 1.0))
  if num_channels > 5:
    # Mitochondria are granular: a fixed-density punctate texture.
    k = rng.poisson(10 * counts)
    idx, px, py = _points_in(rng, bx, by, body_a, body_b, body_t, k, 0.8)
    img[5] += _spots(size, px % size, py % size, 0.8 * unit,
                     0.6 * _AMP["mito"] * stain[5, idx])

  # Nuclei (w1): dying ones condensed and bright.
  st_n = stain[:, body_of]
  na, nbx = rn * np.sqrt(e_n), rn / np.sqrt(e_n)
  rho2, flat = syn._window(size, ncx % size, ncy % size, na, nbx, theta,  # pylint: disable=protected-access
                           reach=1.4)
  nuc = syn._soft_disc(rho2, 7.0) * (_AMP["nucleus"] * (1.0 + 0.8 * dying)  # pylint: disable=protected-access
                                     * st_n[0] * bright[0])[:, None, None]
  img[0] += syn._splat(size, flat, nuc)  # pylint: disable=protected-access
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
  img[3] += _spots(size, (ncx[idx] + np.cos(ang) * dist) % size,
                   (ncy[idx] + np.sin(ang) * dist) % size,
                   0.2 * rn[idx] * size_f[idx],
                   _AMP["nucleoli"] * st_n[3, idx] * bright[3])

  # Golgi (w5): a compact perinuclear ribbon per nucleus; on infection it
  # fades as it fragments (puncta above) or swells.
  gang = rng.uniform(0.0, 2 * np.pi, n)
  gd = rn * 1.3
  gr = rn * 0.55 * (1.0 + s_c * (des.golgi_swelling - 1.0))
  fade = 1.0 - s_c * (0.8 if des.golgi_puncta > 0 else 0.3)
  gx, gy = (ncx + np.cos(gang) * gd) % size, (ncy + np.sin(gang) * gd) % size
  rho2, flat = syn._window(size, gx, gy, np.maximum(gr, 0.4),  # pylint: disable=protected-access
                           np.maximum(gr * 0.7, 0.4), gang, reach=2.5)
  g_amp = _AMP["golgi"] * fade * st_n[4] * bright[4] * (1 - 0.7 * dying)
  img[4] += syn._splat(size, flat, np.exp(-rho2) * g_amp[:, None, None])  # pylint: disable=protected-access
  return img, dict(n_cells=int(n), infected_fraction=float(infected.mean()))


# --------------------------------------------------------------------------
# Site-level nuisances and intensity matching.


def _smooth_field(rng: np.random.Generator, size: int,
                  cycles: int = 3) -> np.ndarray:
  """A smooth periodic random field, zero mean, unit sd: random Fourier
  modes up to `cycles` per field (Gaussian-weighted), the same structure at
  every `size`."""
  k = cycles
  coef = (rng.standard_normal((2 * k + 1, k + 1))
          + 1j * rng.standard_normal((2 * k + 1, k + 1)))
  fy = np.r_[0:k + 1, -k:0]
  fx = np.arange(k + 1)
  coef *= np.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (0.5 * k * k))
  spec = np.zeros((size, size // 2 + 1), complex)
  spec[fy[:, None] % size, fx[None, :]] = coef
  f = np.fft.irfft2(spec, s=(size, size))
  return (f - f.mean()) / (f.std() + 1e-12)


def _nuisance(rng: np.random.Generator, img: np.ndarray, des: Design,
              size: int) -> np.ndarray:
  """Out-of-focus haze and focus blur (site-level, class-independent)."""
  scale = size / des.field
  out = np.empty_like(img)
  blur = rng.uniform(0.0, des.blur_max) * scale
  for c in range(img.shape[0]):
    peak = float(np.percentile(img[c], 99.5)) + 1e-6
    haze = des.haze * peak * (1.5 + 0.5 * _smooth_field(rng, size))
    x = img[c] + haze
    out[c] = ndimage.gaussian_filter(x, blur, mode="wrap") if blur > 0.05 else x
  # Tie-breaking dither far below one grey level of any target.
  out += rng.random(out.shape) * 1e-6
  return out


def match_histogram(img: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
  """Each channel takes the target's values at its pixels' ranks.

  img: (C, H, W); quantiles: (C, G) increasing target quantile functions at G
  equally spaced probabilities 0..1. Returns float (C, H, W) whose sorted
  values are the target's quantiles at (rank + 0.5) / (H W).
  """
  c_, h, w = img.shape
  n = h * w
  p = (np.arange(n) + 0.5) / n
  grid = np.linspace(0.0, 1.0, quantiles.shape[1])
  out = np.empty((c_, n))
  for c in range(c_):
    order = np.argsort(img[c].ravel(), kind="stable")
    out[c, order] = np.interp(p, grid, quantiles[c])
  return out.reshape(c_, h, w)


def site_target(rng: np.random.Generator, reference: np.ndarray,
                des: Design) -> np.ndarray:
  """The reference quantile functions warped by a per-site gain and gamma."""
  lo = reference[:, :1]
  span = np.maximum(reference[:, -1:] - lo, 1e-6)
  t = (reference - lo) / span
  c_ = reference.shape[0]
  gain = rng.lognormal(0.0, des.target_gain_sd, (c_, 1))
  gamma = rng.lognormal(0.0, des.target_gamma_sd, (c_, 1))
  return lo * gain + span * gain * t ** gamma


@functools.lru_cache(maxsize=16)
def reference_quantiles(difficulty: str, cell_types: Tuple[str, ...],
                        size: int, num_channels: int, seed: int) -> np.ndarray:
  """(C, QUANTILE_GRID) average quantile functions of reference sites.

  The reference mixes every cell type of the dataset, healthy and infected
  (untreated Active severity), equally: the one target all sites are matched
  to (before the per-site warp), so it carries no class. Levels are set so
  that the median site resembles the easy mode's dynamic range.
  """
  des = design(difficulty)
  grid = np.linspace(0.0, 1.0, QUANTILE_GRID)
  acc = np.zeros((num_channels, QUANTILE_GRID))
  k = 0
  for i, ct in enumerate(cell_types):
    for j, sev in enumerate((0.0, syn.ACTIVE_SEVERITY)):
      for r in range(_REFERENCE_SITES):
        rng = np.random.default_rng([seed, 29, i, j, r])
        img, _ = render_cells(rng, size, syn.MORPHOLOGY[ct], des, ct,
                              num_channels, sev, 0.0)
        img = _nuisance(rng, img, des, size)
        acc += np.quantile(img.reshape(num_channels, -1), grid, axis=1).T
        k += 1
  q = acc / k
  # Scale each channel to easy-mode-like 8-bit levels: the minimum at
  # `synthetic._BACKGROUND`, the second-highest grid point (the 99.6th
  # percentile) at 150.
  lo, hi = q[:, :1], q[:, -2:-1]
  return syn._BACKGROUND + (q - lo) / np.maximum(hi - lo, 1e-9) * 150.0  # pylint: disable=protected-access


def vignetting(size: int, strength: float, cx: float, cy: float) -> np.ndarray:
  """Multiplicative illumination falloff: 1 - strength * (r / r_corner)^2."""
  yy, xx = np.mgrid[0:size, 0:size]
  r2 = ((xx + 0.5) / size - cx) ** 2 + ((yy + 0.5) / size - cy) ** 2
  return 1.0 - strength * r2 / 0.5


def render_site(spec, size: int, num_channels: int, seed: int,
                difficulty: str, cell_types: Tuple[str, ...]
                ) -> Tuple[np.ndarray, dict]:
  """Renders one hard-mode site deterministically from (seed, spec.index).

  Two random streams: one for the cells (its draws depend on the class) and
  one for the site's nuisances and intensity target (never on the class).
  """
  des = design(difficulty)
  rng = np.random.default_rng([seed, 7, spec.index])
  nuis = np.random.default_rng([seed, 31, spec.index])
  sev = 0.0
  if spec.severity > 0:
    sev = float(np.clip(rng.normal(spec.severity, syn.ACTIVE_SEVERITY_SD), 0.0, 1.0))
  img, truth = render_cells(rng, size, syn.MORPHOLOGY[spec.cell_type], des,
                            spec.cell_type, num_channels, sev, spec.toxicity,
                            spec.effect)
  img = _nuisance(nuis, img, des, size)
  # Vignetting before matching: it shades where cells are (a spatial plate
  # effect) without making the intensity histogram depend on where the
  # bright pixels lie, i.e. on the class.
  strength, vx, vy = spec.vignetting
  if strength > 0:
    img = img * vignetting(size, strength, vx, vy)[None]
  ref = reference_quantiles(difficulty, tuple(cell_types), size, num_channels,
                            seed)
  img = match_histogram(img, site_target(nuis, ref, des))
  truth.update(severity=sev, toxicity=spec.toxicity)
  return syn.apply_plate(nuis, img.astype(np.float32), spec.gain, spec.offset), truth


def plate_effects(seed: int, key: int, num_channels: int, difficulty: str):
  """Per-plate gain, offset (per channel) and vignetting (strength, centre)."""
  des = design(difficulty)
  rng = np.random.default_rng([seed, 37, key])
  gain = np.exp(rng.normal(0.0, des.plate_gain_sd, num_channels))
  offset = rng.normal(des.plate_offset[0], des.plate_offset[1], num_channels)
  vig = (float(rng.uniform(*des.plate_vignetting)),
         float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
  return (tuple(float(g) for g in gain), tuple(float(o) for o in offset), vig)
