"""Comparison of recovered dose-response with planted truth (synthetic data).

`synthetic_truth.csv` holds one row per compound (optionally per cell type),
or is `gandl-synth`'s long layout (`kind, name, ..., parameter, value`, of
which the `compound` rows are used). Columns read (first alias found wins; case-insensitive):

* compound name: `treatment` | `compound`
* EC50 in uM: `ec50` | `ec50_um` | `ec50_uM`  (empty for compounds without one)
* role: `kind` | `effect` | `role` | `activity` with values such as `rescue` /
  `active` / `hit` (a true hit), `toxic`, `inactive` / `none`. Without a role
  column, a compound with a finite EC50 counts as a true hit.
* optional `cell_type` (then the comparison is per compound and cell type).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd
from scipy import stats

NAME_ALIASES = ("treatment", "compound")
EC50_ALIASES = ("ec50", "ec50_um", "ec50_uM")
ROLE_ALIASES = ("kind", "effect", "role", "activity")
HIT_ROLES = frozenset({"rescue", "active", "hit", "rescuer", "effective"})


def _col(df: pd.DataFrame, aliases) -> Optional[str]:
  lower = {c.lower(): c for c in df.columns}
  for a in aliases:
    if a.lower() in lower:
      return lower[a.lower()]
  return None


def _from_long(df: pd.DataFrame) -> pd.DataFrame:
  """`gandl-synth`'s long layout (kind, name, ..., parameter, value; one row
  per planted parameter) -> one row per compound with `compound`, `role` and
  `ec50_uM` columns."""
  rows = df[df["kind"] == "compound"]
  wide = rows.pivot_table(index="name", columns="parameter", values="value",
                          aggfunc="first")
  out = pd.DataFrame({"compound": wide.index.astype(str)})
  out["role"] = wide["role"].to_numpy() if "role" in wide else ""
  out["ec50_uM"] = (pd.to_numeric(wide["ec50_uM"], errors="coerce").to_numpy()
                    if "ec50_uM" in wide else np.nan)
  return out


def read_truth(path: str) -> pd.DataFrame:
  """Normalized truth table: treatment, [cell_type], true_ec50, true_hit, role."""
  df = pd.read_csv(path, keep_default_na=True)
  if {"kind", "name", "parameter", "value"} <= set(df.columns):
    df = _from_long(df)
  name = _col(df, NAME_ALIASES)
  if name is None:
    raise ValueError(f"{path}: truth file needs a compound column "
                     f"({' or '.join(NAME_ALIASES)}); got {list(df.columns)}")
  ec = _col(df, EC50_ALIASES)
  role = _col(df, ROLE_ALIASES)
  out = pd.DataFrame({"treatment": df[name].astype(str)})
  if "cell_type" in df:
    out["cell_type"] = df["cell_type"].astype(str)
  out["true_ec50"] = (pd.to_numeric(df[ec], errors="coerce") if ec
                      else np.nan)
  if role:
    out["role"] = df[role].fillna("").astype(str).str.lower()
    out["true_hit"] = out["role"].isin(HIT_ROLES)
  elif ec:
    out["role"] = np.where(np.isfinite(out["true_ec50"]), "rescue", "")
    out["true_hit"] = np.isfinite(out["true_ec50"])
  else:
    raise ValueError(f"{path}: truth file needs an EC50 column "
                     f"({' or '.join(EC50_ALIASES)}) or a role column "
                     f"({' or '.join(ROLE_ALIASES)})")
  return out


def compare(fits: pd.DataFrame, truth: pd.DataFrame) -> Dict:
  """Rank correlation of EC50s and hit recovery.

  `fits`: from dose_response.fit_all (`group` = cell type). Without a truth
  `cell_type` column the fit of each compound with the most sites is used.
  """
  f = fits.copy()
  if "cell_type" in truth:
    f["cell_type"] = f["group"]
    merged = truth.merge(f, on=["treatment", "cell_type"], how="left")
  else:
    f = f.sort_values("n_sites", ascending=False).drop_duplicates("treatment")
    merged = truth.merge(f, on="treatment", how="left")
  found = merged["flag"].notna()
  out: Dict = {"n_truth_compounds": int(len(truth)),
               "n_matched": int(found.sum())}
  if not found.all():
    out["unmatched_compounds"] = merged.loc[~found, "treatment"].tolist()[:20]
  pred_hit = merged["hit"].fillna(False).astype(bool).to_numpy()
  true_hit = merged["true_hit"].astype(bool).to_numpy()
  tp = int((pred_hit & true_hit).sum())
  out["true_hits"] = int(true_hit.sum())
  out["predicted_hits"] = int(pred_hit.sum())
  out["hits_found"] = tp
  out["hit_recall"] = tp / int(true_hit.sum()) if true_hit.any() else None
  if not true_hit.any():
    out["hit_recall_reason"] = "truth lists no active compound"
  out["hit_precision"] = tp / int(pred_hit.sum()) if pred_hit.any() else None
  if not pred_hit.any():
    out["hit_precision_reason"] = "no compound called a hit"
  out["missed_hits"] = merged.loc[true_hit & ~pred_hit, "treatment"].tolist()[:20]
  out["false_hits"] = merged.loc[~true_hit & pred_hit, "treatment"].tolist()[:20]
  te = pd.to_numeric(merged["true_ec50"], errors="coerce").to_numpy(np.float64)
  fe = pd.to_numeric(merged["ec50"], errors="coerce").to_numpy(np.float64)
  both = np.isfinite(te) & np.isfinite(fe) & true_hit
  out["n_ec50_pairs"] = int(both.sum())
  if both.sum() >= 3:
    rho = stats.spearmanr(te[both], fe[both]).statistic
    out["ec50_spearman"] = float(rho) if np.isfinite(rho) else None
    if not np.isfinite(rho):
      out["ec50_spearman_reason"] = "constant EC50s"
    out["ec50_median_abs_log10_error"] = float(
        np.median(np.abs(np.log10(fe[both]) - np.log10(te[both]))))
  else:
    out["ec50_spearman"] = None
    out["ec50_spearman_reason"] = (f"{int(both.sum())} compound(s) with both "
                                   f"a true and a recovered EC50; needs >= 3")
    out["ec50_median_abs_log10_error"] = None
  out["table"] = [
      {"treatment": r.treatment, "role": r.role,
       "true_ec50": _f(r.true_ec50), "ec50": _f(r.ec50),
       "flag": r.flag if isinstance(r.flag, str) else "not tested",
       "efficacy": _f(r.efficacy), "hit": bool(r.hit) if r.hit == r.hit and
       r.hit is not None else False,
       "reason": "; ".join(x for x in (
           "" if _f(r.true_ec50) is not None else "no planted EC50",
           "" if _f(r.ec50) is not None else
           f"no recovered EC50 ({r.flag if isinstance(r.flag, str) else 'not tested'})")
           if x)}
      for r in merged.itertuples()]
  return out


def _f(v) -> Optional[float]:
  try:
    v = float(v)
  except (TypeError, ValueError):
    return None
  return v if np.isfinite(v) else None
