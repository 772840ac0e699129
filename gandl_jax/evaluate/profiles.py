"""Profile tables written by other tools: CellProfiler / pycytominer
profiles (`Metadata_*` columns, features `Cells_*`, `Cytoplasm_*`,
`Nuclei_*`), detected by their column names, and any table (OpenPhenom,
DINO, ...) read through a column mapping and a feature regular expression
(`TableSpec`, gandl-evaluate's --table_columns / --feature_regex /
--negative_control). `io.read_embeddings_file` uses them.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

# CellProfiler / pycytominer profiles: feature columns by compartment prefix,
# and the Metadata_ columns read as ours when no mapping names them (the first
# present of each list wins).
CELLPROFILER_FEATURES = r"^(Cells|Cytoplasm|Nuclei)_"
CELLPROFILER_COLUMNS: Dict[str, Tuple[str, ...]] = {
    "plate": ("Metadata_Plate",),
    "well": ("Metadata_Well",),
    "site": ("Metadata_Site",),
    "experiment": ("Metadata_Batch",),
    "treatment": ("Metadata_broad_sample", "Metadata_pert_iname",
                  "Metadata_JCP2022", "Metadata_InChIKey", "Metadata_Compound",
                  "Metadata_Treatment", "Metadata_compound"),
    "treatment_conc": ("Metadata_mmoles_per_liter", "Metadata_Concentration",
                       "Metadata_concentration", "Metadata_dose"),
    "cell_type": ("Metadata_cell_type", "Metadata_CellType",
                  "Metadata_Cell_type"),
}
# Columns whose values mark negative controls (pycytominer conventions).
CELLPROFILER_CONTROL_COLUMNS = ("Metadata_control_type", "Metadata_pert_type")
CONTROL_VALUES = frozenset({"negcon", "control", "negative_control"})


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """How to read a profile table written by another tool.

  columns: (ours, theirs) pairs, e.g. (("plate", "Metadata_Plate"),); ours
    are our metadata names (`site_id`, `experiment`, `plate`, `well`, `site`,
    `treatment`, `treatment_conc`, `cell_type`, ...) or any new name.
  feature_regex: the feature columns (default: CellProfiler compartments).
  negative_control: treatment value marking negative-control rows (`DMSO`).
  """
  columns: Tuple[Tuple[str, str], ...] = ()
  feature_regex: Optional[str] = None
  negative_control: Optional[str] = None

  @classmethod
  def parse(cls, columns: Optional[str], feature_regex: Optional[str] = None,
            negative_control: Optional[str] = None) -> "TableSpec":
    """From `ours=theirs,ours=theirs` text (the --table_columns flag)."""
    pairs = []
    for item in (columns or "").split(","):
      item = item.strip()
      if not item:
        continue
      ours, sep, theirs = item.partition("=")
      if not sep or not ours.strip() or not theirs.strip() or \
          not ours.strip().isidentifier():
        raise ValueError(f"column mapping {item!r}: expected ours=theirs, "
                         f"e.g. plate=Metadata_Plate")
      pairs.append((ours.strip(), theirs.strip()))
    if feature_regex:
      try:
        re.compile(feature_regex)
      except re.error as e:
        raise ValueError(f"feature regex {feature_regex!r}: {e}") from e
    return cls(tuple(pairs), feature_regex or None, negative_control or None)


def profile_features(names: Sequence[str], spec: Optional[TableSpec]
                      ) -> Optional[List[str]]:
  """Feature columns of a profile table, or None when it is not one."""
  if spec is not None and spec.feature_regex:
    rx = re.compile(spec.feature_regex)
    cols = [c for c in names if rx.search(str(c))]
    if cols:
      return cols
  if spec is not None or any(str(c).startswith("Metadata_") for c in names):
    rx = re.compile(CELLPROFILER_FEATURES)
    cols = [c for c in names if rx.search(str(c))]
    if cols:
      return cols
  return None


def profile_metadata(meta: pd.DataFrame, path: str,
                      spec: Optional[TableSpec]) -> pd.DataFrame:
  """Our metadata columns from a profile table's own (mapping, then the
  CellProfiler defaults); other columns keep their names."""
  spec = spec or TableSpec()
  out = meta.copy()
  explicit = dict(spec.columns)
  for ours, theirs in explicit.items():
    if theirs not in meta:
      raise ValueError(f"{path}: mapped column `{theirs}` (for `{ours}`) not "
                       f"found; columns: {list(meta.columns)[:12]}")
    out[ours] = meta[theirs].values
  for ours, candidates in CELLPROFILER_COLUMNS.items():
    if ours in explicit or ours in out:
      continue
    for c in candidates:
      if c in meta:
        out[ours] = meta[c].values
        break
  if "well_type" not in out:
    if spec.negative_control is not None:
      if "treatment" not in out:
        raise ValueError(f"{path}: --negative_control needs a treatment "
                         f"column (map one: treatment=...)")
      neg = out["treatment"].astype(str).str.strip() == spec.negative_control
      if not neg.any():
        raise ValueError(f"{path}: no row has treatment "
                         f"{spec.negative_control!r} (the negative control)")
      out["well_type"] = np.where(neg, "negative_control", "treatment")
    else:
      for c in CELLPROFILER_CONTROL_COLUMNS:
        if c in meta:
          v = meta[c].fillna("").astype(str).str.strip().str.lower()
          out["well_type"] = np.where(v.isin(CONTROL_VALUES),
                                      "negative_control", "treatment")
          break
  if "site_id" in out:
    out["site_id"] = out["site_id"].astype(str)
    return out
  missing = [c for c in ("plate", "well") if c not in out]
  if missing:
    raise ValueError(f"{path}: profile table needs plate and well columns to "
                     f"identify its rows; missing {missing} (CellProfiler: "
                     f"Metadata_Plate, Metadata_Well; or map them: "
                     f"--table_columns plate=...,well=...)")
  if "experiment" not in out:
    out["experiment"] = os.path.basename(path).split(".")[0]
  if "site" not in out:
    out["site"] = 1
  out["well_id"] = (out["experiment"].astype(str) + "_" +
                    out["plate"].astype(str) + "_" + out["well"].astype(str))
  out["site_id"] = out["well_id"] + "_" + out["site"].astype(str)
  return out
