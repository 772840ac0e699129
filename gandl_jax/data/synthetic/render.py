"""The synthetic renderer: one site of a design, deterministic in (seed,
site index), as uint8 (C, H, W).

`render_site` draws the cells with the design's cell model (`cells.py`),
then:

* intensity designs ("easy"): plate gain and offset, shot and read noise,
  8-bit quantization (`apply_plate`);
* morphology designs ("hard", "hard2"): the site's spatial nuisances (focus
  blur and out-of-focus haze, the plate's vignetting), then every channel's
  site-level intensity distribution is replaced by a class-independent
  target (exact histogram matching: each pixel keeps its rank and takes the
  target's value at that rank). The target is the average quantile function
  of reference sites that mix all classes, warped per site by a random gain
  and gamma drawn from one shared distribution, so only where the bright
  pixels are carries the biology. Then `apply_plate` as above. The cells
  and the nuisances draw from two random streams, so the nuisances never
  depend on the class.

Each site has its own random streams, so the output does not depend on the
worker count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from gandl_jax import schema
from gandl_jax.data.synthetic import cells
from gandl_jax.data.synthetic import designs

QUANTILE_GRID = 257           # points of the target quantile functions
_REFERENCE_SITES = 4          # reference sites per (cell type, condition)


@dataclasses.dataclass(frozen=True)
class SiteSpec:
  """Everything needed to render and file one site."""
  index: int                 # global site index (seeds the random stream)
  relpaths: Tuple[str, ...]  # one per channel, below images/
  cell_type: str
  severity: float            # mean infected fraction (0 = healthy)
  toxicity: float            # 0..1
  gain: Tuple[float, ...]    # plate gain per channel
  offset: Tuple[float, ...]  # plate background offset per channel
  effect: Tuple[float, ...] = (1.0, 1.0, 1.0) + (1.0,) * 6  # RxRx1 siRNA: radius, nucleus, occupancy, brightness x6
  vignetting: Tuple[float, float, float] = (0.0, 0.5, 0.5)  # strength, centre x, y (0: none)


def apply_plate(rng: np.random.Generator, img: np.ndarray, gain: Sequence[float],
                offset: Sequence[float]) -> np.ndarray:
  """Plate gain/offset, shot + read noise, 8-bit quantization: uint8 (C, H, W)."""
  g = np.asarray(gain, np.float32)[:, None, None]
  o = np.asarray(offset, np.float32)[:, None, None]
  x = img * g + o
  x += np.sqrt(np.maximum(2.0 + 0.3 * x, 0.0)) * rng.standard_normal(x.shape, np.float32)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def plate_effects(seed: int, key: int, num_channels: int, difficulty: str):
  """Per-plate gain, offset (per channel) and vignetting (strength, centre)
  of the design `difficulty`."""
  des = designs.design(difficulty)
  rng = np.random.default_rng([seed, des.plate_stream, key])
  gain = np.exp(rng.normal(0.0, des.plate_gain_sd, num_channels))
  offset = rng.normal(des.plate_offset[0], des.plate_offset[1], num_channels)
  vig = (0.0, 0.5, 0.5)
  if des.plate_vignetting[1] > 0:
    vig = (float(rng.uniform(*des.plate_vignetting)),
           float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
  return (tuple(float(g) for g in gain), tuple(float(o) for o in offset), vig)


def vignetting(size: int, strength: float, cx: float, cy: float) -> np.ndarray:
  """Multiplicative illumination falloff: 1 - strength * (r / r_corner)^2."""
  yy, xx = np.mgrid[0:size, 0:size]
  r2 = ((xx + 0.5) / size - cx) ** 2 + ((yy + 0.5) / size - cy) ** 2
  return 1.0 - strength * r2 / 0.5


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


def _nuisance(rng: np.random.Generator, img: np.ndarray,
              des: designs.MorphologyDesign, size: int) -> np.ndarray:
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
                des: designs.MorphologyDesign) -> np.ndarray:
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
  that the median site resembles the intensity design's dynamic range.
  """
  des = designs.design(difficulty)
  grid = np.linspace(0.0, 1.0, QUANTILE_GRID)
  acc = np.zeros((num_channels, QUANTILE_GRID))
  k = 0
  for i, ct in enumerate(cell_types):
    for j, sev in enumerate((0.0, designs.ACTIVE_SEVERITY)):
      for r in range(_REFERENCE_SITES):
        rng = np.random.default_rng([seed, 29, i, j, r])
        img, _ = cells.morphology_cells(rng, size, designs.MORPHOLOGY[ct], des,
                                        ct, num_channels, sev, 0.0)
        img = _nuisance(rng, img, des, size)
        acc += np.quantile(img.reshape(num_channels, -1), grid, axis=1).T
        k += 1
  q = acc / k
  # Scale each channel to easy-mode-like 8-bit levels: the minimum at
  # `cells.BACKGROUND`, the second-highest grid point (the 99.6th percentile)
  # at 150.
  lo, hi = q[:, :1], q[:, -2:-1]
  return cells.BACKGROUND + (q - lo) / np.maximum(hi - lo, 1e-9) * 150.0


def render_site(spec: SiteSpec, size: int, num_channels: int, seed: int,
                difficulty: str = "easy",
                cell_types: Optional[Sequence[str]] = None,
                ) -> Tuple[np.ndarray, dict]:
  """Renders one site deterministically from (seed, spec.index): uint8
  (C, size, size) and the site's truth (cells, infected fraction, severity,
  toxicity).

  `difficulty` names the design (`designs.DESIGNS`). A morphology design's
  intensity target mixes `cell_types` (default: the cell types of the
  dataset `spec.cell_type` belongs to).
  """
  des = designs.design(difficulty)
  rng = np.random.default_rng([seed, 7, spec.index])
  sev = 0.0
  if spec.severity > 0:
    sev = float(np.clip(rng.normal(spec.severity, designs.ACTIVE_SEVERITY_SD),
                        0.0, 1.0))
  morph = designs.MORPHOLOGY[spec.cell_type]
  if des.cells == "intensity":
    img, truth = cells.intensity_cells(rng, size, morph, des, num_channels,
                                       sev, spec.toxicity, spec.effect)
    truth.update(severity=sev, toxicity=spec.toxicity)
    return apply_plate(rng, img, spec.gain, spec.offset), truth
  if cell_types is None:
    cell_types = (schema.RXRX19A_CELL_TYPES
                  if spec.cell_type in schema.RXRX19A_CELL_TYPES
                  else schema.RXRX1_CELL_TYPES)
  nuis = np.random.default_rng([seed, 31, spec.index])
  img, truth = cells.morphology_cells(rng, size, morph, des, spec.cell_type,
                                      num_channels, sev, spec.toxicity,
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
  return apply_plate(nuis, img.astype(np.float32), spec.gain, spec.offset), truth
