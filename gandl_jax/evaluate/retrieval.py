"""Retrieval metrics of image-based profiling (JUMP / EFAAR style).

* Phenotypic activity: mean average precision (mAP) of each perturbation's
  replicate profiles retrieved against negative-control profiles, with a
  permutation p-value and Benjamini-Hochberg correction. Computed with the
  JUMP consortium's `copairs` package (Kalinin et al. 2025).
* Phenotypic consistency: perturbations sharing an annotation (target,
  mechanism) retrieve each other (mAP per annotation, `copairs` too).
* Replicate consistency ("percent replicating"): median cosine similarity of
  a perturbation's replicates against a null of random groups of the same size
  drawn from different perturbations; percent above the null's 95th
  percentile.
* Treatment-vs-control energy distance for named compounds, with a
  permutation p-value.

Perturbation = compound x concentration (x cell type when present). The
reference group is explicit (`reference_groups`): for RxRx19a the infected,
untreated wells (`Active SARS-CoV-2`, empty treatment) - the negative controls
of the dose-response; elsewhere the control rows of `normalize.control_mask`.

One module (about 580 lines) for the four metrics: they share the profile
grouping, the reference selection and the copairs plumbing.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from gandl_jax import schema
from gandl_jax.evaluate import normalize
from gandl_jax.evaluate.classify import TaskError

ACTIVITY = "activity"
REPLICATES = "replicates"


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  level: str = "well"              # profiles: "well" (site means) or "site"
  negatives: str = "plate"         # controls of the query's plate, or "all"
  exclude_same_plate: bool = False  # replicate pairs must span plates
  null_size: int = 10_000          # copairs permutation null per config
  threshold: float = 0.05          # on the BH-corrected p-value
  annotation: Optional[str] = None  # metadata column for consistency
  consistency_on: str = "active"   # consensus of "active" doses or "all"
  replicate_null: int = 1000       # random groups per group size
  energy_max_controls: int = 1000  # control rows for the energy distance
  energy_permutations: int = 200
  center_on_reference: bool = True  # plate profiles minus their reference mean
  seed: int = 0


# ---------------------------------------------------------------------------
# Which rows are perturbations, which are the reference.


def reference_groups(meta: pd.DataFrame, task: str = ACTIVITY
                     ) -> Tuple[np.ndarray, np.ndarray, str]:
  """(perturbation rows, negative-control rows, description of the reference).

  RxRx19a (a `disease_condition` column): perturbations are treated
  `Active SARS-CoV-2` rows with a positive concentration (the dose-response
  rows), the reference the untreated `Active SARS-CoV-2` rows. Otherwise:
  `normalize.control_mask` rows against every other row with a treatment.
  """
  if "treatment" not in meta:
    raise TaskError(f"task {task}: no `treatment` column among "
                    f"{list(meta.columns)[:12]}; map one with --columns "
                    f"treatment=...")
  ctrl = normalize.control_mask(meta)
  treat = meta["treatment"].fillna("").astype(str).str.strip().to_numpy()
  pert = ~ctrl & (treat != "")
  if "treatment_conc" in meta:
    conc = pd.to_numeric(meta["treatment_conc"], errors="coerce").to_numpy()
  if "disease_condition" in meta:
    cond = meta["disease_condition"].astype(str).to_numpy()
    ctrl = ctrl & (cond == schema.ACTIVE)
    pert = pert & (cond == schema.ACTIVE)
    if "treatment_conc" in meta:
      pert &= np.isfinite(conc) & (conc > 0)
    desc = (f"untreated `{schema.ACTIVE}` wells (infected, no compound: the "
            f"negative controls of the dose-response)")
  else:
    desc = ("negative-control rows (`well_type == negative_control`, or an "
            "empty treatment)")
  if not pert.any():
    raise TaskError(f"task {task}: no perturbation rows among {len(meta)}")
  if not ctrl.any():
    raise TaskError(f"task {task}: no reference rows ({desc}) among "
                    f"{len(meta)}")
  return pert, ctrl, desc


def center_on_reference(meta: pd.DataFrame, X: np.ndarray
                        ) -> Tuple[np.ndarray, Dict]:
  """Each plate's profiles minus the mean of that plate's reference rows.

  Cosine similarity is measured from the origin; the field's profiles are
  normalized to their negative controls, which are also the mAP reference,
  so the origin is the reference. RxRx19a's per-plate normalization centers
  on all untreated wells (Mock, UV and Active), so an inactive compound's
  wells share an offset from the origin (and replicate well) while a rescued
  one sits near it. Plates without reference rows use the mean of all
  reference rows.
  """
  _, ref, desc = reference_groups(meta)
  plates = normalize.plate_keys(meta)
  X = np.array(X, dtype=np.float32, copy=True)
  overall = X[ref].astype(np.float64).mean(axis=0)
  missing = 0
  for p in pd.unique(plates):
    rows = plates == p
    r = rows & ref
    if r.any():
      X[rows] -= X[r].astype(np.float64).mean(axis=0).astype(np.float32)
    else:
      X[rows] -= overall.astype(np.float32)
      missing += 1
  return X, {"centered_on": desc, "plates_without_reference": missing}


def perturbation_keys(meta: pd.DataFrame) -> np.ndarray:
  """`treatment @ conc [cell_type]` per row: one key per compound-dose."""
  key = meta["treatment"].fillna("").astype(str).str.strip()
  if "treatment_conc" in meta:
    conc = pd.to_numeric(meta["treatment_conc"], errors="coerce")
    # Formatted once per distinct concentration, not once per row.
    text = {c: f"{c:.6g}" if np.isfinite(c) else "" for c in conc.unique()}
    key = key + " @ " + conc.map(text).fillna("").astype(str)
  if "cell_type" in meta:
    key = key + " [" + meta["cell_type"].map(
        lambda v: "" if pd.isna(v) else str(v)) + "]"
  return key.to_numpy(dtype=object)


def _well_keys(meta: pd.DataFrame) -> np.ndarray:
  if "well_id" in meta:
    return meta["well_id"].astype(str).to_numpy()
  return meta["site_id"].astype(str).to_numpy()


def _cell_keys(meta: pd.DataFrame) -> np.ndarray:
  if "cell_type" in meta:
    return meta["cell_type"].astype(str).to_numpy()
  return np.full(len(meta), "all")


def _copairs():
  try:
    from copairs import map as cmap  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise TaskError(f"the retrieval metrics need the `copairs` package "
                    f"(pip install copairs): {e}") from e
  logging.getLogger("copairs").setLevel(logging.WARNING)
  return cmap


class PairCosine:
  """Cosine similarity of row pairs, for copairs, from row indices.

  copairs gathers both feature rows of every pair before calling its
  similarity function; at RxRx19a size (3 million plate-local
  query-reference pairs x 1,024 features) that gather took 53 of 65 s. Here
  copairs gets each row's index as its only "feature" and this callable (a
  `distance` callable, which copairs supports) returns the similarities:
  query-vs-reference pairs inside one block (plate) are looked up in a
  block matrix computed by one product per block, other pairs are computed
  from the gathered unit rows.
  """

  def __init__(self, X: np.ndarray, is_ref: np.ndarray,
               blocks: Optional[np.ndarray] = None):
    self.U = _unit_rows(X)
    self.is_ref = np.asarray(is_ref, bool)
    self.block = None
    if blocks is None:
      return
    codes, uniq = pd.factorize(blocks)
    self.block = codes
    self.pos = np.zeros(len(X), np.int64)      # row position in its block
    self.ref_pos = np.zeros(len(X), np.int64)  # reference position in block
    self.offset = np.zeros(len(uniq), np.int64)
    self.n_ref = np.zeros(len(uniq), np.int64)
    parts, off = [], 0
    for b in range(len(uniq)):
      rows = np.flatnonzero(codes == b)
      refs = rows[self.is_ref[rows]]
      self.pos[rows] = np.arange(len(rows))
      self.ref_pos[refs] = np.arange(len(refs))
      self.offset[b], self.n_ref[b] = off, len(refs)
      parts.append((self.U[rows] @ self.U[refs].T).ravel())
      off += len(rows) * len(refs)
    self.flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)

  def __call__(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    i = np.asarray(xs).reshape(-1).astype(np.int64)
    j = np.asarray(ys).reshape(-1).astype(np.int64)
    out = np.empty(len(i), np.float32)
    rest = np.ones(len(i), bool)
    if self.block is not None:
      swap = self.is_ref[i] & ~self.is_ref[j]
      q, r = np.where(swap, j, i), np.where(swap, i, j)
      look = self.is_ref[r] & (self.block[q] == self.block[r])
      b = self.block[q[look]]
      out[look] = self.flat[self.offset[b] + self.pos[q[look]] * self.n_ref[b]
                            + self.ref_pos[r[look]]]
      rest = ~look
    out[rest] = np.einsum("ij,ij->i", self.U[i[rest]], self.U[j[rest]])
    return out


def _map_with_pvalues(meta: pd.DataFrame, sim: PairCosine, pos_sameby,
                      pos_diffby, neg_sameby, neg_diffby, keep: np.ndarray,
                      sameby, cfg: RetrievalConfig
                      ) -> Tuple[pd.DataFrame, pd.DataFrame]:
  """copairs AP per query row, then mAP per `sameby` group with p-values.

  `keep` selects the query rows whose APs enter the mAP (e.g. not controls).
  """
  cmap = _copairs()
  from copairs.matching import UnpairedException  # pylint: disable=import-outside-toplevel
  try:
    index = np.arange(len(meta), dtype=np.float64)[:, None]
    ap = cmap.average_precision(meta, index, pos_sameby=pos_sameby,
                                pos_diffby=pos_diffby, neg_sameby=neg_sameby,
                                neg_diffby=neg_diffby, batch_size=20_000,
                                distance=sim, progress_bar=False)
  except UnpairedException as e:
    raise TaskError(str(e)) from e
  if len(ap) != len(keep):
    raise TaskError(f"copairs returned {len(ap)} rows for {len(keep)} profiles")
  ap = ap[keep].reset_index(drop=True)
  valid = ap["n_pos_pairs"].to_numpy() > 0
  if not valid.any():
    raise TaskError("no query has a positive pair (every group has a single "
                    "profile after the guards)")
  # The null distributions are cached on disk by copairs; keep them out of
  # the user's home directory.
  with tempfile.TemporaryDirectory(prefix="gandl_copairs_") as cache:
    m = cmap.mean_average_precision(ap, sameby=sameby, null_size=cfg.null_size,
                                    threshold=cfg.threshold, seed=cfg.seed,
                                    progress_bar=False, cache_dir=cache)
  return ap, m.drop(columns=["indices"])


# ---------------------------------------------------------------------------
# Phenotypic activity.


def _describe_keys(keys: Sequence[str], n: int = 10) -> str:
  keys = list(keys)
  more = f" and {len(keys) - n} more" if len(keys) > n else ""
  return ", ".join(str(k) for k in keys[:n]) + more


def unreplicated(keys: np.ndarray, wells: np.ndarray,
                 plates: Optional[np.ndarray] = None) -> List[str]:
  """Keys (compound-doses) with fewer than two replicate profiles that may
  pair: profiles in two different wells (and, with `plates`, on two
  different plates). Sorted."""
  df = pd.DataFrame({"key": keys, "unit": wells if plates is None
                     else plates})
  n_units = df.groupby("key")["unit"].nunique()
  return sorted(str(k) for k in n_units.index[n_units < 2])


def phenotypic_activity(meta: pd.DataFrame, X: np.ndarray,
                        cfg: RetrievalConfig) -> Tuple[Dict, pd.DataFrame]:
  """mAP of every compound-dose's replicates against the reference rows."""
  if cfg.negatives not in ("plate", "all"):
    raise ValueError(f"negatives must be 'plate' or 'all', got {cfg.negatives!r}")
  pert, ctrl, desc = reference_groups(meta)
  sel = pert | ctrl
  m = meta.loc[sel].reset_index(drop=True)
  Xs = X[sel]
  is_ctrl = ctrl[sel]
  keys = perturbation_keys(m).astype(object)
  # Controls: a unique key each, so they never form positive pairs.
  keys[is_ctrl] = [f"__control_{i}" for i in range(int(is_ctrl.sum()))]
  cm = pd.DataFrame({"pert": keys, "negcon": is_ctrl.astype(np.int8),
                     "plate_key": normalize.plate_keys(m),
                     "well_key": _well_keys(m), "cell": _cell_keys(m)})
  pos_diffby = ["well_key"] + (["plate_key"] if cfg.exclude_same_plate else [])
  lacking = unreplicated(keys[~is_ctrl], cm["well_key"].to_numpy()[~is_ctrl],
                         cm["plate_key"].to_numpy()[~is_ctrl]
                         if cfg.exclude_same_plate else None)
  n_keys = len(np.unique(keys[~is_ctrl]))
  what = ("two plates" if cfg.exclude_same_plate else "two wells")
  if len(lacking) == n_keys:
    raise TaskError(
        f"task {ACTIVITY}: no compound-dose has replicates in {what} (the "
        f"mAP ranks a profile's replicates); all {n_keys} lack them: "
        f"{_describe_keys(lacking)}")
  neg_sameby = ["plate_key"] if cfg.negatives == "plate" else ["cell"]
  sim = PairCosine(Xs, is_ctrl, cm["plate_key"].to_numpy()
                   if cfg.negatives == "plate" else None)
  ap, mp = _map_with_pvalues(cm, sim, ["pert"], pos_diffby, neg_sameby,
                             ["negcon"], ~is_ctrl, ["pert"], cfg)
  # Per compound-dose: identifiers, replicate counts, mAP and p-values.
  first = m.loc[~is_ctrl].assign(pert=keys[~is_ctrl]).drop_duplicates("pert")
  cols = [c for c in ("cell_type", "treatment", "treatment_conc")
          if c in first]
  info = first.set_index("pert")[cols]
  n_rep = pd.Series(keys[~is_ctrl]).value_counts()
  table = info.join(mp.set_index("pert"), how="left")
  table.insert(len(cols), "n_replicates", n_rep.reindex(table.index).to_numpy())
  table = table.reset_index(names="key")
  table = table.sort_values("mean_average_precision", ascending=False,
                            na_position="last").reset_index(drop=True)
  scored = table["p_value"].notna()
  retrieved = table["below_corrected_p"].fillna(False).astype(bool)
  q = ap[ap["n_pos_pairs"] > 0]          # the queries that entered the mAP
  summary = {
      "profiles": f"{cfg.level}s",
      "reference": desc,
      "n_reference_profiles": int(is_ctrl.sum()),
      "n_perturbation_profiles": int((~is_ctrl).sum()),
      "n_compound_doses": int(len(table)),
      "n_scored": int(scored.sum()),
      "n_without_replicates": int((~scored).sum()),
      "without_replicates": lacking[:50],
      "without_replicates_note": (
          f"compound-doses without replicates in {what}: not scored, the "
          f"others are" + (f" (first 50 of {len(lacking)} listed)"
                           if len(lacking) > 50 else "")),
      "mean_map": float(table.loc[scored, "mean_average_precision"].mean()),
      "fraction_retrieved": float(retrieved[scored].mean()),
      "n_retrieved": int(retrieved.sum()),
      "median_positives_per_query": float(np.median(q["n_pos_pairs"])),
      "median_negatives_per_query": float(np.median(
          q["n_total_pairs"] - q["n_pos_pairs"])),
      "negatives": ("reference profiles on the query's plate"
                    if cfg.negatives == "plate" else
                    "every reference profile (same cell type)"),
      "guards": ("replicate pairs from the same well excluded" +
                 ("; replicate pairs from the same plate excluded"
                  if cfg.exclude_same_plate else "")),
      "p_value": f"copairs permutation null ({cfg.null_size} draws), "
                 f"Benjamini-Hochberg corrected; retrieved = corrected "
                 f"p < {cfg.threshold}",
      "distance": "cosine similarity",
  }
  return summary, table


def records(df: pd.DataFrame, cols: Sequence[str], n: int) -> List[Dict]:
  out = []
  for r in df[[c for c in cols if c in df]].head(n).to_dict("records"):
    out.append({k: (bool(v) if isinstance(v, (bool, np.bool_)) else v)
                for k, v in r.items()})
  return out


# ---------------------------------------------------------------------------
# Phenotypic consistency.


def consensus(meta: pd.DataFrame, X: np.ndarray, keys: np.ndarray
              ) -> Tuple[pd.DataFrame, np.ndarray]:
  """Mean profile per key (e.g. compound-dose); metadata of the first row."""
  return normalize.aggregate_rows(meta, X, keys)


def phenotypic_consistency(meta: pd.DataFrame, X: np.ndarray,
                           activity: Optional[pd.DataFrame],
                           cfg: RetrievalConfig) -> Tuple[Dict, pd.DataFrame]:
  """mAP of compounds sharing an annotation retrieving each other.

  One consensus profile per compound (and cell type): the mean of its
  replicates at its retrieved (active) doses, or at all doses with
  `consistency_on='all'`. Compounds without an annotation are left out.
  """
  col = cfg.annotation
  if col not in meta:
    raise TaskError(f"annotation column `{col}` not in the metadata (columns: "
                    f"{list(meta.columns)[:12]})")
  pert, _, _ = reference_groups(meta)
  keys = perturbation_keys(meta)
  sel = pert.copy()
  if cfg.consistency_on == "active":
    if activity is None:
      raise TaskError("consistency on active doses needs the activity mAP")
    active = set(activity.loc[activity["below_corrected_p"].fillna(False)
                              .astype(bool), "key"])
    sel &= np.isin(keys, list(active))
  elif cfg.consistency_on != "all":
    raise ValueError(f"consistency_on must be 'active' or 'all', got "
                     f"{cfg.consistency_on!r}")
  ann = meta[col].fillna("").astype(str).str.strip().to_numpy()
  sel &= ann != ""
  if not sel.any():
    raise TaskError(f"no {'active ' if cfg.consistency_on == 'active' else ''}"
                    f"compound has an annotation in `{col}`")
  m = meta.loc[sel].reset_index(drop=True)
  comp = m["treatment"].astype(str) + " [" + pd.Series(_cell_keys(m)) + "]"
  mc, Xc = consensus(m, X[sel], comp.to_numpy())
  cm = pd.DataFrame({"annotation": mc[col].astype(str).to_numpy(),
                     "cell": _cell_keys(mc)})
  n_per = cm.groupby(["annotation", "cell"])["annotation"].transform("size")
  keep = (n_per >= 2).to_numpy()
  if not keep.any():
    raise TaskError(f"no annotation in `{col}` is shared by two compounds "
                    f"({len(mc)} compounds)")
  if (~keep).all() or len(np.unique(cm["annotation"])) < 2:
    raise TaskError(f"consistency needs >= 2 annotation values in `{col}`")
  ap, mp = _map_with_pvalues(cm, PairCosine(Xc, np.zeros(len(Xc), bool)),
                             ["annotation", "cell"], [], ["cell"],
                             ["annotation"], keep, ["annotation", "cell"], cfg)
  n_comp = cm.groupby(["annotation", "cell"]).size().rename("n_compounds")
  table = mp.merge(n_comp.reset_index(), on=["annotation", "cell"], how="left")
  table = table.sort_values("mean_average_precision", ascending=False
                            ).reset_index(drop=True)
  retrieved = table["below_corrected_p"].fillna(False).astype(bool)
  summary = {
      "annotation_column": col,
      "profiles": ("compound consensus (mean of replicates at retrieved "
                   "doses)" if cfg.consistency_on == "active" else
                   "compound consensus (mean of all replicates)"),
      "n_compounds": int(len(mc)),
      "n_annotations": int(len(table)),
      "mean_map": float(table["mean_average_precision"].mean()),
      "fraction_retrieved": float(retrieved.mean()),
      "n_retrieved": int(retrieved.sum()),
      "negatives": "compounds with a different annotation (same cell type)",
  }
  return summary, table


# ---------------------------------------------------------------------------
# Replicate consistency (percent replicating).


def _unit_rows(X: np.ndarray) -> np.ndarray:
  X = np.asarray(X, dtype=np.float32)
  n = np.linalg.norm(X, axis=1, keepdims=True)
  return X / np.where(n > 0, n, 1.0)


def _median_pair_similarity(U: np.ndarray, wells: np.ndarray) -> float:
  """Median cosine over pairs of rows of U from different wells."""
  S = U @ U.T
  iu = np.triu_indices(len(U), 1)
  ok = wells[iu[0]] != wells[iu[1]]
  return float(np.median(S[iu][ok])) if ok.any() else np.nan


def percent_replicating(meta: pd.DataFrame, X: np.ndarray,
                        cfg: RetrievalConfig) -> Tuple[Dict, pd.DataFrame]:
  """Median replicate cosine per compound-dose vs a null of random groups.

  The null for a group of k replicates: `replicate_null` random groups of k
  profiles, each from a different compound-dose; a compound-dose
  *replicates* when its median similarity exceeds the null's 95th percentile.
  """
  pert, _, _ = reference_groups(meta, REPLICATES)
  m = meta.loc[pert].reset_index(drop=True)
  U = _unit_rows(X[pert])
  keys = perturbation_keys(m)
  wells = _well_keys(m)
  codes, uniq = pd.factorize(keys)
  order = np.argsort(codes, kind="stable")
  bounds = np.searchsorted(codes[order], np.arange(len(uniq) + 1))
  sizes = np.diff(bounds)
  n_wells = pd.Series(wells).groupby(codes).nunique().reindex(
      range(len(uniq))).to_numpy()
  obs = np.full(len(uniq), np.nan)
  for g in np.flatnonzero(n_wells >= 2):
    rows = order[bounds[g]:bounds[g + 1]]
    obs[g] = _median_pair_similarity(U[rows], wells[rows])
  rng = np.random.default_rng(cfg.seed)
  thresholds: Dict[int, float] = {}
  lacking = sorted(str(uniq[g]) for g in np.flatnonzero(n_wells < 2))
  if len(lacking) == len(uniq):
    raise TaskError(
        f"task {REPLICATES}: no compound-dose has replicates in two wells; "
        f"all {len(uniq)} lack them: {_describe_keys(lacking)}")
  if len(uniq) < 3:
    raise TaskError(f"task {REPLICATES}: needs >= 3 compound-doses for the "
                    f"null, got {len(uniq)}")
  for k in sorted(set(int(s) for s in sizes[n_wells >= 2])):
    k_eff = min(k, len(uniq))
    null = np.empty(cfg.replicate_null)
    for i in range(cfg.replicate_null):
      groups = rng.choice(len(uniq), size=k_eff, replace=False)
      pick = bounds[groups] + (rng.random(k_eff) * sizes[groups]).astype(int)
      rows = order[pick]
      null[i] = _median_pair_similarity(U[rows], np.arange(k_eff))
    thresholds[k] = float(np.quantile(null, 0.95))
  thr = np.array([thresholds.get(int(s), np.nan) for s in sizes])
  scored = np.isfinite(obs)
  rep = scored & (obs > thr)
  first = m.iloc[order[bounds[:-1]]].reset_index(drop=True)
  cols = [c for c in ("cell_type", "treatment", "treatment_conc") if c in first]
  table = first[cols].copy()
  table.insert(0, "key", uniq)
  table["n_replicates"] = sizes
  table["median_replicate_cosine"] = obs
  table["null_p95"] = thr
  table["replicating"] = rep
  table = table.sort_values("median_replicate_cosine", ascending=False,
                            na_position="last").reset_index(drop=True)
  summary = {
      "profiles": f"{cfg.level}s",
      "n_compound_doses": int(len(uniq)),
      "n_scored": int(scored.sum()),
      "percent_replicating": float(100.0 * rep[scored].mean())
                             if scored.any() else None,
      "percent_replicating_reason": None if scored.any() else
      "no compound-dose has replicates in two wells",
      "median_replicate_cosine": float(np.nanmedian(obs)) if scored.any()
                                 else None,
      "without_replicates": lacking[:50],
      "n_without_replicates": len(lacking),
      "null": f"{cfg.replicate_null} random groups per group size, each "
              f"profile from a different compound-dose; threshold = 95th "
              f"percentile",
      "null_p95_by_group_size": {str(k): v for k, v in thresholds.items()},
  }
  return summary, table


# ---------------------------------------------------------------------------
# Energy distance.


def _pairwise_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
  A = A.astype(np.float64)
  B = B.astype(np.float64)
  d2 = ((A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T)
  return np.sqrt(np.maximum(d2, 0.0))


def energy_distance(A: np.ndarray, B: np.ndarray) -> float:
  """Energy distance 2E|a-b| - E|a-a'| - E|b-b'| (V-statistic, Euclidean)."""
  return float(2.0 * _pairwise_dist(A, B).mean() - _pairwise_dist(A, A).mean()
               - _pairwise_dist(B, B).mean())


def _energy_from_sums(s_aa, s_ab, s_bb, n_a: int, n_b: int):
  return 2.0 * s_ab / (n_a * n_b) - s_aa / n_a ** 2 - s_bb / n_b ** 2


def energy_test(A: np.ndarray, B: np.ndarray, permutations: int,
                rng: np.random.Generator) -> Tuple[float, float]:
  """(energy distance, permutation p-value) of samples A vs B.

  p = (1 + #{permuted >= observed}) / (1 + permutations), labels permuted
  over the pooled rows. All permutations are scored at once from the pooled
  distance matrix: with indicator vectors m (rows in A), sum_AA = m'Dm,
  sum_AB = m'D1 - m'Dm, sum_BB = 1'D1 - 2 sum_AB - sum_AA.
  """
  Z = np.concatenate([A, B])
  D = _pairwise_dist(Z, Z)
  n, N = len(A), len(Z)
  M = np.zeros((permutations + 1, N))
  M[0, :n] = 1.0
  for i in range(permutations):
    M[i + 1, rng.permutation(N)[:n]] = 1.0
  DM = D @ M.T                                   # (N, P + 1)
  row = D.sum(axis=1)
  total = row.sum()
  s_aa = np.einsum("pi,ip->p", M, DM)
  s_ab = M @ row - s_aa
  s_bb = total - 2.0 * s_ab - s_aa
  e = _energy_from_sums(s_aa, s_ab, s_bb, n, N - n)
  hits = int((e[1:] >= e[0] - 1e-12).sum())
  return float(e[0]), float((hits + 1) / (permutations + 1))


def treatment_vs_control(meta: pd.DataFrame, X: np.ndarray,
                         compounds: Sequence[str], cfg: RetrievalConfig
                         ) -> Tuple[Dict, pd.DataFrame]:
  """Energy distance of each named compound-dose's profiles to the reference.

  Reference rows of the same cell type (at most `energy_max_controls`, a
  seeded subset); permutation p-value with `energy_permutations` draws.
  """
  pert, ctrl, desc = reference_groups(meta, REPLICATES)
  if not compounds:
    return {"status": "skipped", "reason": "no compounds named (--compounds)"
            }, pd.DataFrame()
  rng = np.random.default_rng(cfg.seed)
  treat = meta["treatment"].astype(str).to_numpy()
  keys = perturbation_keys(meta)
  cells = _cell_keys(meta)
  rows = []
  for c in compounds:
    for key in pd.unique(keys[pert & (treat == c)]):
      tr = np.flatnonzero(pert & (keys == key))
      cell = cells[tr[0]]
      ref = np.flatnonzero(ctrl & (cells == cell))
      if len(ref) < 2 or len(tr) < 1:
        continue
      if len(ref) > cfg.energy_max_controls:
        ref = np.sort(rng.choice(ref, cfg.energy_max_controls, replace=False))
      e, p = energy_test(X[tr], X[ref], cfg.energy_permutations, rng)
      conc = (float(meta["treatment_conc"].iloc[tr[0]])
              if "treatment_conc" in meta else None)
      rows.append({"treatment": c, "cell_type": cell, "treatment_conc": conc,
                   "n_profiles": int(len(tr)), "n_reference": int(len(ref)),
                   "energy_distance": e, "p_value": p})
  table = pd.DataFrame(rows)
  found = set(table["treatment"]) if len(table) else set()
  summary = {"reference": desc,
             "statistic": "energy distance 2E|t-c| - E|t-t'| - E|c-c'| "
                          "(Euclidean, V-statistic) between the "
                          "compound-dose's profiles and the reference of the "
                          "same cell type; p from a label permutation test "
                          f"({cfg.energy_permutations} draws)",
             "rows": table.to_dict("records"),
             "named_not_found": [c for c in compounds if c not in found]}
  return summary, table


__all__ = ["RetrievalConfig", "reference_groups", "perturbation_keys",
           "phenotypic_activity", "phenotypic_consistency",
           "percent_replicating", "energy_distance", "energy_test",
           "treatment_vs_control", "consensus", "records",
           "center_on_reference", "ACTIVITY",
           "REPLICATES"]
