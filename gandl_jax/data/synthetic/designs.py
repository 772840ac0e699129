"""The planted biology and the designs of the synthetic datasets, as data.

Shared by every design: the compounds (rescuers reduce the infection severity
along a Hill curve with a known EC50; toxic compounds kill cells and condense
nuclei at high dose, another Hill curve; the rest do nothing), the doses, the
infection levels and the cell-type appearance (`MORPHOLOGY`: size,
elongation, density, stain brightness; HRCE vs VERO, and RxRx1's HEPG2 /
HUVEC / RPE / U2OS).

A design says how that biology shows in the pixels (`DESIGNS`):

* `easy` (`IntensityDesign`): infected cells are rounded and smaller, with
  bright cytoplasmic RNA, enlarged nucleoli, disrupted actin and dispersed
  Golgi, so the biology shows in per-channel intensities;
* `hard`, `hard2` (`MorphologyDesign`): the biology is carried only by the
  shape, texture and arrangement of cells, modelled on what SARS-CoV-2
  infected and treated cells show (syncytia, cell rounding and clumping,
  merged / enlarged or fragmented nucleoli, Golgi fragmentation or swelling,
  a broken actin ring and lost stress fibres or actin patches, ER vesicles
  or collapsed ER, cytoplasmic RNA foci); every channel's intensity
  histogram is then matched to a class-independent target (`render.py`),
  so the mean, standard deviation and every percentile of every channel
  carry no class information. `hard2` has other phenotype parameters, so
  that a conclusion that holds only for one design shows up.

Every design also fixes its plate effects (per-plate, per-channel gain and
background offset, and for the morphology designs vignetting: batch effects
that plate-wise normalization must remove).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Tuple

# Six half-log doses in uM, as in the RxRx19a HRCE screen.
CONCENTRATIONS: Tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ACTIVE_SEVERITY = 0.8        # mean infected fraction of an untreated Active site
ACTIVE_SEVERITY_SD = 0.08    # per-site variability
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


@dataclasses.dataclass(frozen=True)
class Design:
  """What every design fixes: how its cells are drawn (`cells`: "intensity"
  or "morphology", the two cell models of `cells.py`), the cells lost to
  infection, and its plate effects (the plate stream `plate_stream` seeds
  them)."""
  name: str
  cells: str
  infection_loss: float        # fraction of cells lost at severity 1
  plate_gain_sd: float         # lognormal sd of the per-channel plate gain
  plate_offset: Tuple[float, float]        # per-channel offset ~ N(mean, sd)
  plate_vignetting: Tuple[float, float]    # strength ~ U(lo, hi); (0, 0): none
  plate_stream: int


@dataclasses.dataclass(frozen=True)
class IntensityDesign(Design):
  """The biology shows in per-channel intensities (`cells.intensity_cells`)."""
  phenotype: str               # the infected-cell phenotype, in words


@dataclasses.dataclass(frozen=True)
class MorphologyDesign(Design):
  """Phenotype and nuisance parameters of a morphology-only design
  (`cells.morphology_cells`, then `render.py`'s histogram matching).

  Lengths of `MORPHOLOGY` are read as pixels of a `field`-wide field of view
  (the intensity design: 256; a smaller field means larger cells per pixel).
  """
  field: float
  # Arrangement per cell type: (lattice jitter as a fraction of the spacing,
  # orientation spread in radians around a site-wide direction; pi = random).
  arrangement: Tuple[Tuple[str, float, float], ...]
  # Infection.
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

  def arrangement_of(self, cell_type: str) -> Tuple[float, float]:
    for ct, jitter, spread in self.arrangement:
      if ct == cell_type:
        return jitter, spread
    raise ValueError(f"design {self.name!r} has no arrangement for cell type "
                     f"{cell_type!r}")


_PI = math.pi
DESIGNS: Dict[str, Design] = {
    "easy": IntensityDesign(
        name="easy", cells="intensity", infection_loss=0.35,
        plate_gain_sd=0.18, plate_offset=(6.0, 4.0),
        plate_vignetting=(0.0, 0.0), plate_stream=11,
        phenotype="rounded smaller cells; RNA (w4) cytoplasm x4; nucleoli "
        "larger; actin ring x0.45, diffuse actin x2.5; Golgi dispersed"),
    "hard": MorphologyDesign(
        name="hard", cells="morphology", plate_stream=37, field=128.0,
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
    "hard2": MorphologyDesign(
        name="hard2", cells="morphology", plate_stream=37, field=160.0,
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


def design(difficulty: str) -> Design:
  """The design named `difficulty`; ValueError naming the choices."""
  if difficulty not in DESIGNS:
    raise ValueError(f"difficulty must be one of {list(DESIGNS)}, got "
                     f"{difficulty!r}")
  return DESIGNS[difficulty]


def phenotype_text(difficulty: str) -> str:
  """The infected-cell phenotype of a design, for synthetic_truth.csv."""
  d = design(difficulty)
  if isinstance(d, IntensityDesign):
    return d.phenotype
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
