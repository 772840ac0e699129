"""Post-processing of embeddings: per-plate normalization, PCA whitening, wells.

Pure functions on numpy arrays (float32, rows = sites). Following Cuccarese et
al. 2020 as summarized in the GAN-DL paper: each plate's features are centered
and scaled by that plate's control wells, which removes plate-to-plate
variation; plates with too few control sites fall back to all their wells.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd


def plate_keys(meta: pd.DataFrame) -> np.ndarray:
  """One key per row identifying its plate: `{experiment}_{plate}`."""
  if "experiment" in meta and "plate" in meta:
    return (meta["experiment"].astype(str) + "_" +
            meta["plate"].astype(str)).to_numpy()
  if "well_id" in meta:
    return meta["well_id"].astype(str).str.rsplit("_", n=1).str[0].to_numpy()
  raise ValueError("per-plate normalization needs `experiment` and `plate` "
                   "(or `well_id`) metadata columns")


def control_mask(meta: pd.DataFrame) -> np.ndarray:
  """Rows that are control wells.

  RxRx19a: untreated wells (empty `treatment`: Mock, UV-inactivated and
  active-virus controls). RxRx1: `well_type == negative_control`.
  """
  if "well_type" in meta:
    return (meta["well_type"].astype(str) == "negative_control").to_numpy()
  if "treatment" in meta:
    t = meta["treatment"].fillna("").astype(str).str.strip()
    return (t == "").to_numpy()
  return np.zeros(len(meta), dtype=bool)


@dataclasses.dataclass
class PlateNormInfo:
  plates: int
  fallback_plates: List[str]        # plates normalized by all their wells
  control_sites: int


def plate_normalize(X: np.ndarray, plates: np.ndarray, controls: np.ndarray,
                    min_controls: int = 8, eps: float = 1e-6,
                    inplace: bool = False) -> Tuple[np.ndarray, PlateNormInfo]:
  """(x - mean_ref) / std_ref per plate, ref = the plate's controls.

  Plates with fewer than `min_controls` control rows use all their rows.
  Features with (near) zero spread in the reference get std 1 (centered only).
  """
  X = X if inplace else X.copy()
  if X.dtype != np.float32:
    X = X.astype(np.float32)
  codes, uniques = pd.factorize(plates)
  order = np.argsort(codes, kind="stable")
  bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
  fallback = []
  for k, name in enumerate(uniques):
    rows = order[bounds[k]:bounds[k + 1]]
    ref_rows = rows[controls[rows]]
    if len(ref_rows) < min_controls:
      ref_rows = rows
      fallback.append(str(name))
    ref = X[ref_rows].astype(np.float64)
    mean = ref.mean(axis=0)
    std = ref.std(axis=0)
    std = np.where(std > eps, std, 1.0)
    X[rows] = ((X[rows] - mean) / std).astype(np.float32)
  info = PlateNormInfo(len(uniques), fallback, int(controls.sum()))
  return X, info


@dataclasses.dataclass
class Whitening:
  mean: np.ndarray          # (dim,)
  components: np.ndarray    # (dim, k): columns = principal axes
  scale: np.ndarray         # (k,): 1 / sqrt(eigenvalue + eps)

  def transform(self, X: np.ndarray, block: int = 65536) -> np.ndarray:
    W = (self.components * self.scale[None, :]).astype(np.float32)
    m = self.mean.astype(np.float32)
    out = np.empty((len(X), W.shape[1]), dtype=np.float32)
    for s in range(0, len(X), block):
      out[s:s + block] = (X[s:s + block] - m) @ W
    return out


def fit_whitening(X: np.ndarray, n_components: Optional[int] = None,
                  eps: float = 1e-6, max_rows: int = 100_000,
                  seed: int = 0) -> Whitening:
  """PCA whitening (zero mean, identity covariance) fitted on rows of X.

  At most `max_rows` rows (a seeded random subset) are used for the fit.
  Components whose variance is below eps * largest are dropped.
  """
  if len(X) < 2:
    raise ValueError(f"PCA whitening needs at least 2 fitting rows, got {len(X)}")
  if len(X) > max_rows:
    idx = np.random.default_rng(seed).choice(len(X), max_rows, replace=False)
    X = X[np.sort(idx)]
  Xd = X.astype(np.float64)
  mean = Xd.mean(axis=0)
  Xd -= mean
  cov = (Xd.T @ Xd) / (len(Xd) - 1)
  evals, evecs = np.linalg.eigh(cov)
  order = np.argsort(evals)[::-1]
  evals, evecs = evals[order], evecs[:, order]
  keep = evals > eps * max(evals[0], eps)
  k = int(keep.sum())
  if n_components is not None:
    k = min(k, int(n_components))
  evals, evecs = evals[:k], evecs[:, :k]
  return Whitening(mean, evecs, 1.0 / np.sqrt(evals + eps))


def aggregate_wells(meta: pd.DataFrame, X: np.ndarray
                    ) -> Tuple[pd.DataFrame, np.ndarray]:
  """Mean embedding per well; metadata of the well's first site, `site` -> count."""
  if "well_id" not in meta:
    raise ValueError("well-level aggregation needs a `well_id` metadata column")
  codes, uniques = pd.factorize(meta["well_id"].astype(str))
  counts = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
  sums = np.zeros((len(uniques), X.shape[1]), dtype=np.float64)
  _add_sorted(sums, codes, X)
  Xw = (sums / counts[:, None]).astype(np.float32)
  first = pd.Series(np.arange(len(meta))).groupby(codes).first().to_numpy()
  mw = meta.iloc[first].reset_index(drop=True).copy()
  mw["site_id"] = mw["well_id"].astype(str)
  mw["n_sites"] = counts.astype(np.int64)
  if "site" in mw:
    mw = mw.drop(columns=["site"])
  return mw, Xw


def _add_sorted(sums: np.ndarray, codes: np.ndarray, X: np.ndarray,
                block: int = 128) -> None:
  """sums[c] += rows of X with code c, via sorted segments (bounded memory)."""
  order = np.argsort(codes, kind="stable")
  bounds = np.searchsorted(codes[order], np.arange(len(sums) + 1))
  starts = bounds[:-1]
  nonempty = bounds[1:] > starts
  for j in range(0, X.shape[1], block):
    part = X[order, j:j + block].astype(np.float64)
    sums[nonempty, j:j + block] = np.add.reduceat(part, starts[nonempty], axis=0)


def condition_labels(meta: pd.DataFrame) -> np.ndarray:
  """`disease_condition` for untreated rows, 'treated' otherwise (for plots)."""
  cond = meta.get("disease_condition", pd.Series([""] * len(meta))).astype(str)
  ctrl = control_mask(meta) if "treatment" in meta else np.ones(len(meta), bool)
  out = np.where(ctrl, cond.to_numpy(), "treated")
  return np.where(out == "", "unknown", out)


__all__ = ["plate_keys", "control_mask", "plate_normalize", "PlateNormInfo",
           "fit_whitening", "Whitening", "aggregate_wells", "condition_labels"]
