"""Reading site embeddings in every layout gandl-evaluate accepts (the writer
of our own layout is `gandl_jax.embeddings`).

Layouts (detected from the column names):

* ours (written by `gandl-export`): Parquet or CSV with `site_id`, the
  metadata columns of `gandl_jax.schema` and feature columns named
  `FEATURE_PREFIX + zero-padded index` (`f0000`, `f0001`, ...);
* Recursion's `embeddings.csv`: `site_id` followed by numbered columns
  (`0`, `1`, ... or `Unnamed: k`), with or without a header line;
* Recursion's newer per-experiment CSVs: `feature_0` ... `feature_1023` plus
  plate/well columns (and `site_id` or enough columns to build it). A
  directory or a comma-separated list of such files is read as one table;
* profile tables from other tools (`profiles.TableSpec`): CellProfiler / pycytominer
  profiles (`Metadata_*` columns, features `Cells_*`, `Cytoplasm_*`,
  `Nuclei_*`), detected by their column names, and any table (OpenPhenom,
  DINO, ...) through a column mapping and a feature regular expression.

Features are joined to `metadata.csv` by `site_id`; rows whose `site_id` is not
in the metadata, duplicated rows and rows with missing (NaN / empty) feature
values are dropped and counted in `Embeddings.issues`. Feature columns without
a finite value (an empty CellProfiler measurement) or with one constant value
are dropped first and named there, so that they cost no row.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from gandl_jax import embeddings
from gandl_jax import schema
from gandl_jax.evaluate.profiles import (  # noqa: F401 (TableSpec: the API)
    TableSpec, profile_features, profile_metadata)

_OURS = re.compile(rf"^{embeddings.FEATURE_PREFIX}(\d+)$")
_RECURSION_NEW = re.compile(r"^feature_(\d+)$")
_NUMBERED = re.compile(r"^(?:Unnamed: )?(\d+)$")
_SITE_ID = re.compile(r"^[^_,]+_\d+_[A-Za-z]+\d+_\d+$")
# Columns of Recursion's per-experiment CSVs that are not features.
_ID_COLUMNS = ("site_id", "well_id", "experiment", "plate", "well", "site")

@dataclasses.dataclass
class Embeddings:
  """Site (or well) embeddings with their metadata, rows aligned.

  meta: one row per embedding; `site_id` plus the metadata columns.
  features: float32 array (rows, dim).
  issues: human-readable notes on what was dropped or repaired while loading.
  feature_names: the file's names of the feature columns (when read from a
    file), for messages.
  """
  meta: pd.DataFrame
  features: np.ndarray
  source: str = ""
  issues: List[str] = dataclasses.field(default_factory=list)
  file_metadata: Dict[str, str] = dataclasses.field(default_factory=dict)
  feature_names: Optional[List[str]] = None

  def __post_init__(self):
    if len(self.meta) != len(self.features):
      raise ValueError(
          f"{self.source or 'embeddings'}: {len(self.meta)} metadata rows but "
          f"{len(self.features)} feature rows")

  @property
  def dim(self) -> int:
    return int(self.features.shape[1])

  def subset(self, mask: np.ndarray) -> "Embeddings":
    return Embeddings(self.meta.loc[mask].reset_index(drop=True),
                      self.features[mask], self.source, list(self.issues),
                      dict(self.file_metadata))


# ---------------------------------------------------------------------------
# Column classification.


def _feature_index(name: str) -> Optional[int]:
  for pattern in (_OURS, _RECURSION_NEW, _NUMBERED):
    m = pattern.match(str(name))
    if m:
      return int(m.group(1))
  return None


def feature_columns(columns: Sequence[str], source: str = "") -> List[str]:
  """The feature columns among `columns`, ordered by their index.

  Raises ValueError when there are none or when two naming schemes mix.
  """
  found = {}
  kinds = set()
  # A pandas index written to CSV shows up as `Unnamed: 0`; when properly
  # numbered columns exist, `Unnamed: k` columns are not features.
  has_plain = any(_feature_index(c) is not None and
                  not str(c).startswith("Unnamed") for c in columns)
  for c in columns:
    idx = _feature_index(c)
    if idx is None or c in _ID_COLUMNS:
      continue
    if has_plain and str(c).startswith("Unnamed"):
      continue
    kind = ("ours" if _OURS.match(c) else
            "feature_" if _RECURSION_NEW.match(c) else "numbered")
    kinds.add(kind)
    found[idx] = c
  if not found:
    raise ValueError(
        f"{source}: no feature columns found; expected `{embeddings.feature_name(0)}, "
        f"{embeddings.feature_name(1)}, ...` (gandl-export), `feature_0, feature_1, ...` "
        f"or numbered columns after `site_id` (Recursion), CellProfiler "
        f"`Cells_/Cytoplasm_/Nuclei_` columns, or name them with "
        f"--feature_regex; got columns {list(columns)[:8]}...")
  if len(kinds) > 1:
    raise ValueError(f"{source}: feature columns mix naming schemes {sorted(kinds)}")
  return [found[i] for i in sorted(found)]


def _missing_indices(cols: Sequence[str]) -> List[int]:
  idx = sorted(_feature_index(c) for c in cols)
  present = set(idx)
  return [i for i in range(idx[-1] + 1) if i not in present]


# ---------------------------------------------------------------------------
# Reading.


def _expand_paths(path: Union[str, Sequence[str]]) -> List[str]:
  if not isinstance(path, str):
    out = []
    for p in path:
      out.extend(_expand_paths(p))
    return out
  if "," in path and not os.path.exists(path):
    return _expand_paths([p for p in path.split(",") if p])
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.parquet")) +
                   glob.glob(os.path.join(path, "*.csv")) +
                   glob.glob(os.path.join(path, "*.csv.gz")))
    if not files:
      raise FileNotFoundError(f"{path}: directory holds no .parquet or .csv files")
    return files
  if any(ch in path for ch in "*?["):
    files = sorted(glob.glob(path))
    if not files:
      raise FileNotFoundError(f"{path}: no file matches")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: embeddings file not found")
  return [path]


def _is_parquet(path: str) -> bool:
  return path.endswith((".parquet", ".pq"))


# Text per parsing block of Arrow's CSV reader (the unit of its
# multithreading, and of the record batches the features are copied from).
CSV_BLOCK_BYTES = 8 << 20
_TEXT_COLUMNS = ("site_id", "well_id", "well", "experiment", "cell_type",
                 "disease_condition", "treatment", "SMILES", "dataset",
                 "well_type", "sirna")


def _csv_header(path: str) -> Tuple[List[str], bool]:
  """(column names, headerless) of a CSV: a first line that looks like data
  (`site_id` then numbers) is no header."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    try:
      header = next(reader)
    except StopIteration as e:
      raise ValueError(f"{path}: empty file") from e
  headerless = bool(header) and bool(_SITE_ID.match(header[0])) and all(
      _is_float(v) for v in header[1:])
  if headerless:
    return ["site_id"] + [str(i) for i in range(len(header) - 1)], True
  return [h if h else f"Unnamed: {i}" for i, h in enumerate(header)], False


def _read_csv(path: str, names: List[str], headerless: bool,
              feats: Sequence[str]) -> Tuple[pa.Table, np.ndarray]:
  """(the other columns as an Arrow table, the features as C-ordered float32
  (rows, len(feats)) with empty values as NaN) of a CSV (gzip by its
  `.gz` name).

  pyarrow's reader parses the file with the feature columns typed float32
  and the id columns as text; the features then go into one row-major
  matrix a record batch at a time, each batch freed once copied, so the
  peak is about one float32 copy of the features, not two.
  """
  types = {n: pa.float32() for n in feats}
  for n in names:
    if n in _TEXT_COLUMNS:
      types[n] = pa.string()
  read = pa_csv.ReadOptions(column_names=names,
                            skip_rows=0 if headerless else 1,
                            block_size=CSV_BLOCK_BYTES)
  convert = pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True)
  try:
    table = pa_csv.read_csv(path, read_options=read, convert_options=convert)
  except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
    raise ValueError(f"{path}: cannot parse as an embeddings CSV: {e}") from e
  fset = set(feats)
  meta = table.select([n for n in names if n not in fset])
  batches = table.select(list(feats)).to_batches()
  del table
  X = np.empty((meta.num_rows, len(feats)), dtype=np.float32)
  batches.reverse()
  n = 0
  while batches:
    batch = batches.pop()
    X[n:n + batch.num_rows] = np.asarray(
        batch.to_tensor(null_to_nan=True, row_major=True))
    n += batch.num_rows
    del batch
  return meta, X


def _is_float(v: str) -> bool:
  try:
    float(v)
    return True
  except ValueError:
    return False


class _ParquetColumns:
  """Reads a Parquet file's columns on demand (bounded memory: one block of
  columns at a time instead of the whole table)."""

  def __init__(self, pfile: pq.ParquetFile):
    self._f = pfile
    self.column_names = list(pfile.schema_arrow.names)
    self.num_rows = pfile.metadata.num_rows

  def select(self, names: Sequence[str]) -> pa.Table:
    return self._f.read(columns=list(names))


def _table_to_matrix(table, cols: Sequence[str]) -> np.ndarray:
  """Feature columns -> C-ordered float32 (rows, dim), nulls as NaN."""
  n = table.num_rows
  out = np.empty((n, len(cols)), dtype=np.float32)
  block = 64
  for start in range(0, len(cols), block):
    names = cols[start:start + block]
    part = table.select(names)
    tmp = np.empty((len(names), n), dtype=np.float32)
    for j, c in enumerate(names):
      col = part.column(c)
      if col.type != pa.float32():
        try:
          col = col.cast(pa.float32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
          raise ValueError(f"feature column `{c}` is not numeric "
                           f"({col.type}): {e}") from e
      tmp[j] = col.to_numpy(zero_copy_only=False)
    out[:, start:start + len(names)] = tmp.T
  return out


def _site_ids_from_columns(df: pd.DataFrame, path: str) -> Optional[pd.Series]:
  """Build `site_id` for Recursion's per-experiment CSVs when it is absent."""
  if "site_id" in df:
    return df["site_id"].astype(str)
  if "well_id" in df and "site" in df:
    return df["well_id"].astype(str) + "_" + df["site"].astype(str)
  if {"plate", "well", "site"} <= set(df.columns):
    if "experiment" in df:
      exp = df["experiment"].astype(str)
    else:
      stem = os.path.basename(path).split(".")[0]
      exp = pd.Series([stem] * len(df), index=df.index)
    return (exp + "_" + df["plate"].astype(int).astype(str) + "_" +
            df["well"].astype(str) + "_" + df["site"].astype(int).astype(str))
  return None


def read_embeddings_file(path: Union[str, Sequence[str]],
                         spec: Optional[TableSpec] = None) -> Embeddings:
  """Reads one or more embedding files (no metadata join yet)."""
  paths = _expand_paths(path)
  metas, feats, issues = [], [], []
  file_meta: Dict[str, str] = {}
  cols_ref = None
  for p in paths:
    if _is_parquet(p):
      try:
        pfile = pq.ParquetFile(p)
      except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{p}: not a readable Parquet file: {e}") from e
      kv = pfile.schema_arrow.metadata or {}
      for k, v in kv.items():
        if k.startswith(b"gandl."):
          file_meta[k.decode()] = v.decode()
      table = _ParquetColumns(pfile)
      names = table.column_names
    else:
      names, headerless = _csv_header(p)
    profile_cols = profile_features(names, spec)
    if profile_cols is not None:
      cols, missing = profile_cols, []
    else:
      cols = feature_columns(names, p)
      missing = _missing_indices(cols)
    if missing:
      issues.append(
          f"{p}: {len(missing)} feature column(s) missing from the numbering "
          f"(first: {missing[:5]}); using the {len(cols)} present")
    if cols_ref is not None and len(cols) != len(cols_ref):
      raise ValueError(f"{p}: {len(cols)} feature columns, but {paths[0]} has "
                       f"{len(cols_ref)}")
    cols_ref = cols_ref or cols
    if _is_parquet(p):
      X = _table_to_matrix(table, cols)
      other = [c for c in names if c not in set(cols)]
      table = table.select(other) if other else None
    else:
      table, X = _read_csv(p, names, headerless, cols)
    meta = table.to_pandas() if table is not None and table.num_columns \
        else pd.DataFrame(index=range(len(X)))
    del table
    if profile_cols is not None or "site_id" in meta.columns and (
        spec is not None or any(str(c).startswith("Metadata_")
                                for c in meta.columns)):
      # Profile tables, and embeddings with site ids and CellProfiler
      # columns (ours of a Cell Painting set: gandl-convert --dataset
      # loaddata carries its CSV's Metadata_* columns): CellProfiler names
      # and --table_columns read as ours.
      meta = profile_metadata(meta, p, spec)
    sid = _site_ids_from_columns(meta, p)
    if sid is None:
      raise ValueError(
          f"{p}: no `site_id` column and no (`well_id`, `site`) or "
          f"(`plate`, `well`, `site`) columns to build it from")
    meta["site_id"] = sid.values
    metas.append(meta)
    feats.append(X)
  meta = pd.concat(metas, ignore_index=True) if len(metas) > 1 else metas[0]
  X = np.concatenate(feats) if len(feats) > 1 else feats[0]
  return Embeddings(meta, X, ",".join(paths), issues, file_meta,
                    [str(c) for c in cols_ref])


def read_metadata(path: str) -> pd.DataFrame:
  """metadata.csv (RxRx19a or RxRx1 columns) with typed columns, text as ''."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: metadata file not found")
  df = pd.read_csv(path, dtype=str, keep_default_na=False)
  if "site_id" not in df:
    raise ValueError(f"{path}: metadata has no `site_id` column "
                     f"(expected columns {schema.RXRX19A_COLUMNS})")
  return _type_metadata(df, path)


def _type_metadata(df: pd.DataFrame, source: str) -> pd.DataFrame:
  df = df.copy()
  for c in df.columns:
    if c in schema.INT_COLUMNS:
      vals = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
      if c == "plate" and vals.isna().any() and (df[c].astype(str) != "").all():
        # Named plates (CellProfiler barcodes such as BR00116991).
        df[c] = df[c].astype(str)
        continue
      if vals.isna().any():
        bad = df[c][vals.isna()].iloc[0]
        raise ValueError(f"{source}: column `{c}` must be an integer, got {bad!r}")
      df[c] = vals.astype(np.int64)
    elif c in schema.FLOAT_COLUMNS:
      vals = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
      df[c] = vals.astype(np.float64)
    elif c != "site_id" and (df[c].dtype == object or
                             pd.api.types.is_string_dtype(df[c])):
      df[c] = df[c].fillna("").astype(str)
  df["site_id"] = df["site_id"].astype(str)
  return df


def _parse_site_ids(site_ids: pd.Series) -> pd.DataFrame:
  parts = site_ids.str.rsplit("_", n=3, expand=True)
  if parts.shape[1] != 4:
    return pd.DataFrame(index=site_ids.index)
  # Fields holding "_" or "%" are percent-encoded (schema.join_id).
  decoded = {k: parts[i].map(schema.decode_id_field, na_action="ignore")
             for k, i in (("experiment", 0), ("well", 2))}
  out = pd.DataFrame(decoded)
  out["plate"] = pd.to_numeric(parts[1], errors="coerce")
  out["site"] = pd.to_numeric(parts[3], errors="coerce")
  if out[["plate", "site"]].isna().any().any():
    return pd.DataFrame(index=site_ids.index)
  out["plate"] = out["plate"].astype(np.int64)
  out["site"] = out["site"].astype(np.int64)
  out["well_id"] = parts[0] + "_" + parts[1] + "_" + parts[2]
  return out


def _nonfinite_rows(X: np.ndarray, block: int = 32768) -> np.ndarray:
  """Rows holding a NaN or infinite value (checked in row blocks: no
  boolean copy of the whole matrix)."""
  out = np.zeros(len(X), dtype=bool)
  for s in range(0, len(X), block):
    out[s:s + block] = ~np.isfinite(X[s:s + block]).all(axis=1)
  return out


def _uninformative_columns(X: np.ndarray, block: int = 8192) -> np.ndarray:
  """Columns without two different finite values: no finite value at all
  (an empty CellProfiler measurement) or one constant value. Checked in row
  blocks; with fewer than 2 rows only columns without a finite value."""
  lo = np.full(X.shape[1], np.nan)
  hi = np.full(X.shape[1], np.nan)
  for s in range(0, len(X), block):
    b = X[s:s + block]
    b = np.where(np.isfinite(b), b, np.nan)
    lo = np.fmin(lo, np.fmin.reduce(b, axis=0))
    hi = np.fmax(hi, np.fmax.reduce(b, axis=0))
  empty = np.isnan(lo)
  if len(X) < 2:
    return empty
  return empty | (lo == hi)


def drop_uninformative_columns(emb: Embeddings) -> Embeddings:
  """`emb` without its empty (no finite value) and constant feature
  columns, named in `issues`: such a column carries nothing, and one empty
  column would otherwise drop every row as non-finite. ValueError when no
  column is left."""
  X = emb.features
  if not len(X) or not X.shape[1]:
    return emb
  bad = _uninformative_columns(X)
  if not bad.any():
    return emb
  names = emb.feature_names or [f"feature {i}" for i in range(X.shape[1])]
  idx = np.flatnonzero(bad)
  if bad.all():
    raise ValueError(f"{emb.source}: every one of the {X.shape[1]} feature "
                     f"columns is empty (no finite value) or constant over "
                     f"the {len(X)} rows")
  issues = list(emb.issues)
  finite_any = np.array([np.isfinite(X[:, i]).any() for i in idx])
  for label, sel in (("empty (no finite value)", ~finite_any),
                     ("constant", finite_any)):
    cols = [names[i] for i in idx[sel]]
    if cols:
      shown = ", ".join(cols[:10]) + (f" and {len(cols) - 10} more"
                                      if len(cols) > 10 else "")
      issues.append(f"{emb.source}: {len(cols)} {label} feature column(s) "
                    f"dropped, rows kept: {shown}")
  keep = ~bad
  return Embeddings(emb.meta, np.ascontiguousarray(X[:, keep]), emb.source,
                    issues, emb.file_metadata,
                    [n for n, k in zip(names, keep) if k]
                    if emb.feature_names else None)


def join_metadata(emb: Embeddings, metadata: Optional[pd.DataFrame],
                  metadata_source: str = "metadata") -> Embeddings:
  """Aligns `emb` with `metadata` by site_id; drops and counts bad rows.

  Without `metadata` the embeddings file's own metadata columns are used;
  experiment/plate/well/site are parsed from `site_id` where absent.
  """
  emb = drop_uninformative_columns(emb)
  issues = list(emb.issues)
  meta = emb.meta
  X = emb.features
  keep = np.ones(len(meta), dtype=bool)
  sid = meta["site_id"].astype(str)

  dup = sid.duplicated(keep="first").to_numpy()
  if dup.any():
    issues.append(f"{emb.source}: {int(dup.sum())} duplicated site_id row(s) "
                  f"dropped (first occurrence kept)")
    keep &= ~dup

  nan_rows = _nonfinite_rows(X)
  if nan_rows.any():
    issues.append(f"{emb.source}: {int(nan_rows.sum())} row(s) with missing, NaN "
                  f"or infinite feature values dropped")
    keep &= ~nan_rows

  if metadata is not None:
    md = metadata
    if md["site_id"].duplicated().any():
      n = int(md["site_id"].duplicated().sum())
      issues.append(f"{metadata_source}: {n} duplicated site_id row(s); first kept")
      md = md.drop_duplicates("site_id", keep="first")
    index = pd.Index(md["site_id"].astype(str))
    pos = index.get_indexer(sid)
    unknown = (pos < 0) & keep
    if unknown.any():
      examples = sid[unknown].iloc[:3].tolist()
      issues.append(f"{emb.source}: {int(unknown.sum())} site_id(s) not in "
                    f"{metadata_source} dropped (e.g. {examples})")
      keep &= pos >= 0
    pos_kept = pos[keep]
    missing = len(md) - len(np.unique(pos_kept))
    if missing:
      issues.append(f"{metadata_source}: {missing} site(s) have no embedding")
    new_meta = md.iloc[pos_kept].reset_index(drop=True)
  else:
    new_meta = _type_metadata(meta.loc[keep].reset_index(drop=True), emb.source)
    parsed = _parse_site_ids(new_meta["site_id"])
    for c in parsed.columns:
      if c not in new_meta:
        new_meta[c] = parsed[c].values
  if keep.all():
    new_X = X
  else:
    new_X = X[keep]
  return Embeddings(new_meta, new_X, emb.source, issues, emb.file_metadata,
                    emb.feature_names)


def load_embeddings(path: Union[str, Sequence[str]],
                    metadata: Optional[Union[str, pd.DataFrame]] = None,
                    spec: Optional[TableSpec] = None) -> Embeddings:
  """Reads embeddings (any layout) and joins them to metadata by site_id."""
  emb = read_embeddings_file(path, spec)
  if isinstance(metadata, str):
    md, src = read_metadata(metadata), metadata
  elif metadata is not None:
    md, src = _type_metadata(metadata, "metadata"), "metadata"
  else:
    md, src = None, ""
  return join_metadata(emb, md, src)

