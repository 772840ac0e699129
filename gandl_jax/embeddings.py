"""The embeddings file format, and its only writer.

One row per site: `site_id`, the metadata columns (in the published order of
`gandl_jax.schema`), then float32 feature columns `f0000`, `f0001`, ...
Parquet carries the producer's facts in its key-value metadata (`gandl.*`
keys: layer, checkpoint step, ...); CSV is Recursion's layout (`site_id` +
features, unquoted). `gandl-export`, `gandl-features` and the tests write
through `Writer` (streaming) or `write` (a whole table); gandl-evaluate reads
these files and the other tools' layouts in `gandl_jax.evaluate.io`.

Every file is written under a temporary name and published when complete
(`gandl_jax.io.atomic_path`), local or gs://.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from absl import logging

from gandl_jax import io as gio
from gandl_jax import schema

FORMATS = ("parquet", "csv")
FEATURE_PREFIX = "f"
FEATURE_DIGITS = 4
ROWS_PER_GROUP = 8192           # Parquet row group size (rows buffered)

# Parquet key-value metadata. gandl-evaluate shows any `gandl.*` key; these
# two it reads by name.
META_KEY_LAYER = "gandl.layer"
META_KEY_STEP = "gandl.checkpoint_step"
# The plates a probe-selected checkpoint was chosen on (a JSON list of
# `{experiment}_{plate}` keys; gandl-export): gandl-evaluate leaves them out of
# the control task.
META_KEY_PROBE_PLATES = "gandl.probe_plates"


def feature_name(index: int) -> str:
  """Name of feature column `index`: `f0000` for 0 (more digits past 9999)."""
  return f"{FEATURE_PREFIX}{index:0{FEATURE_DIGITS}d}"


def feature_names(dim: int) -> List[str]:
  return [feature_name(i) for i in range(dim)]


def output_format(path: str, fmt: Optional[str] = None) -> str:
  """`fmt`, or the format implied by the file name (.csv / .csv.gz: csv)."""
  if fmt:
    if fmt not in FORMATS:
      raise ValueError(f"embeddings format must be one of {FORMATS}, got "
                       f"{fmt!r}")
    return fmt
  return "csv" if str(path).endswith((".csv", ".csv.gz")) else "parquet"


def metadata_order(columns: Sequence[str],
                   dataset: Optional[str] = None) -> List[str]:
  """`site_id` first, then the published order of `dataset` (or of both
  datasets), then any other column by name."""
  columns = list(columns)
  order = list(schema.COLUMNS.get(dataset or "", ())) or [
      c for cols in schema.COLUMNS.values() for c in cols]
  ranked = [c for c in dict.fromkeys(order) if c in columns]
  ranked += sorted(c for c in columns if c not in ranked)
  return ["site_id"] + [c for c in ranked if c != "site_id"]


def _text(values: np.ndarray) -> List[Optional[str]]:
  """Strings; None and float NaN (pandas' missing text) become nulls."""
  out = []
  for v in values.tolist():
    if v is None or (isinstance(v, float) and math.isnan(v)):
      out.append(None)
    else:
      out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
  return out


def metadata_array(values: Any, name: str) -> pa.Array:
  """One metadata column as Arrow, typed by `schema.column_type`."""
  values = np.asarray(values)
  if values.ndim > 1:
    raise ValueError(f"metadata column {name!r} is not one value per site "
                     f"(shape {values.shape})")
  kind = schema.column_type(name)
  if values.dtype.kind in "SUO":
    return pa.array(_text(values), pa.string())
  if kind == "int64":
    return pa.array(values.astype(np.int64), pa.int64())
  if kind == "float":
    if values.dtype == np.float32:  # back to the decimal of metadata.csv
      values = np.array([float(str(v)) for v in values], np.float64)
    return pa.array(values.astype(np.float64), pa.float64())
  return pa.array(values)


def _kv(file_metadata: Optional[Dict[str, Any]]) -> Dict[bytes, bytes]:
  return {str(k).encode(): str(v).encode()
          for k, v in (file_metadata or {}).items()}


def table_schema(meta_fields: Sequence[pa.Field], dim: int,
                 extra: Sequence[pa.Field] = (),
                 file_metadata: Optional[Dict[str, Any]] = None) -> pa.Schema:
  """Metadata fields, `dim` float32 features, then `extra` fields."""
  fields = list(meta_fields)
  fields += [pa.field(n, pa.float32()) for n in feature_names(dim)]
  fields += list(extra)
  return pa.schema(fields, metadata=_kv(file_metadata))


def _csv_writer(f, schema_: pa.Schema) -> pa_csv.CSVWriter:
  """Recursion's plain CSV: an unquoted header line, unquoted values (site ids
  hold no commas or quotes; Arrow refuses a value that would need quoting)."""
  f.write((",".join(schema_.names) + "\n").encode("utf-8"))
  return pa_csv.CSVWriter(f, schema_, write_options=pa_csv.WriteOptions(
      include_header=False, quoting_style="none"))


class _TableWriter:
  """Streams tables to a local Parquet or CSV file (buffered row groups)."""

  def __init__(self, path: str, schema_: pa.Schema, fmt: str):
    self.schema = schema_
    self._buffer: List[pa.Table] = []
    self._buffered = 0
    self.rows = 0
    self._file = None
    if fmt == "parquet":
      self._writer = pq.ParquetWriter(path, schema_)
    else:
      self._file = open(path, "wb")  # pylint: disable=consider-using-with
      self._writer = _csv_writer(self._file, schema_)

  def write(self, table: pa.Table) -> None:
    if table.num_rows == 0:
      return
    self._buffer.append(table)
    self._buffered += table.num_rows
    self.rows += table.num_rows
    if self._buffered >= ROWS_PER_GROUP:
      self.flush()

  def flush(self) -> None:
    if self._buffer:
      table = pa.concat_tables(self._buffer).cast(self.schema)
      self._writer.write_table(table)
      self._buffer, self._buffered = [], 0

  def close(self) -> None:
    try:
      self.flush()
      self._writer.close()
    finally:
      if self._file is not None:
        self._file.close()


class Writer:
  """Streaming writer of one embeddings file (use as a context manager).

    with embeddings.Writer(path, file_metadata={...}) as w:
      for batch in ...:
        w.write(meta_columns_dict, features)   # rows of this batch

  The schema is fixed by the first `write` (metadata columns and their
  types, feature dimension; columns in `dataset`'s published order); `extra`
  columns (e.g. a row key) follow the features. Nothing appears under `path` unless the block completes.

  The rows go to a temporary file next to `path`, removed when the block
  raises (SIGTERM too, where the command turns it into an exception); the
  temporary files of writers of `path` that were killed are removed when the
  next one starts (`remove_stale_temp_files`).
  """

  def __init__(self, path: str, fmt: Optional[str] = None,
               file_metadata: Optional[Dict[str, Any]] = None,
               extra: Sequence[pa.Field] = (), dataset: Optional[str] = None):
    self.path = str(path)
    self.dataset = dataset
    self.format = output_format(self.path, fmt)
    self.file_metadata = dict(file_metadata or {})
    self.extra = list(extra)
    self.columns: List[str] = []
    self.dim = 0
    self._stack = contextlib.ExitStack()
    self._tmp: Optional[str] = None
    self._writer: Optional[_TableWriter] = None

  def __enter__(self) -> "Writer":
    remove_stale_temp_files(self.path)
    lock = _Lock()
    self._stack.callback(lock.release)    # after the file is published
    try:
      self._tmp = self._stack.enter_context(gio.atomic_path(self.path))
      lock.acquire(self._tmp)
    except BaseException:
      self._stack.close()
      raise
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    try:
      if self._writer is not None:
        self._writer.close()
      if exc_type is None and self._writer is None:
        raise ValueError(f"{self.path}: no rows to write")
    except BaseException as e:  # publish nothing
      self._stack.__exit__(type(e), e, e.__traceback__)
      raise
    return bool(self._stack.__exit__(exc_type, exc, tb))

  @property
  def rows(self) -> int:
    return self._writer.rows if self._writer is not None else 0

  def write(self, meta: Dict[str, Any], features: np.ndarray,
            extra: Sequence[Any] = ()) -> None:
    """Appends rows: `meta` maps column -> values (site_id included),
    `features` is (rows, dim)."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
      raise ValueError(f"features must be (rows, dim), got {features.shape}")
    n = len(features)
    if not self.columns:
      if "site_id" not in meta:
        raise ValueError(f"{self.path}: rows carry no `site_id` (columns "
                         f"{sorted(meta)})")
      self.columns = metadata_order(meta, self.dataset)
    arrays = []
    for c in self.columns:
      if c not in meta:
        raise ValueError(f"{self.path}: metadata column {c!r} missing from a "
                         f"later batch")
      a = metadata_array(meta[c], c)
      if len(a) != n:
        raise ValueError(f"{self.path}: metadata column {c!r} has {len(a)} "
                         f"rows, features {n}")
      arrays.append(a)
    if self._writer is None:
      self.dim = features.shape[1]
      schema_ = table_schema([pa.field(c, a.type) for c, a in
                              zip(self.columns, arrays)], self.dim,
                             self.extra, self.file_metadata)
      self._writer = _TableWriter(self._tmp, schema_, self.format)
    elif features.shape[1] != self.dim:
      raise ValueError(f"{self.path}: feature dimension changed from "
                       f"{self.dim} to {features.shape[1]}")
    arrays += [pa.array(features[:, j]) for j in range(self.dim)]
    arrays += [pa.array(np.asarray(x)) for x in extra]
    self._writer.write(pa.Table.from_arrays(arrays,
                                            schema=self._writer.schema))


# The temporary file of a Writer (`io.atomic_path`'s `.NAME.tmp-XXXXXXXX.EXT`)
# is locked (flock) while its writer lives; the lock goes with the process,
# however it ends (SIGKILL included), so an unlocked one is a dead run's.


def _temp_dir(path: str) -> str:
  return (tempfile.gettempdir() if gio.is_remote(path)
          else os.path.dirname(os.path.abspath(path)))


def _temp_pattern(path: str) -> "re.Pattern[str]":
  name = os.path.basename(str(path))
  suffix = "".join(os.path.splitext(name)[1:])
  return re.compile(re.escape(f".{name}.tmp-") + r"[A-Za-z0-9_]{8}"
                    + re.escape(suffix))


class _Lock:
  """An exclusive lock on a file, held until `release`."""

  def __init__(self):
    self._fd: Optional[int] = None

  def acquire(self, path: str) -> None:
    self._fd = os.open(path, os.O_RDONLY)
    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def remove_stale_temp_files(path: str) -> List[str]:
  """Removes the temporary files of writers of `path` that died (killed
  before they could clean up); files of live writers (locked) and every
  other file are left alone. Returns the removed paths."""
  directory = _temp_dir(path)
  pattern = _temp_pattern(path)
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  removed = []
  for name in sorted(n for n in names if pattern.fullmatch(n)):
    tmp = os.path.join(directory, name)
    try:
      fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:     # a live writer holds it
      os.close(fd)
      continue
    try:
      os.remove(tmp)
      removed.append(tmp)
    except OSError:
      pass
    finally:
      os.close(fd)
  if removed:
    logging.info("removed %d temporary file(s) of earlier runs that were "
                 "stopped before finishing %s", len(removed), path)
  return removed


def write(path: str, meta: Any, features: np.ndarray,
          fmt: Optional[str] = None,
          file_metadata: Optional[Dict[str, Any]] = None,
          include_metadata: bool = True) -> None:
  """Writes a whole embeddings table: `meta` a DataFrame (or dict of
  columns) with `site_id`; `features` (rows, dim). With `include_metadata`
  False only `site_id` is kept (Recursion's layout)."""
  columns = list(meta.keys()) if isinstance(meta, dict) else list(meta.columns)
  if not include_metadata:
    columns = [c for c in columns if c == "site_id"]
  cols = {c: np.asarray(meta[c]) for c in columns}
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or any(len(v) != len(features) for v in cols.values()):
    raise ValueError(f"features must be (rows={len(next(iter(cols.values()), []))}"
                     f", dim), got {features.shape}")
  with Writer(path, fmt, file_metadata) as w:
    w.write(cols, features)


def write_table(path: str, table: pa.Table, fmt: Optional[str] = None) -> None:
  """Writes an Arrow table already in this layout (e.g. merged parts)."""
  fmt = output_format(path, fmt)
  with gio.atomic_path(path) as tmp:
    if fmt == "parquet":
      pq.write_table(table, tmp)
    else:
      with open(tmp, "wb") as f:
        writer = _csv_writer(f, table.schema)
        writer.write_table(table)
        writer.close()


def read_parquet(path: str) -> pa.Table:
  """A Parquet file, local or remote, as an Arrow table."""
  if gio.is_remote(path):
    return pq.read_table(pa.BufferReader(gio.read_bytes(path)))
  return pq.read_table(path)

