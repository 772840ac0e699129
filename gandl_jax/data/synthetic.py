"""A synthetic RxRx19a / RxRx1 in the public layout, with planted, known biology.

The real datasets cannot be downloaded here, so this module renders cells into
the same tree the converter reads::

  ROOT/metadata.csv                   exact public columns and vocabularies
  ROOT/images/{experiment}/Plate{N}/{well}_s{site}_w{channel}.png
  ROOT/synthetic_truth.csv            planted parameters (long format)
  ROOT/synthetic_sites.csv            per-site truth (cells, infection, toxicity)

Cells are drawn as soft ellipses on a jittered hexagonal lattice (on a torus,
so no edge effects): nucleus (w1), ER around the nucleus (w2), cortical actin
ring (w3), nucleoli plus cytoplasmic RNA (w4), Golgi spot plus plasma
membrane (w5) and, for RxRx1, granular mitochondria (w6). Planted effects:

* cell type: size, elongation, density and stain brightness differ (HRCE vs
  VERO; HEPG2 / HUVEC / RPE / U2OS);
* infection: in `Active SARS-CoV-2` sites a per-site fraction of the cells is
  infected (rounded, smaller, bright cytoplasmic RNA, enlarged nucleoli,
  disrupted actin, dispersed Golgi) and some cells die; `Mock`, `UV
  Inactivated SARS-CoV-2` and empty-condition sites are healthy;
* compounds: rescuers reduce the infection severity along a Hill curve with a
  known EC50; toxic compounds kill cells and condense nuclei at high dose
  (another Hill curve); the rest do nothing;
* plates: per-plate, per-channel gain and background offset (batch effects
  that plate-wise normalization must remove).

Sizes are defined for a 256x256 field and scale with `size`, so a 64x64 site
is the same field of view at a lower resolution. Rendering is vectorized
(all cells of a site at once, scatter-add with `np.bincount`) and each site has
its own random stream, so the output does not depend on the worker count.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import multiprocessing
import os
import string
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from gandl_jax import io as gio
from gandl_jax import schema

DATASET_DIRS = {"rxrx19a": "RxRx19a", "rxrx1": "RxRx1"}
# "easy": the planted biology shows in per-channel intensities; the others are
# the morphology-only designs of `synthetic_hard.DESIGNS`.
DIFFICULTIES = ("easy", "hard", "hard2")
SITES_FILE = "synthetic_sites.csv"
TRUTH_COLUMNS = ("kind", "name", "cell_type", "experiment", "plate", "channel",
                 "parameter", "value", "description")
SITES_COLUMNS = ("site_id", "n_cells", "infected_fraction", "severity",
                 "toxicity")

# Six half-log doses in uM, as in the RxRx19a HRCE screen.
CONCENTRATIONS: Tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ACTIVE_SEVERITY = 0.8        # mean infected fraction of an untreated Active site
ACTIVE_SEVERITY_SD = 0.08    # per-site variability
INFECTION_DEATH = 0.35       # fraction of cells lost at severity 1
TOXIC_DEATH = 0.7            # fraction of cells lost at toxicity 1


@dataclasses.dataclass(frozen=True)
class Compound:
  name: str
  role: str                  # "rescue", "toxic" or "inert"
  ec50: float = math.nan     # uM, rescue
  hill: float = 1.0
  efficacy: float = 0.0      # fraction of the infection phenotype removed at saturation
  tc50: float = math.nan     # uM, toxicity
  smiles: str = ""

  def rescue(self, conc: float) -> float:
    """Fraction of the infection phenotype removed at `conc` uM."""
    if self.role != "rescue" or not conc > 0:
      return 0.0
    return self.efficacy * conc**self.hill / (conc**self.hill + self.ec50**self.hill)

  def toxicity(self, conc: float) -> float:
    """Fraction of maximal toxicity at `conc` uM."""
    if self.role != "toxic" or not conc > 0:
      return 0.0
    return conc**self.hill / (conc**self.hill + self.tc50**self.hill)


# Names are real compounds from the RxRx19a screen; the effects are synthetic.
# SMILES are given only where they are unambiguous without stereochemistry.
COMPOUNDS: Tuple[Compound, ...] = (
    Compound("Remdesivir (GS-5734)", "rescue", ec50=0.5, hill=1.5, efficacy=0.95),
    Compound("GS-441524", "rescue", ec50=1.5, hill=1.2, efficacy=0.9),
    Compound("Aloxistatin", "rescue", ec50=3.0, hill=1.0, efficacy=0.7),
    Compound("Bortezomib", "toxic", hill=2.0, tc50=1.0),
    Compound("Digoxin", "toxic", hill=2.0, tc50=3.0),
    Compound("Hydroxychloroquine Sulfate", "inert",
             smiles="CCN(CCO)CCCC(C)Nc1ccnc2cc(Cl)ccc12.OS(=O)(=O)O"),
    Compound("Chloroquine", "inert", smiles="CCN(CC)CCCC(C)Nc1ccnc2cc(Cl)ccc12"),
    Compound("Favipiravir", "inert", smiles="NC(=O)c1nc(F)c[nH]c1=O"),
    Compound("Lopinavir", "inert"),
    Compound("Ribavirin", "inert"),
    Compound("Dexamethasone", "inert"),
)


@dataclasses.dataclass(frozen=True)
class Morphology:
  """Cell-type appearance, lengths in pixels of a 256x256 field."""
  cell_radius: float
  elongation: float          # mean major/minor axis ratio of the cell
  elongation_sd: float
  nucleus_radius: float
  spacing: float             # hexagonal lattice spacing
  occupancy: float           # fraction of lattice points holding a cell
  brightness: Tuple[float, ...]   # per channel w1..w6


MORPHOLOGY: Dict[str, Morphology] = {
    # RxRx19a: HRCE small, rounder, dense epithelial; VERO large, elongated, sparse.
    "HRCE": Morphology(9.0, 1.25, 0.10, 4.0, 17.0, 0.85,
                       (1.0, 0.8, 0.7, 0.8, 0.7, 0.8)),
    "VERO": Morphology(13.0, 1.9, 0.30, 5.2, 25.0, 0.75,
                       (0.85, 1.1, 1.0, 0.6, 0.9, 0.8)),
    # RxRx1.
    "HEPG2": Morphology(7.0, 1.15, 0.08, 4.2, 13.0, 0.70,
                        (1.2, 0.9, 0.6, 0.9, 0.8, 0.9)),
    "HUVEC": Morphology(12.0, 2.4, 0.35, 4.5, 21.0, 0.80,
                        (0.9, 1.0, 1.1, 0.7, 1.0, 0.8)),
    "RPE": Morphology(14.0, 1.3, 0.12, 5.0, 26.0, 0.90,
                      (0.8, 1.0, 0.9, 0.8, 0.7, 1.0)),
    "U2OS": Morphology(16.0, 1.6, 0.25, 6.0, 30.0, 0.70,
                       (1.0, 0.8, 0.8, 1.0, 0.9, 1.3)),
}

# Peak intensities (8-bit levels) of the cell compartments before plate gain.
_AMP = dict(nucleus=120.0, er=55.0, actin_ring=75.0, actin_diffuse=22.0,
            rna_cyto=20.0, nucleoli=80.0, golgi=95.0, membrane=30.0, mito=65.0)
_BACKGROUND = 8.0


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
  vignetting: Tuple[float, float, float] = (0.0, 0.5, 0.5)  # hard modes: strength, centre x, y


def _hill_rows(c: Compound) -> List[dict]:
  rows = [dict(kind="compound", name=c.name, parameter="role", value=c.role,
               description="rescue: reverses the infection phenotype; toxic: "
               "kills cells / condenses nuclei; inert: no effect")]
  if c.role == "rescue":
    rows += [
        dict(kind="compound", name=c.name, parameter="ec50_uM", value=c.ec50,
             description="concentration of half-maximal rescue"),
        dict(kind="compound", name=c.name, parameter="hill", value=c.hill,
             description="Hill coefficient"),
        dict(kind="compound", name=c.name, parameter="efficacy", value=c.efficacy,
             description="fraction of the infection phenotype removed at "
             "saturating dose: severity = base * (1 - efficacy * c^h / "
             "(c^h + EC50^h))"),
    ]
  elif c.role == "toxic":
    rows += [
        dict(kind="compound", name=c.name, parameter="tc50_uM", value=c.tc50,
             description="concentration of half-maximal toxicity"),
        dict(kind="compound", name=c.name, parameter="hill", value=c.hill,
             description="Hill coefficient of toxicity"),
    ]
  return rows


# --------------------------------------------------------------------------
# Rendering (pure numpy).


def _lattice(rng: np.random.Generator, spacing: float, size: int,
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


def _window(size: int, cx: np.ndarray, cy: np.ndarray, a: np.ndarray,
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


def _splat(size: int, flat: np.ndarray, values: np.ndarray) -> np.ndarray:
  return np.bincount(flat.ravel(), weights=values.ravel().astype(np.float64),
                     minlength=size * size).reshape(size, size)


def _soft_disc(rho2: np.ndarray, sharpness: float = 8.0) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(np.minimum((np.sqrt(rho2) - 1.0) * sharpness, 60.0)))


def render_cells(rng: np.random.Generator, size: int, morph: Morphology,
                 num_channels: int, severity: float, toxicity: float,
                 effect: Sequence[float] = (1.0,) * 9) -> Tuple[np.ndarray, dict]:
  """Renders one field of cells: float32 (C, size, size) intensities >= 0.

  `severity` is the probability that a cell is infected, `toxicity` in [0, 1]
  the compound toxicity; `effect` scales (cell radius, nucleus radius,
  occupancy, brightness w1..w6) for RxRx1 siRNAs. Returns the image and a dict
  of per-site truth (cell count, infected fraction).
  """
  scale = size / 256.0
  occupancy = morph.occupancy * effect[2] * (1.0 - INFECTION_DEATH * severity) \
      * (1.0 - TOXIC_DEATH * toxicity)
  cx, cy = _lattice(rng, morph.spacing * scale, size, min(occupancy, 1.0))
  n = cx.size
  img = np.zeros((num_channels, size, size), np.float64)
  bright = np.asarray(morph.brightness[:num_channels]) * np.asarray(effect[3:3 + num_channels])
  if n == 0:
    return (img + _BACKGROUND).astype(np.float32), dict(n_cells=0, infected_fraction=0.0)

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

  rho2, flat = _window(size, cx, cy, a, b, theta, reach=1.25)
  disc = _soft_disc(rho2, 10.0)
  # w2: ER, brightest near the nucleus.
  er = np.exp(-1.3 * rho2) * disc
  img[1] += _splat(size, flat, er * (_AMP["er"] * jitter[1])[:, None, None])
  # w3: cortical actin ring; infection disrupts it into diffuse actin.
  ring = np.exp(-((np.sqrt(rho2) - 0.92) / 0.13) ** 2)
  ring_amp = _AMP["actin_ring"] * (1.0 - 0.55 * inf)
  diffuse_amp = _AMP["actin_diffuse"] * (1.0 + 1.5 * inf)
  img[2] += _splat(size, flat, ring * ring_amp[:, None, None] * jitter[2][:, None, None]
                   + disc * (diffuse_amp * jitter[2])[:, None, None])
  # w4: cytoplasmic RNA, strongly up in infected cells (viral replication).
  rna_amp = _AMP["rna_cyto"] * (1.0 + 3.0 * inf) * jitter[3]
  img[3] += _splat(size, flat, np.exp(-1.0 * rho2) * disc * rna_amp[:, None, None])
  # w5: plasma membrane (thin ring).
  mem = np.exp(-((np.sqrt(rho2) - 1.0) / 0.08) ** 2)
  img[4] += _splat(size, flat, mem * (_AMP["membrane"] * jitter[4])[:, None, None])
  if num_channels > 5:
    # w6: mitochondria, perinuclear and granular (texture added below).
    img[5] += _splat(size, flat, np.exp(-0.9 * rho2) * disc
                     * (_AMP["mito"] * jitter[5])[:, None, None])
  del rho2, flat, disc, er, ring, mem

  # w1: nucleus; dying cells have small, bright (condensed) nuclei.
  e_n = 1.0 + 0.4 * (elong - 1.0)
  rn = morph.nucleus_radius * scale * effect[1] * rng.lognormal(0.0, 0.1, n)
  rn *= 1.0 - 0.35 * dy_
  na, nb = rn * np.sqrt(e_n), rn / np.sqrt(e_n)
  ncx = cx + rng.normal(0.0, 0.1, n) * radius
  ncy = cy + rng.normal(0.0, 0.1, n) * radius
  rho2, flat = _window(size, ncx, ncy, na, nb, theta, reach=1.4)
  nuc_amp = _AMP["nucleus"] * (1.0 + 0.8 * dy_) * jitter[0]
  img[0] += _splat(size, flat, _soft_disc(rho2, 7.0) * nuc_amp[:, None, None])

  # w4: nucleoli, 2-3 per nucleus, enlarged and brighter on infection.
  k = 3
  ang = rng.uniform(0.0, 2 * np.pi, (n, k))
  dist = np.sqrt(rng.random((n, k))) * 0.5
  present = rng.random((n, k)) < np.array([1.0, 1.0, 0.5])
  ox = (np.cos(ang) * dist * rn[:, None]).ravel()
  oy = (np.sin(ang) * dist * rn[:, None]).ravel()
  sig = (0.2 * rn[:, None] * (1.0 + 0.5 * inf[:, None]) * np.ones((1, k))).ravel()
  sig = np.maximum(sig, 0.35)
  rho2, flat = _window(size, np.repeat(ncx, k) + ox, np.repeat(ncy, k) + oy,
                       sig, sig, np.zeros(n * k), reach=2.5)
  nl_amp = (_AMP["nucleoli"] * (1.0 + 0.4 * inf)[:, None] * jitter[3][:, None]
            * present).ravel()
  img[3] += _splat(size, flat, np.exp(-0.5 * rho2) * nl_amp[:, None, None])

  # w5: Golgi, a perinuclear spot; dispersed (larger, dimmer) on infection.
  gang = rng.uniform(0.0, 2 * np.pi, n)
  gd = rn * 1.2
  gr = np.maximum(rn * 0.55 * (1.0 + 0.8 * inf), 0.4)
  rho2, flat = _window(size, ncx + np.cos(gang) * gd, ncy + np.sin(gang) * gd,
                       gr, gr * 0.7, gang, reach=2.5)
  g_amp = _AMP["golgi"] * (1.0 - 0.5 * inf) * jitter[4]
  img[4] += _splat(size, flat, np.exp(-0.5 * rho2 * 2.0) * g_amp[:, None, None])

  img *= bright[:, None, None]
  if num_channels > 5:
    img[5] *= rng.uniform(0.4, 1.6, (size, size))
  img += _BACKGROUND
  return img.astype(np.float32), dict(n_cells=int(n),
                                      infected_fraction=float(inf.mean()))


def apply_plate(rng: np.random.Generator, img: np.ndarray, gain: Sequence[float],
                offset: Sequence[float]) -> np.ndarray:
  """Plate gain/offset, shot + read noise, 8-bit quantization: uint8 (C, H, W)."""
  g = np.asarray(gain, np.float32)[:, None, None]
  o = np.asarray(offset, np.float32)[:, None, None]
  x = img * g + o
  x += np.sqrt(np.maximum(2.0 + 0.3 * x, 0.0)) * rng.standard_normal(x.shape, np.float32)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def render_site(spec: SiteSpec, size: int, num_channels: int, seed: int,
                difficulty: str = "easy",
                cell_types: Optional[Sequence[str]] = None,
                ) -> Tuple[np.ndarray, dict]:
  """Renders one site deterministically from (seed, spec.index).

  `difficulty`: "easy", or a design of `synthetic_hard.DESIGNS` ("hard",
  "hard2"), whose intensity target mixes `cell_types` (default: the cell
  types of the dataset `spec.cell_type` belongs to).
  """
  if difficulty != "easy":
    from gandl_jax.data import synthetic_hard  # pylint: disable=import-outside-toplevel
    if cell_types is None:
      cell_types = (schema.RXRX19A_CELL_TYPES
                    if spec.cell_type in schema.RXRX19A_CELL_TYPES
                    else schema.RXRX1_CELL_TYPES)
    return synthetic_hard.render_site(spec, size, num_channels, seed,
                                      difficulty, tuple(cell_types))
  rng = np.random.default_rng([seed, 7, spec.index])
  sev = 0.0
  if spec.severity > 0:
    sev = float(np.clip(rng.normal(spec.severity, ACTIVE_SEVERITY_SD), 0.0, 1.0))
  img, truth = render_cells(rng, size, MORPHOLOGY[spec.cell_type], num_channels,
                            sev, spec.toxicity, spec.effect)
  truth.update(severity=sev, toxicity=spec.toxicity)
  return apply_plate(rng, img, spec.gain, spec.offset), truth


# --------------------------------------------------------------------------
# Plate layouts and metadata.


def _row_names(n: int) -> List[str]:
  """A..Z then AA, AB, ... (1536-well plates have 32 rows, A..AF)."""
  letters = string.ascii_uppercase
  out = list(letters[:n])
  out += ["A" + c for c in letters[:max(0, n - 26)]]
  return out[:n]


def _wells(rows: int, cols: int, count: int) -> List[str]:
  """`count` interior wells (no edge rows/columns), evenly spread."""
  names = _row_names(rows)
  interior = [f"{r}{c:02d}" for r in names[1:-1] for c in range(2, cols)]
  if count > len(interior):
    raise ValueError(f"wells_per_plate={count} exceeds the {len(interior)} "
                     f"interior wells of a {rows}x{cols} plate")
  idx = np.linspace(0, len(interior) - 1, count).round().astype(int)
  return [interior[i] for i in idx]


def _plate_effects(seed: int, key: int, num_channels: int,
                   difficulty: str = "easy"):
  """(gain, offset, vignetting) of one plate."""
  if difficulty != "easy":
    from gandl_jax.data import synthetic_hard  # pylint: disable=import-outside-toplevel
    return synthetic_hard.plate_effects(seed, key, num_channels, difficulty)
  rng = np.random.default_rng([seed, 11, key])
  gain = np.exp(rng.normal(0.0, 0.18, num_channels))
  offset = rng.normal(6.0, 4.0, num_channels)
  return (tuple(float(g) for g in gain), tuple(float(o) for o in offset),
          (0.0, 0.5, 0.5))


def _plate_rows(exp: str, plate: int, gain, offset, vig) -> List[dict]:
  rows = []
  for c in range(len(gain)):
    for par, val in (("gain", gain[c]), ("offset", offset[c])):
      rows.append(dict(kind="plate", experiment=exp, plate=plate,
                       channel=c + 1, parameter=par, value=round(val, 4),
                       description="pixel = gain * signal + offset"))
  if vig[0] > 0:
    for par, val in zip(("vignetting", "vignetting_x", "vignetting_y"), vig):
      rows.append(dict(kind="plate", experiment=exp, plate=plate, parameter=par,
                       value=round(val, 4), description="signal x (1 - strength "
                       "* r^2 / 0.5), r: distance from (x, y), fractions of "
                       "the field"))
  return rows


def _plate_list(plates: Union[None, int, Sequence[int]], default: int) -> List[int]:
  if plates is None:
    return list(range(1, default + 1))
  if isinstance(plates, (int, np.integer)):
    if plates < 1:
      raise ValueError(f"plates must be >= 1, got {plates}")
    return list(range(1, int(plates) + 1))
  out = [int(p) for p in plates]
  if not out or min(out) < 1:
    raise ValueError(f"plates must be positive plate numbers, got {plates}")
  return out


def _rxrx19a_layout(plates, wells_per_plate, seed, difficulty="easy"):
  """Metadata rows, site specs and truth rows for RxRx19a."""
  nch = 5
  rows, specs, truth = [], [], []
  by_name = {c.name: c for c in COMPOUNDS}
  combos = [(c.name, conc) for c in COMPOUNDS for conc in CONCENTRATIONS]
  n_mock, n_uv, n_active, n_empty = 4, 4, 6, 1
  n_controls = n_mock + n_uv + n_active + n_empty
  if wells_per_plate < n_controls + 1:
    raise ValueError(f"wells_per_plate must be >= {n_controls + 1} "
                     f"({n_controls} control wells per plate), got {wells_per_plate}")
  wells = _wells(32, 48, wells_per_plate)
  index = 0
  for e, exp in enumerate(schema.RXRX19A_EXPERIMENTS):
    cell_type = exp.split("-")[0]
    order = np.random.default_rng([seed, 13, e]).permutation(len(combos))
    queue = [combos[i] for i in order]
    q = 0
    for p_i, plate in enumerate(plates):
      gain, offset, vig = _plate_effects(seed, e * 1000 + plate, nch, difficulty)
      truth += _plate_rows(exp, plate, gain, offset, vig)
      # Well roles on this plate, shuffled over the layout.
      roles = ([("Mock", None)] * n_mock + [("UV", None)] * n_uv
               + [("Active", None)] * n_active
               + [("Empty", None)] * (n_empty if p_i == 0 else 0))
      while len(roles) < wells_per_plate:
        roles.append(("Active", queue[q % len(queue)]))
        q += 1
      perm = np.random.default_rng([seed, 17, e, plate]).permutation(len(roles))
      for w_i, well in enumerate(wells):
        cond, treat = roles[perm[w_i]]
        disease = {"Mock": schema.MOCK, "UV": schema.UV_INACTIVATED,
                   "Active": schema.ACTIVE, "Empty": ""}[cond]
        severity = ACTIVE_SEVERITY if cond == "Active" else 0.0
        toxicity = 0.0
        name, conc, smiles = "", "", ""
        if treat is not None:
          comp = by_name[treat[0]]
          name, conc, smiles = comp.name, treat[1], comp.smiles
          severity *= 1.0 - comp.rescue(conc)
          toxicity = comp.toxicity(conc)
        for site in schema.RXRX19A_SITES:
          rows.append({
              "site_id": schema.site_id(exp, plate, well, site),
              "well_id": schema.well_id(exp, plate, well),
              "cell_type": cell_type, "experiment": exp, "plate": plate,
              "well": well, "site": site, "disease_condition": disease,
              "treatment": name, "treatment_conc": conc, "SMILES": smiles,
          })
          specs.append(SiteSpec(
              index=index,
              relpaths=tuple(schema.image_relpath(exp, plate, well, site, ch)
                             for ch in range(1, nch + 1)),
              cell_type=cell_type, severity=severity, toxicity=toxicity,
              gain=gain, offset=offset, vignetting=vig))
          index += 1
  for c in COMPOUNDS:
    truth += _hill_rows(c)
  truth += [
      dict(kind="infection", name=schema.ACTIVE, parameter="severity",
           value=ACTIVE_SEVERITY, description="mean fraction of infected cells "
           "in an untreated Active site (per-site sd "
           f"{ACTIVE_SEVERITY_SD}); Mock, UV Inactivated and empty: 0"),
      _phenotype_row(difficulty),
      dict(kind="infection", name=schema.ACTIVE, parameter="cell_loss",
           value=_infection_loss(difficulty), description="fraction of cells "
           "lost at severity 1"),
      dict(kind="disease_condition", name="", parameter="meaning",
           value="uninfected, untreated", description="the few empty "
           "disease_condition rows (as in the real data) are healthy"),
  ]
  truth += _morph_rows(schema.RXRX19A_CELL_TYPES)
  return rows, specs, truth, nch


def _phenotype_row(difficulty: str) -> dict:
  if difficulty == "easy":
    return dict(kind="infection", name=schema.ACTIVE, parameter="phenotype",
                value="rounded smaller cells; RNA (w4) cytoplasm x4; nucleoli "
                "larger; actin ring x0.45, diffuse actin x2.5; Golgi dispersed",
                description="infected-cell phenotype")
  from gandl_jax.data import synthetic_hard  # pylint: disable=import-outside-toplevel
  return dict(kind="infection", name=schema.ACTIVE, parameter="phenotype",
              value=synthetic_hard.phenotype_text(difficulty),
              description="infected-cell phenotype (morphology only; every "
              "channel's intensity histogram matched to a class-independent "
              "target)")


def _infection_loss(difficulty: str) -> float:
  if difficulty == "easy":
    return INFECTION_DEATH
  from gandl_jax.data import synthetic_hard  # pylint: disable=import-outside-toplevel
  return synthetic_hard.design(difficulty).infection_loss


def _morph_rows(cell_types):
  out = []
  for ct in cell_types:
    m = MORPHOLOGY[ct]
    for f in ("cell_radius", "elongation", "nucleus_radius", "spacing", "occupancy"):
      out.append(dict(kind="cell_type", cell_type=ct, parameter=f,
                      value=getattr(m, f), description="pixels of a 256x256 field"
                      if f in ("cell_radius", "nucleus_radius", "spacing") else ""))
  return out


NEGATIVE_CONTROL_SIRNA = ("EMPTY", 1138)


def _rxrx1_sirnas(seed: int, n_treat: int, n_pos: int):
  """(name, id, role, effect) for the synthetic siRNA library."""
  rng = np.random.default_rng([seed, 19])
  ids = rng.choice(1108, n_treat, replace=False)
  out = []
  for i, sid in enumerate(sorted(int(x) for x in ids)):
    strong = i % 4 == 0
    eff = np.ones(9)
    if strong:
      eff[0:3] = np.exp(rng.normal(0.0, 0.15, 3))
      eff[3:] = np.exp(rng.normal(0.0, 0.25, 6))
    out.append((f"s{10000 + sid * 37 % 90000}", sid, "treatment", tuple(eff)))
  for j in range(n_pos):
    eff = np.ones(9)
    eff[0:3] = np.exp(rng.normal(0.0, 0.3, 3))
    eff[3:] = np.exp(rng.normal(0.0, 0.4, 6))
    out.append((f"s{20000 + j * 7919 % 80000}", 1108 + j, "positive_control",
                tuple(eff)))
  return out


def _rxrx1_layout(plates, wells_per_plate, seed, experiments, difficulty="easy"):
  nch = 6
  rows, specs, truth = [], [], []
  sirnas = _rxrx1_sirnas(seed, 24, 4)
  treat = [s for s in sirnas if s[2] == "treatment"]
  pos = [s for s in sirnas if s[2] == "positive_control"]
  n_neg, n_pos = 2, 2
  if wells_per_plate < n_neg + n_pos + 1:
    raise ValueError(f"wells_per_plate must be >= {n_neg + n_pos + 1}, "
                     f"got {wells_per_plate}")
  wells = _wells(16, 24, wells_per_plate)
  index = 0
  for ct_i, ct in enumerate(schema.RXRX1_CELL_TYPES):
    for k in range(1, experiments + 1):
      exp = f"{ct}-{k:02d}"
      split = "test" if experiments > 1 and k == experiments else "train"
      e_key = ct_i * 100 + k
      for plate in plates:
        gain, offset, vig = _plate_effects(seed, 50000 + e_key * 1000 + plate,
                                           nch, difficulty)
        truth += _plate_rows(exp, plate, gain, offset, vig)
        roles = [("negative_control",) + NEGATIVE_CONTROL_SIRNA + ((1.0,) * 9,)] * n_neg
        roles += [(p[2], p[0], p[1], p[3]) for p in pos[:n_pos]]
        t = 0
        while len(roles) < wells_per_plate:
          s = treat[(t + plate * 7) % len(treat)]
          roles.append((s[2], s[0], s[1], s[3]))
          t += 1
        perm = np.random.default_rng([seed, 23, e_key, plate]).permutation(len(roles))
        for w_i, well in enumerate(wells):
          well_type, sirna, sirna_id, eff = roles[perm[w_i]]
          for site in schema.RXRX1_SITES:
            rows.append({
                "site_id": schema.site_id(exp, plate, well, site),
                "well_id": schema.well_id(exp, plate, well),
                "cell_type": ct, "dataset": split, "experiment": exp,
                "plate": plate, "well": well, "site": site,
                "well_type": well_type, "sirna": sirna, "sirna_id": sirna_id,
            })
            specs.append(SiteSpec(
                index=index,
                relpaths=tuple(schema.image_relpath(exp, plate, well, site, ch)
                               for ch in range(1, nch + 1)),
                cell_type=ct, severity=0.0, toxicity=0.0, gain=gain,
                offset=offset, effect=tuple(float(x) for x in eff),
                vignetting=vig))
            index += 1
  names = ("radius", "nucleus", "occupancy") + tuple(f"w{i}" for i in range(1, 7))
  for s in sirnas:
    truth.append(dict(kind="sirna", name=s[0], parameter="role", value=s[2]))
    for nm, v in zip(names, s[3]):
      if v != 1.0:
        truth.append(dict(kind="sirna", name=s[0], parameter=f"scale_{nm}",
                          value=round(float(v), 4),
                          description="multiplier on the cell-type value"))
  truth += _morph_rows(schema.RXRX1_CELL_TYPES)
  return rows, specs, truth, nch


# --------------------------------------------------------------------------
# Writing.


def _csv_text(columns: Sequence[str], rows: Iterable[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise",
                     lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({c: r.get(c, "") for c in columns})
  return buf.getvalue()


def _render_chunk(args) -> List[Tuple[int, dict]]:
  specs, root, size, nch, seed, compress_level, difficulty, cell_types = args
  out = []
  made = set()
  for spec in specs:
    img, truth = render_site(spec, size, nch, seed, difficulty, cell_types)
    for ch in range(nch):
      path = os.path.join(root, "images", spec.relpaths[ch])
      d = os.path.dirname(path)
      if d not in made:
        os.makedirs(d, exist_ok=True)
        made.add(d)
      buf = io.BytesIO()
      Image.fromarray(img[ch], mode="L").save(buf, format="PNG",
                                              compress_level=compress_level)
      gio.write_bytes(path, buf.getvalue())  # whole files, even if killed
    out.append((spec.index, truth))
  return out


def generate(output_dir: str, dataset: str = "rxrx19a", size: int = 256,
             plates: Union[None, int, Sequence[int]] = None, seed: int = 0,
             wells_per_plate: Optional[int] = None,
             experiments: int = 1, workers: Optional[int] = None,
             compress_level: int = 1, difficulty: str = "easy") -> str:
  """Writes a synthetic dataset tree and returns its root (OUTPUT/RxRx19a).

  Args:
    output_dir: parent directory; the tree goes to `output_dir/RxRx19a` or
      `output_dir/RxRx1`.
    dataset: "rxrx19a" or "rxrx1".
    size: site edge in pixels (the field of view is fixed; cells scale).
    plates: plates per experiment (int) or a list of plate numbers.
      Defaults: 2 (rxrx19a: 4 experiments x 2 plates x 48 wells x 4 sites =
      1,536 sites), 2 (rxrx1: 4 cell types x 2 plates x 24 wells x 2 sites).
    seed: everything is a deterministic function of the seed.
    wells_per_plate: defaults 48 (rxrx19a; 15 controls, 33 treated so two
      plates hold every compound x dose once) and 24 (rxrx1).
    experiments: RxRx1 only, experiments per cell type (the last is `test`).
    workers: processes (default: all cores; small jobs run in-process);
      the output does not depend on it.
    compress_level: PNG zlib level (1 is fast; files are still lossless).
    difficulty: "easy" (biology visible in per-channel intensities), "hard"
      or "hard2" (biology only in morphology and arrangement; every channel's
      intensity histogram matched to a class-independent target; see
      `synthetic_hard`). Same layout, compounds and truth files.
  """
  dataset = dataset.lower()
  if dataset not in DATASET_DIRS:
    raise ValueError(f"dataset must be one of {sorted(DATASET_DIRS)}, got {dataset!r}")
  if size < 16:
    raise ValueError(f"size must be >= 16 pixels, got {size}")
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"difficulty must be one of {list(DIFFICULTIES)}, got "
                     f"{difficulty!r}")
  plate_list = _plate_list(plates, 2)
  if dataset == "rxrx19a":
    rows, specs, truth, nch = _rxrx19a_layout(plate_list, wells_per_plate or 48,
                                              seed, difficulty)
    cell_types = tuple(schema.RXRX19A_CELL_TYPES)
  else:
    rows, specs, truth, nch = _rxrx1_layout(plate_list, wells_per_plate or 24,
                                            seed, experiments, difficulty)
    cell_types = tuple(schema.RXRX1_CELL_TYPES)
  root = os.path.join(output_dir, DATASET_DIRS[dataset])
  os.makedirs(os.path.join(root, "images"), exist_ok=True)

  chunk = 32
  tasks = [(specs[i:i + chunk], root, size, nch, seed, compress_level,
            difficulty, cell_types) for i in range(0, len(specs), chunk)]
  if workers is None:
    # Small jobs run inline: starting processes would cost more than it saves.
    small = len(specs) * size * size < 2_000_000
    workers = 1 if small else (os.cpu_count() or 1)
  workers = max(1, int(workers))
  results: List[Tuple[int, dict]] = []
  if workers == 1 or len(tasks) == 1:
    for t in tasks:
      results += _render_chunk(t)
  else:
    # spawn: safe even when the caller has already started JAX / TF threads.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
      for part in pool.imap_unordered(_render_chunk, tasks):
        results += part
  site_truth = dict(results)

  site_rows = []
  for r, spec in zip(rows, specs):
    t = site_truth[spec.index]
    site_rows.append(dict(site_id=r["site_id"], n_cells=t["n_cells"],
                          infected_fraction=round(t["infected_fraction"], 4),
                          severity=round(t["severity"], 4),
                          toxicity=round(t["toxicity"], 4)))
  for r in rows:
    if r.get("treatment_conc", None) not in (None, ""):
      r["treatment_conc"] = repr(float(r["treatment_conc"]))
  truth.append(dict(kind="generator", name="synthetic", parameter="size",
                    value=size, description=f"seed {seed}"))
  if difficulty != "easy":
    truth.append(dict(kind="generator", name="synthetic", parameter="difficulty",
                      value=difficulty, description="morphology-only design "
                      "of gandl_jax/data/synthetic_hard.py"))
  gio.write_text(os.path.join(root, schema.SYNTHETIC_TRUTH_FILE), _csv_text(TRUTH_COLUMNS, truth))
  gio.write_text(os.path.join(root, SITES_FILE), _csv_text(SITES_COLUMNS, site_rows))
  # metadata.csv last: its presence marks a complete tree.
  gio.write_text(os.path.join(root, "metadata.csv"),
                     _csv_text(schema.COLUMNS[dataset], rows))
  return root


def read_truth(root: str):
  """The planted truth as a pandas DataFrame (long format, see TRUTH_COLUMNS)."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  return pd.read_csv(os.path.join(root, schema.SYNTHETIC_TRUTH_FILE), dtype=str,
                     keep_default_na=False)


def compound_truth(root: str) -> Dict[str, dict]:
  """{compound: {"role": ..., "ec50_uM": ..., ...}} from synthetic_truth.csv."""
  df = read_truth(root)
  out: Dict[str, dict] = {}
  for r in df[df["kind"] == "compound"].itertuples():
    v = r.value
    try:
      v = float(v)
    except ValueError:
      pass
    out.setdefault(r.name, {})[r.parameter] = v
  return out
