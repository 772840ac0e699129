"""Plate layouts of the synthetic RxRx19a / RxRx1: the metadata rows (exact
public columns and vocabularies), one `render.SiteSpec` per site and the
planted truth rows (synthetic_truth.csv, long format).

RxRx19a: four experiments (HRCE and VERO), per plate Mock, UV Inactivated,
Active and a few empty-condition control wells, the rest Active wells
treated with every compound x dose in a shuffled queue. RxRx1: four cell
types, per plate negative and positive siRNA controls and a synthetic siRNA
library whose strong members scale cell size, nucleus size, occupancy and
per-channel brightness.
"""
from __future__ import annotations

import string
from typing import List, Sequence, Union

import numpy as np

from gandl_jax import schema
from gandl_jax.data.synthetic import designs
from gandl_jax.data.synthetic.designs import COMPOUNDS, CONCENTRATIONS, Compound
from gandl_jax.data.synthetic.render import SiteSpec, plate_effects


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


def plate_list(plates: Union[None, int, Sequence[int]], default: int) -> List[int]:
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


def rxrx19a_layout(plates, wells_per_plate, seed, difficulty="easy"):
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
      gain, offset, vig = plate_effects(seed, e * 1000 + plate, nch, difficulty)
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
        severity = designs.ACTIVE_SEVERITY if cond == "Active" else 0.0
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
           value=designs.ACTIVE_SEVERITY, description="mean fraction of "
           "infected cells in an untreated Active site (per-site sd "
           f"{designs.ACTIVE_SEVERITY_SD}); Mock, UV Inactivated and empty: 0"),
      _phenotype_row(difficulty),
      dict(kind="infection", name=schema.ACTIVE, parameter="cell_loss",
           value=designs.design(difficulty).infection_loss, description="fraction of cells "
           "lost at severity 1"),
      dict(kind="disease_condition", name="", parameter="meaning",
           value="uninfected, untreated", description="the few empty "
           "disease_condition rows (as in the real data) are healthy"),
  ]
  truth += _morph_rows(schema.RXRX19A_CELL_TYPES)
  return rows, specs, truth, nch


def _phenotype_row(difficulty: str) -> dict:
  des = designs.design(difficulty)
  return dict(kind="infection", name=schema.ACTIVE, parameter="phenotype",
              value=designs.phenotype_text(difficulty),
              description="infected-cell phenotype" if des.cells == "intensity"
              else "infected-cell phenotype (morphology only; every channel's "
              "intensity histogram matched to a class-independent target)")


def _morph_rows(cell_types):
  out = []
  for ct in cell_types:
    m = designs.MORPHOLOGY[ct]
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


def rxrx1_layout(plates, wells_per_plate, seed, experiments, difficulty="easy"):
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
        gain, offset, vig = plate_effects(seed, 50000 + e_key * 1000 + plate,
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
