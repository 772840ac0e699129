"""Simulated RxRx19a-like (and RxRx1-like) embeddings with planted signal.

Test and benchmark data (the tests import it as `simulate`: pytest puts
tests/ on the path; tools/bench_evaluate.py loads it by file path), not
part of the package: metadata tables with the schema's
columns and vocabularies, and features = noise + planted directions:

* cell type: +-`cell_effect` along one direction;
* infection: `infection_effect` along another, scaled by the infection state
  (Mock / UV = 0, Active = 1; treated Active sites: 1 - rescue(conc), where
  rescue follows a Hill curve with a known EC50 for the "rescue" compounds);
* toxic compounds: a third direction growing with concentration;
* plates: a random per-plate offset (and scale) that per-plate normalization
  must remove.

The truth table has the columns read by `gandl_jax.evaluate.truth`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np
import pandas as pd

from gandl_jax import schema

# Half-log doses in uM (six, like the RxRx19a HRCE screen).
DOSES_UM: Tuple[float, ...] = tuple(float(10 * 10 ** (-0.5 * k))
                                    for k in range(6))[::-1]
NAMED_ACTIVES = ("Remdesivir (GS-5734)", "GS-441524")


@dataclasses.dataclass(frozen=True)
class SimConfig:
  sites_per_cell_type: Tuple[Tuple[str, int], ...] = (("HRCE", 2400),
                                                      ("VERO", 800))
  wells_per_plate: int = 120
  sites_per_well: int = 4
  dim: int = 64
  frac_mock: float = 0.08
  frac_uv: float = 0.04
  frac_active: float = 0.08       # untreated Active SARS-CoV-2 wells
  n_compounds: int = 12
  n_rescue: int = 4
  n_toxic: int = 2
  doses: Tuple[float, ...] = DOSES_UM
  cell_effect: float = 1.5
  infection_effect: float = 1.5
  toxic_effect: float = 1.0
  plate_shift: float = 2.0
  noise: float = 1.0
  seed: int = 0


def _well_names(n: int) -> list:
  rows = [chr(ord("A") + i) for i in range(26)] + [
      "A" + chr(ord("A") + i) for i in range(6)]
  out = []
  for r in rows:
    for c in range(1, 49):
      out.append(f"{r}{c:02d}")
      if len(out) == n:
        return out
  raise ValueError(f"at most {len(out)} wells per plate")


def compounds_truth(cfg: SimConfig, rng: np.random.Generator) -> pd.DataFrame:
  if cfg.n_rescue + cfg.n_toxic > cfg.n_compounds:
    raise ValueError(f"SimConfig: n_rescue ({cfg.n_rescue}) + n_toxic "
                     f"({cfg.n_toxic}) must not exceed n_compounds "
                     f"({cfg.n_compounds})")
  names = list(NAMED_ACTIVES[:min(cfg.n_rescue, len(NAMED_ACTIVES))])
  names += [f"CMPD-{i:04d}" for i in range(cfg.n_compounds - len(names))]
  kinds = (["rescue"] * cfg.n_rescue + ["toxic"] * cfg.n_toxic +
           ["inactive"] * (cfg.n_compounds - cfg.n_rescue - cfg.n_toxic))
  lo, hi = np.log10(min(cfg.doses)), np.log10(max(cfg.doses))
  ec50 = np.where(np.array(kinds) == "rescue",
                  10 ** rng.uniform(lo + 0.5, hi - 0.5, len(kinds)), np.nan)
  ec50[[k != "rescue" for k in kinds]] = np.nan
  tox = np.where(np.array(kinds) == "toxic", 10 ** (hi - 0.25), np.nan)
  return pd.DataFrame({"treatment": names, "kind": kinds, "ec50_um": ec50,
                       "efficacy": np.where(np.array(kinds) == "rescue", 1.0,
                                            0.0),
                       "hill": np.where(np.array(kinds) == "rescue", 1.5,
                                        np.nan),
                       "toxic_ac50_um": tox})


def make_metadata(cfg: SimConfig, rng: np.random.Generator,
                  truth: pd.DataFrame) -> pd.DataFrame:
  """RxRx19a-like metadata.csv rows (schema column order)."""
  frames = []
  names = truth["treatment"].tolist()
  combos = [(c, d) for c in names for d in cfg.doses]
  for cell, n_sites in cfg.sites_per_cell_type:
    n_wells = int(np.ceil(n_sites / cfg.sites_per_well))
    kinds = rng.random(n_wells)
    cond = np.full(n_wells, schema.ACTIVE, dtype=object)
    treat = np.full(n_wells, "", dtype=object)
    conc = np.full(n_wells, np.nan)
    f1, f2, f3 = cfg.frac_mock, cfg.frac_mock + cfg.frac_uv, (
        cfg.frac_mock + cfg.frac_uv + cfg.frac_active)
    cond[kinds < f1] = schema.MOCK
    cond[(kinds >= f1) & (kinds < f2)] = schema.UV_INACTIVATED
    treated = kinds >= f3
    k = np.arange(int(treated.sum())) % len(combos)
    rng.shuffle(k)
    treat[treated] = [combos[i][0] for i in k]
    conc[treated] = [combos[i][1] for i in k]
    wells_per_exp = int(np.ceil(n_wells / 2))
    exp_idx = np.arange(n_wells) // wells_per_exp
    within = np.arange(n_wells) % wells_per_exp
    plate = within // cfg.wells_per_plate + 1
    well_names = _well_names(cfg.wells_per_plate)
    well = [well_names[i % cfg.wells_per_plate] for i in within]
    experiment = [f"{cell}-{e + 1}" for e in exp_idx]
    wdf = pd.DataFrame({"experiment": experiment, "plate": plate,
                        "well": well, "disease_condition": cond,
                        "treatment": treat, "treatment_conc": conc})
    sdf = wdf.loc[wdf.index.repeat(cfg.sites_per_well)].reset_index(drop=True)
    sdf["site"] = np.tile(np.arange(1, cfg.sites_per_well + 1), n_wells)
    sdf = sdf.iloc[:n_sites].copy()
    sdf["cell_type"] = cell
    frames.append(sdf)
  md = pd.concat(frames, ignore_index=True)
  md["well_id"] = (md["experiment"] + "_" + md["plate"].astype(str) + "_" +
                   md["well"])
  md["site_id"] = md["well_id"] + "_" + md["site"].astype(str)
  md["SMILES"] = ""
  return md[list(schema.RXRX19A_COLUMNS)]


def hill(conc, ec50, h=1.0, top=1.0):
  conc = np.asarray(conc, dtype=np.float64)
  return top / (1.0 + (ec50 / conc) ** h)


def make_features(md: pd.DataFrame, truth: pd.DataFrame, cfg: SimConfig,
                  rng: np.random.Generator,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
  """float32 (sites, dim) with the planted effects, built plate by plate."""
  n, d = len(md), cfg.dim
  X = out if out is not None else np.empty((n, d), dtype=np.float32)
  basis = np.linalg.qr(rng.standard_normal((d, 3)))[0].T   # 3 orthonormal
  u_cell, u_inf, u_tox = basis
  cell = np.where(md["cell_type"].to_numpy() == schema.RXRX19A_CELL_TYPES[0],
                  1.0, -1.0)
  cond = md["disease_condition"].to_numpy()
  infection = (cond == schema.ACTIVE).astype(np.float64)
  tr = truth.set_index("treatment")
  treat = md["treatment"].to_numpy()
  conc = md["treatment_conc"].to_numpy(np.float64)
  tox = np.zeros(n)
  is_t = treat != ""
  if is_t.any():
    kinds = tr.loc[treat[is_t], "kind"].to_numpy()
    ec50 = tr.loc[treat[is_t], "ec50_um"].to_numpy(np.float64)
    h = tr.loc[treat[is_t], "hill"].to_numpy(np.float64)
    res = np.where(kinds == "rescue",
                   hill(conc[is_t], np.nan_to_num(ec50, nan=1.0),
                        np.nan_to_num(h, nan=1.0)), 0.0)
    infection[is_t] = infection[is_t] * (1.0 - res)
    ac = tr.loc[treat[is_t], "toxic_ac50_um"].to_numpy(np.float64)
    tox[is_t] = np.where(kinds == "toxic",
                         hill(conc[is_t], np.nan_to_num(ac, nan=1.0), 2.0), 0.0)
  plates = (md["experiment"] + "_" + md["plate"].astype(str)).to_numpy()
  codes, uniq = pd.factorize(plates)
  order = np.argsort(codes, kind="stable")
  bounds = np.searchsorted(codes[order], np.arange(len(uniq) + 1))
  for k in range(len(uniq)):
    rows = order[bounds[k]:bounds[k + 1]]
    shift = (cfg.plate_shift * rng.standard_normal(d)).astype(np.float32)
    scale = np.float32(np.exp(0.2 * rng.standard_normal()))
    base = (cfg.noise * rng.standard_normal((len(rows), d))).astype(np.float32)
    signal = (np.outer(cfg.cell_effect * cell[rows], u_cell) +
              np.outer(cfg.infection_effect * infection[rows], u_inf) +
              np.outer(cfg.toxic_effect * tox[rows], u_tox)).astype(np.float32)
    X[rows] = scale * (base + signal) + shift
  return X


def simulate_rxrx19a(cfg: SimConfig = SimConfig()
                     ) -> Tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
  """(metadata, features, truth) for an RxRx19a-like screen."""
  rng = np.random.default_rng(cfg.seed)
  truth = compounds_truth(cfg, rng)
  md = make_metadata(cfg, rng, truth)
  X = make_features(md, truth, cfg, rng)
  return md, X, truth


def simulate_rxrx1(sites_per_cell_type: int = 200, dim: int = 64,
                   plates_per_cell_type: int = 4, effect: float = 1.5,
                   plate_shift: float = 1.0, seed: int = 0
                   ) -> Tuple[pd.DataFrame, np.ndarray]:
  """RxRx1-like metadata (schema columns) and features with 4 cell types."""
  rng = np.random.default_rng(seed)
  centers = effect * np.linalg.qr(rng.standard_normal((dim, 4)))[0].T
  rows, feats = [], []
  for ci, cell in enumerate(schema.RXRX1_CELL_TYPES):
    for s in range(sites_per_cell_type):
      plate = s % plates_per_cell_type + 1
      w = s // (2 * plates_per_cell_type)
      well = f"{chr(ord('B') + w // 22 % 14)}{w % 22 + 2:02d}"
      site = (s // plates_per_cell_type) % 2 + 1
      exp = f"{cell}-01"
      wt = "negative_control" if w % 5 == 0 else "treatment"
      rows.append({"site_id": f"{exp}_{plate}_{well}_{site}",
                   "well_id": f"{exp}_{plate}_{well}", "cell_type": cell,
                   "dataset": "train", "experiment": exp, "plate": plate,
                   "well": well, "site": site, "well_type": wt,
                   "sirna": "EMPTY" if wt != "treatment" else f"s{w:05d}",
                   "sirna_id": 1138 if wt != "treatment" else w % 1108})
    X = rng.standard_normal((sites_per_cell_type, dim)) + centers[ci]
    feats.append(X)
  md = pd.DataFrame(rows)[list(schema.RXRX1_COLUMNS)]
  X = np.concatenate(feats).astype(np.float32)
  plates = (md["experiment"] + "_" + md["plate"].astype(str)).to_numpy()
  for p in np.unique(plates):
    m = plates == p
    X[m] += (plate_shift * rng.standard_normal(dim)).astype(np.float32)
  keep = ~md["site_id"].duplicated().to_numpy()
  return md[keep].reset_index(drop=True), X[keep]
