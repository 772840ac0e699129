"""Post-processing of embeddings: per-plate normalization, PCA whitening, wells.

Pure functions on numpy arrays (float32, rows = sites). Following Cuccarese et
al. 2020 as summarized in the GAN-DL paper: each plate's features are centered
and scaled by that plate's control wells, which removes plate-to-plate
variation; plates with too few control sites fall back to all their wells.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd


def single_thread_blas():
  """Context running BLAS/LAPACK on one thread (process-wide: enter it
  from one thread, around whatever runs on others).

  For the 1,024 x 1,024 eigendecompositions of whitening and TVN, OpenBLAS's
  threads gain little and, when the cores are busy, spin (measured: 10x
  the wall time of one thread on 2 busy cores). threadpoolctl comes with
  scikit-learn.
  """
  global _THREADPOOLS
  try:
    from threadpoolctl import ThreadpoolController  # pylint: disable=import-outside-toplevel
  except ImportError:
    return contextlib.nullcontext()
  if _THREADPOOLS is None:
    # Finding the loaded libraries takes ~20 ms; TVN asks once per batch.
    _THREADPOOLS = ThreadpoolController()
  return _THREADPOOLS.limit(limits=1, user_api="blas")


_THREADPOOLS = None


def plate_keys(meta: pd.DataFrame) -> np.ndarray:
  """One key per row identifying its plate: `{experiment}_{plate}`."""
  if "experiment" in meta and "plate" in meta:
    return (meta["experiment"].astype(str) + "_" +
            meta["plate"].astype(str)).to_numpy()
  if "well_id" in meta:
    return meta["well_id"].astype(str).str.rsplit("_", n=1).str[0].to_numpy()
  raise ValueError("per-plate normalization needs `experiment` and `plate` "
                   "(or `well_id`) metadata columns")


def batch_keys(meta: pd.DataFrame, level: str) -> np.ndarray:
  """Batch of each row for TVN: its plate, or its experiment."""
  if level == "plate":
    return plate_keys(meta)
  if level == "experiment":
    if "experiment" not in meta:
      raise ValueError("TVN by experiment needs an `experiment` column")
    return meta["experiment"].astype(str).to_numpy()
  raise ValueError(f"TVN batch must be 'plate' or 'experiment', got {level!r}")


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
                    inplace: bool = False, threads: Optional[int] = None
                    ) -> Tuple[np.ndarray, PlateNormInfo]:
  """(x - mean_ref) / std_ref per plate, ref = the plate's controls.

  Plates with fewer than `min_controls` control rows use all their rows.
  Features with (near) zero spread in the reference get std 1 (centered only).
  Each value is float32((float64(x) - mean) / std), computed in row blocks
  (in place on a plate's rows where they are contiguous), plates on
  `threads` threads (None: one per CPU core; numpy releases the GIL).
  """
  X = X if inplace else X.copy()
  if X.dtype != np.float32:
    X = X.astype(np.float32)
  names, blocks = _plate_blocks(plates)

  def one(rows: np.ndarray) -> bool:
    ref_rows = rows[controls[rows]]
    fell_back = len(ref_rows) < min_controls
    if fell_back:
      ref_rows = rows
    ref = X[ref_rows].astype(np.float64)
    mean = ref.mean(axis=0)
    std = ref.std(axis=0)
    del ref
    std = np.where(std > eps, std, 1.0)
    contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows)
    for s in range(0, len(rows), _NORM_BLOCK):
      part = (slice(rows[0] + s, rows[0] + min(s + _NORM_BLOCK, len(rows)))
              if contiguous else rows[s:s + _NORM_BLOCK])
      block = X[part].astype(np.float64)
      block -= mean
      block /= std
      X[part] = block
    return fell_back

  fell = _map_threads(one, blocks, threads)
  fallback = [str(n) for n, f in zip(names, fell) if f]
  info = PlateNormInfo(len(names), fallback, int(controls.sum()))
  return X, info


# Rows per block of the per-plate normalization: float64 temporaries of
# 256 x 1,024 = 2 MB, which the allocator reuses (at 4,096 rows, 32 MB, each
# block was fresh memory: page faults, system time).
_NORM_BLOCK = 256


def _map_threads(fn, items: Sequence, threads: Optional[int] = None) -> list:
  """[fn(x) for x in items], on `threads` threads (None: one per core)."""
  threads = min(threads or os.cpu_count() or 1, len(items))
  if threads <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(fn, items))


def _plate_blocks(plates: np.ndarray):
  """(names, row-index arrays) of each plate, in order of first appearance."""
  codes, uniques = pd.factorize(plates)
  order = np.argsort(codes, kind="stable")
  bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
  return uniques, [order[bounds[k]:bounds[k + 1]] for k in range(len(uniques))]


# pycytominer's `mad_robustize` epsilon (pycytominer.operations.RobustMAD).
MAD_EPSILON = 1e-18
# Consistency constant turning the MAD into a standard deviation under
# normality (scipy.stats.median_abs_deviation(scale="normal")).
MAD_NORMAL = 1.4826


def robust_stats(ref: np.ndarray, eps: float = MAD_EPSILON
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """(median, MAD * 1.4826 + eps) per column, as pycytominer's RobustMAD.

  Columns whose MAD is zero get scale 1 (centered only) instead of
  1 / 1e-18, which would blow a constant feature up to 1e18.
  """
  ref = ref.astype(np.float64)
  med = np.median(ref, axis=0)
  mad = np.median(np.abs(ref - med), axis=0) * MAD_NORMAL
  return med, np.where(mad > 0, mad + eps, 1.0)


def robust_plate_normalize(X: np.ndarray, plates: np.ndarray,
                           controls: np.ndarray, min_controls: int = 8,
                           eps: float = MAD_EPSILON, inplace: bool = False
                           ) -> Tuple[np.ndarray, PlateNormInfo]:
  """(x - median_ref) / (MAD_ref * 1.4826 + eps) per plate, ref = controls.

  pycytominer's `normalize(method="mad_robustize")` applied plate by plate
  with the control wells as samples; plates with fewer than `min_controls`
  control rows use all their rows.
  """
  X = X if inplace else X.copy()
  if X.dtype != np.float32:
    X = X.astype(np.float32)
  names, blocks = _plate_blocks(plates)
  fallback = []
  for name, rows in zip(names, blocks):
    ref_rows = rows[controls[rows]]
    if len(ref_rows) < min_controls:
      ref_rows = rows
      fallback.append(str(name))
    med, scale = robust_stats(X[ref_rows], eps)
    X[rows] = ((X[rows] - med) / scale).astype(np.float32)
  return X, PlateNormInfo(len(names), fallback, int(controls.sum()))


@dataclasses.dataclass
class TVNInfo:
  components: int
  batches: int
  fit_rows: int
  shrinkage: dict            # batch -> Ledoit-Wolf / fixed shrinkage used
  fallback_batches: List[str]  # batches aligned with all their rows


def ledoit_wolf_shrinkage(row_sq: np.ndarray, frob2: float, k: int) -> float:
  """scikit-learn's `ledoit_wolf_shrinkage(R, assume_centered=True)` from
  sums the CORAL step has at hand: `row_sq` = squared norm of each row of R
  (n x k), `frob2` = squared Frobenius norm of R'R (equal to that of the
  n x n Gram matrix RR'). O(n) instead of two k x k products.

  With S = R'R / n: mu = tr(S) / k, delta = ||S - mu I||^2 / k, beta =
  (sum_i ||r_i||^4 / n - ||R'R||^2 / n) / (k n^2), shrinkage = min(beta,
  delta) / delta (Ledoit & Wolf 2004, sklearn's blocked sums).
  """
  n = len(row_sq)
  if k == 1:
    return 0.0
  trace = float(row_sq.sum()) / n
  mu = trace / k
  delta_ = frob2 / n ** 2
  beta_ = float(np.square(row_sq).sum())
  beta = (beta_ / n - delta_) / (k * n)
  delta = (delta_ - 2.0 * mu * trace + k * mu ** 2) / k
  beta = min(beta, delta)
  return 0.0 if beta == 0 else float(beta / delta)


def _coral_map(R: np.ndarray, G: Optional[np.ndarray], a: float,
               W: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(W S^-1/2 and y S^-1/2, both float32) for S = (1 - a) C + a (tr C / k) I,
  C = R'R / (n - 1) the covariance of the centered rows R (n x k); `G` = the
  n x n Gram matrix RR' when n < k, else R'R.

  With n < k and a > 0, C has rank < n: S^-1/2 = c I + V diag(d) V' from the
  eigenvectors of the Gram matrix (V = R' U / s), about 8x less work than the
  k x k eigendecomposition at n = 500, k = 1,024; S^-1/2 itself (k x k) is
  never formed.
  """
  n, k = R.shape
  with single_thread_blas():
    if n < k and a > 0:
      g, U = np.linalg.eigh(G)
      keep = g > 1e-10 * max(g.max(), 1e-300)
      g, U = g[keep], U[:, keep]
      V = (R.T @ U) / np.sqrt(g)                  # (k, r), orthonormal
      var = g / max(n - 1, 1)
      floor = a * var.sum() / k                   # a * tr(C) / k
      lam = (1.0 - a) * var + floor
      d = 1.0 / np.sqrt(lam) - 1.0 / np.sqrt(floor)
      A = W / np.sqrt(floor) + ((W @ V) * d) @ V.T
      shift = y / np.sqrt(floor) + ((y @ V) * d) @ V.T
      return A.astype(np.float32), shift.astype(np.float32)
    C = (G if n >= k else R.T @ R) / max(n - 1, 1)
    S = (1.0 - a) * C + a * (np.trace(C) / k) * np.eye(k)
    evals, evecs = np.linalg.eigh(S)
  evals = np.maximum(evals, 1e-12 * max(evals.max(), 1e-12))
  T = (evecs / np.sqrt(evals)) @ evecs.T
  return (W @ T).astype(np.float32), (y @ T).astype(np.float32)


def tvn(X: np.ndarray, batches: np.ndarray, controls: np.ndarray,
        n_components: Optional[int] = None, shrinkage: Optional[float] = None,
        min_controls: int = 8, seed: int = 0, inplace: bool = False
        ) -> Tuple[np.ndarray, TVNInfo]:
  """Typical variation normalization.

  1. PCA whitening fitted on the control rows of all batches (mean 0,
     identity covariance over the pooled controls);
  2. per batch, CORAL-style alignment: center on the batch's control mean and
     multiply by C_b^(-1/2), C_b the covariance of the batch's whitened
     controls, so that every batch's controls end with identity covariance
     (the pooled target after step 1). With `shrinkage=None` this is exact
     for batches with at least 2k controls (k components); batches with
     fewer (C_b singular or ill-conditioned) use C_b shrunk towards a scaled
     identity, C = (1 - a) C_b + a (tr C_b / k) I, with the Ledoit-Wolf
     coefficient a. A number fixes a for every batch (0 = exact CORAL).
  Batches with fewer than `min_controls` controls are aligned on all rows.

  Cost: per batch, its whitened controls (n x dim x k), their n x n Gram
  matrix and the affine map W C_b^-1/2 (dim x k); then one float32 product
  of each batch's rows with its map. `inplace` (float32 X, all components
  kept) writes the result into X instead of a new matrix.
  """
  ctrl_rows = np.flatnonzero(controls)
  if len(ctrl_rows) < 2:
    raise ValueError(f"TVN needs control rows to fit on, got {len(ctrl_rows)}")
  w = fit_whitening(X[ctrl_rows], n_components, seed=seed)
  W = w.components * w.scale[None, :]            # (dim, k), float64
  k = W.shape[1]
  mW = w.mean @ W
  if inplace and k == X.shape[1] and X.dtype == np.float32:
    Z = X
  else:
    Z = np.empty((len(X), k), dtype=np.float32)
  names, blocks = _plate_blocks(batches)
  used, fallback = {}, []
  for name, rows in zip(names, blocks):
    ref_rows = rows[controls[rows]]
    if len(ref_rows) < min_controls:
      ref_rows = rows
      fallback.append(str(name))
    ref = X[ref_rows].astype(np.float64) @ W - mW   # (x - m) W
    mu = ref.mean(axis=0)
    R = ref - mu
    n = len(R)
    G = R @ R.T if n < k else R.T @ R
    if shrinkage is not None:
      a = float(shrinkage)
    elif n >= 2 * k:
      a = 0.0      # enough controls: exact CORAL
    else:
      a = ledoit_wolf_shrinkage(np.einsum("ij,ij->i", R, R),
                                float(np.square(G).sum()), k)
    # Whitening and alignment as one affine map: z = x (W T) - (m W + mu) T.
    A, shift = _coral_map(R, G, a, W, mW + mu)
    for s in range(0, len(rows), 65536):
      part = rows[s:s + 65536]
      Z[part] = X[part] @ A - shift
    used[str(name)] = round(a, 6)
  return Z, TVNInfo(k, len(names), int(min(len(ctrl_rows), 100_000)), used,
                    fallback)


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
  with single_thread_blas():
    evals, evecs = np.linalg.eigh(cov)
  order = np.argsort(evals)[::-1]
  evals, evecs = evals[order], evecs[:, order]
  keep = evals > eps * max(evals[0], eps)
  k = int(keep.sum())
  if n_components is not None:
    k = min(k, int(n_components))
  evals, evecs = evals[:k], evecs[:, :k]
  return Whitening(mean, evecs, 1.0 / np.sqrt(evals + eps))


def aggregate_rows(meta: pd.DataFrame, X: np.ndarray, keys: np.ndarray
                   ) -> Tuple[pd.DataFrame, np.ndarray]:
  """Mean row per key (order of first appearance); metadata of the key's
  first row, plus `n_rows` (how many rows were averaged)."""
  import scipy.sparse  # pylint: disable=import-outside-toplevel
  codes, uniques = pd.factorize(np.asarray(keys))
  counts = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
  # Means as one sparse (groups x rows) product in float32: 4 s for 305,520
  # x 1,024 sites into wells on the shared 2-core machine, against 21 s for
  # sorted-segment float64 sums (relative error ~1e-7 x rows per group).
  mean = scipy.sparse.csr_matrix(
      ((1.0 / counts[codes]).astype(np.float32), (codes, np.arange(len(codes)))),
      shape=(len(uniques), len(codes)))
  Xg = np.asarray(mean @ np.asarray(X, dtype=np.float32), dtype=np.float32)
  first = pd.Series(np.arange(len(meta))).groupby(codes).first().to_numpy()
  mg = meta.iloc[first].reset_index(drop=True).copy()
  mg["n_rows"] = counts.astype(np.int64)
  return mg, Xg


def aggregate_wells(meta: pd.DataFrame, X: np.ndarray
                    ) -> Tuple[pd.DataFrame, np.ndarray]:
  """Mean embedding per well; metadata of the well's first site, `site` -> count."""
  if "well_id" not in meta:
    raise ValueError("well-level aggregation needs a `well_id` metadata column")
  mw, Xw = aggregate_rows(meta, X, meta["well_id"].astype(str).to_numpy())
  mw["site_id"] = mw["well_id"].astype(str)
  mw = mw.rename(columns={"n_rows": "n_sites"})
  if "site" in mw:
    mw = mw.drop(columns=["site"])
  return mw, Xw


def aggregate_compound_doses(meta: pd.DataFrame, X: np.ndarray
                             ) -> Tuple[pd.DataFrame, np.ndarray]:
  """Consensus profile (mean) per compound-dose (and cell type): treated rows
  grouped by `treatment`, `treatment_conc` and `cell_type` where present;
  control rows grouped by plate (one consensus control per plate)."""
  if "treatment" not in meta:
    raise ValueError("compound-dose aggregation needs a `treatment` column")
  text = lambda col: meta[col].map(lambda v: "" if pd.isna(v) else str(v))  # noqa: E731
  key = text("treatment")
  for c in ("treatment_conc", "cell_type", "disease_condition"):
    if c in meta:
      key = key + "|" + text(c)
  ctrl = control_mask(meta)
  if ctrl.any():
    try:
      plates = plate_keys(meta)
      key = key.where(~ctrl, "control|" + pd.Series(plates, index=key.index)
                      + "|" + key)
    except ValueError:
      pass
  mg, Xg = aggregate_rows(meta, X, key.to_numpy())
  for c in ("site", "site_id", "well", "well_id"):
    if c in mg:
      mg = mg.drop(columns=[c])
  mg.insert(0, "site_id", pd.unique(key.to_numpy()))
  return mg, Xg


def condition_labels(meta: pd.DataFrame) -> np.ndarray:
  """`disease_condition` for untreated rows, 'treated' otherwise (for plots)."""
  cond = meta.get("disease_condition", pd.Series([""] * len(meta))).astype(str)
  ctrl = control_mask(meta) if "treatment" in meta else np.ones(len(meta), bool)
  out = np.where(ctrl, cond.to_numpy(), "treated")
  return np.where(out == "", "unknown", out)


__all__ = ["plate_keys", "control_mask", "plate_normalize", "PlateNormInfo",
           "robust_plate_normalize", "robust_stats", "tvn", "TVNInfo",
           "fit_whitening", "Whitening", "aggregate_rows", "aggregate_wells",
           "aggregate_compound_doses", "condition_labels", "batch_keys",
           "ledoit_wolf_shrinkage"]
