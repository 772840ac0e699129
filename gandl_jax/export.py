"""Discriminator embeddings for every site of a set of shards (gandl-export).

  from gandl_jax import export
  export.export_embeddings("runs/rxrx19a-256", "shards/rxrx19a-256",
                           "embeddings.parquet", layer="fc", batch=64)

The checkpoint is restored through the public model API (`gandl_jax.load`);
D runs data-parallel over every device of the mesh (the global batch split on
the `data` axis, every host feeding its part). Sites come from
`pipeline.eval_batches`: every site once, in the shards' order, no
augmentation, the last batch padded (padding rows are dropped here).

Output: one row per site, `site_id`, the metadata columns, then the feature
columns named as `gandl_jax.evaluate.io` reads them (`f0000`, ...). Parquet
carries the export's facts in its key-value metadata (`gandl.*` keys: layer,
checkpoint step, model config, source shards, batch size, minibatch-stddev
group); `fmt="csv"` writes Recursion's layout (`site_id` + features).

Minibatch stddev: D's features for a site depend weakly on the other sites of
its minibatch-stddev group. Batches are fixed (B consecutive sites in shard
order, B / hosts from each host's files; groups formed over the whole global
batch as `Model.embed` does), so the output is a deterministic function of
checkpoint, shards, filter, B and the number of hosts, independent of the
number of devices per host.

Several hosts: each host writes its rows to `OUTPUT.part-{process_index}`;
after a barrier process 0 merges them in global order into OUTPUT and removes
the parts, so OUTPUT must be on storage every host sees (gs://, NFS).
Every file is written to a temporary name first and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import jax
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from absl import logging

from gandl_jax import api
from gandl_jax import parallel
from gandl_jax import schema
from gandl_jax.evaluate import io as emb_io

FORMATS = ("parquet", "csv")
DEFAULT_BATCH = 64
ROW_COLUMN = "_gandl_index"      # global order key, only inside part files
PART_SUFFIX = ".part-{index}"
ROWS_PER_GROUP = 8192           # Parquet row group size (rows buffered)

# Parquet key-value metadata written by the exporter. `gandl.layer` and
# `gandl.checkpoint_step` are the keys gandl-evaluate reads (evaluate/io.py).
META_LAYER = str(emb_io.META_KEY_LAYER)
META_STEP = str(emb_io.META_KEY_STEP)
META_KIMG = "gandl.checkpoint_kimg"
META_CHECKPOINT = "gandl.checkpoint"
META_MODEL_CONFIG = "gandl.model_config"
META_SOURCE = "gandl.source_shards"
META_DATASET = "gandl.dataset"
META_FILTER = "gandl.filter"
META_BATCH = "gandl.batch_size"
META_MBSTD_GROUP = "gandl.mbstd_group_size"
META_MBSTD_CHANNELS = "gandl.mbstd_num_channels"
META_BATCHING = "gandl.batching"
META_NUM_SITES = "gandl.num_sites"
META_FEATURE_DIM = "gandl.feature_dim"
META_COMPUTE_DTYPE = "gandl.compute_dtype"
META_NUM_HOSTS = "gandl.num_hosts"

# Keys of an eval_batches batch that are not metadata columns (`index`: the
# site's row in sites.csv, the global order key; -1 for padding).
_NON_METADATA = ("image", "valid", "index")


@dataclasses.dataclass
class ExportSummary:
  output: str
  format: str
  num_sites: int
  feature_dim: int
  layer: str
  step: int
  batch_size: int
  num_batches: int
  seconds: float

  @property
  def sites_per_s(self) -> float:
    return self.num_sites / self.seconds if self.seconds > 0 else 0.0

  def as_dict(self) -> Dict[str, Any]:
    return dict(dataclasses.asdict(self), sites_per_s=round(self.sites_per_s, 2))


# ---------------------------------------------------------------------------
# Checks (pure).


def output_format(output: str, fmt: Optional[str]) -> str:
  """`fmt`, or the format implied by the file name (.csv / .csv.gz: csv)."""
  if fmt:
    if fmt not in FORMATS:
      raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return fmt
  return "csv" if str(output).endswith((".csv", ".csv.gz")) else "parquet"


def check_layer(layer: str, valid: Sequence[str]) -> None:
  if layer not in valid:
    raise ValueError(f"unknown layer {layer!r}; this model's layers are "
                     f"{list(valid)} ('fc' is GAN-DL's embedding)")


def check_batch(batch: int, num_devices: int, num_hosts: int,
                mbstd_group: int) -> None:
  """The global batch must split over devices and hosts and into groups."""
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  g = min(max(mbstd_group, 1), batch)
  step = math.lcm(num_devices, num_hosts, g)
  if batch % step:
    lo = max(step, batch // step * step)
    raise ValueError(
        f"batch={batch} must be a multiple of {step} (devices {num_devices}, "
        f"hosts {num_hosts}, minibatch-stddev group {g}); try {lo} or "
        f"{lo + step}")


def check_dataset(info: Dict[str, Any], resolution: int, channels: int,
                  data: str, checkpoint: str) -> None:
  """The shards must hold images at the model's resolution and channels."""
  res = info.get("resolution")
  ch = info.get("num_channels", len(info.get("channels", []) or []))
  errors = []
  if res != resolution:
    errors.append(f"resolution {res} but the model of {checkpoint} expects "
                  f"{resolution} (convert with gandl-convert --resolution "
                  f"{resolution})")
  if ch != channels:
    errors.append(f"{ch} channels but the model expects {channels}")
  if errors:
    raise ValueError(f"dataset {data} does not match the checkpoint: " +
                     "; ".join(errors))


# ---------------------------------------------------------------------------
# Rows and columns.


def _text(values: np.ndarray) -> List[str]:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
          for v in values.tolist()]


def metadata_columns(batch: Dict[str, Any], dataset: Optional[str]) -> List[str]:
  """The batch's metadata columns: `site_id` first, then the published order
  of `dataset` (or of both datasets), then any other column by name."""
  keys = [k for k in batch if k not in _NON_METADATA]
  if "site_id" not in keys:
    raise ValueError(f"eval batches carry no `site_id` (keys {sorted(batch)})")
  order = list(schema.COLUMNS.get(dataset or "", ())) or [
      c for cols in schema.COLUMNS.values() for c in cols]
  ranked = [c for c in dict.fromkeys(order) if c in keys]
  ranked += sorted(k for k in keys if k not in ranked)
  return ["site_id"] + [c for c in ranked if c != "site_id"]


def _column(values: np.ndarray, name: str) -> pa.Array:
  values = np.asarray(values)
  if values.ndim > 1:
    raise ValueError(f"metadata column {name!r} is not one value per site "
                     f"(shape {values.shape})")
  kind = schema.column_type(name)
  if values.dtype.kind in "SUO" or kind == "bytes":
    return pa.array(_text(values), pa.string())
  if kind == "int64":
    return pa.array(values.astype(np.int64), pa.int64())
  if kind == "float":
    if values.dtype == np.float32:  # back to the decimal of metadata.csv
      values = np.array([float(str(v)) for v in values], np.float64)
    return pa.array(values.astype(np.float64), pa.float64())
  return pa.array(values)


# ---------------------------------------------------------------------------
# Files: local or remote (gs://), always through a temporary name.


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def _tmp_for(path: str) -> str:
  """A temporary local path next to `path` (or in /tmp for remote paths)."""
  if _is_remote(path):
    directory = tempfile.gettempdir()
  else:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix="." + os.path.basename(str(path)) + ".",
      suffix=".tmp")
  os.close(fd)
  return tmp


def _publish(tmp: str, path: str) -> None:
  """Moves a finished temporary file onto `path` (atomic rename locally; a
  single-object upload on GCS, which is atomic too)."""
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.io.gfile.copy(tmp, path, overwrite=True)
    os.remove(tmp)
  else:
    os.replace(tmp, path)


def _exists(path: str) -> bool:
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def _remove(path: str) -> None:
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.io.gfile.remove(path)
  elif os.path.exists(path):
    os.remove(path)


def _read_parquet(path: str) -> pa.Table:
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(path, "rb") as f:
      return pq.read_table(pa.BufferReader(f.read()))
  return pq.read_table(path)


def _csv_writer(f, schema_: pa.Schema) -> pa_csv.CSVWriter:
  """Recursion's plain CSV: an unquoted header line, unquoted values (site ids
  hold no commas or quotes; Arrow refuses a value that would need quoting)."""
  f.write((",".join(schema_.names) + "\n").encode("utf-8"))
  return pa_csv.CSVWriter(f, schema_, write_options=pa_csv.WriteOptions(
      include_header=False, quoting_style="none"))


class _TableWriter:
  """Streams record batches to a Parquet or CSV file (buffered row groups)."""

  def __init__(self, path: str, schema_: pa.Schema, fmt: str):
    self.fmt = fmt
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


def _schema(meta_cols: Sequence[str], meta_types: Sequence[pa.DataType],
            dim: int, with_row: bool, file_metadata: Dict[str, str]
            ) -> pa.Schema:
  fields = [pa.field(c, t) for c, t in zip(meta_cols, meta_types)]
  fields += [pa.field(n, pa.float32()) for n in emb_io.feature_names(dim)]
  if with_row:
    fields.append(pa.field(ROW_COLUMN, pa.int64()))
  return pa.schema(fields, metadata={k.encode(): str(v).encode()
                                     for k, v in file_metadata.items()})


def part_path(output: str, index: int) -> str:
  return str(output) + PART_SUFFIX.format(index=index)


def merge_parts(output: str, num_parts: int, fmt: str,
                file_metadata: Dict[str, str],
                columns: Optional[Sequence[str]] = None) -> int:
  """Concatenates `OUTPUT.part-{0..num_parts-1}` in global row order into
  OUTPUT (written atomically), removes the parts; returns the row count.

  `columns`: the columns to keep (default all but the row key).
  """
  tables = []
  for i in range(num_parts):
    p = part_path(output, i)
    if not _exists(p):
      raise FileNotFoundError(
          f"{p}: part of host {i} is not visible from process 0; on several "
          f"hosts --output must be on storage all hosts share (gs:// or a "
          f"network file system)")
    tables.append(_read_parquet(p))
  table = pa.concat_tables(tables)
  order = np.argsort(table.column(ROW_COLUMN).to_numpy(), kind="stable")
  table = table.take(pa.array(order)).drop_columns([ROW_COLUMN])
  if columns is not None:
    table = table.select(list(columns))
  table = table.replace_schema_metadata(
      {k.encode(): str(v).encode() for k, v in file_metadata.items()})
  tmp = _tmp_for(output)
  try:
    if fmt == "parquet":
      pq.write_table(table, tmp)
    else:
      with open(tmp, "wb") as f:
        writer = _csv_writer(f, table.schema)
        writer.write_table(table)
        writer.close()
    _publish(tmp, output)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  for i in range(num_parts):
    _remove(part_path(output, i))
  return table.num_rows


# ---------------------------------------------------------------------------
# Progress.


class Progress:
  """Logs sites done, sites/s and the ETA every `every_s` seconds."""

  def __init__(self, total: Optional[int], every_s: float = 30.0,
               log: Callable[[str], None] = logging.info):
    self.total, self.every_s, self.log = total, every_s, log
    self.start = time.monotonic()
    self._last = self.start
    self.done = 0
    self._logged = -1

  def update(self, sites: int, force: bool = False) -> None:
    self.done += sites
    now = time.monotonic()
    if force and self.done == self._logged:
      return
    if not force and now - self._last < self.every_s:
      return
    self._last, self._logged = now, self.done
    self.log(self.line(now))

  def line(self, now: Optional[float] = None) -> str:
    elapsed = max((now or time.monotonic()) - self.start, 1e-9)
    rate = self.done / elapsed
    if self.total:
      left = max(self.total - self.done, 0)
      eta = left / rate if rate > 0 else float("inf")
      eta_txt = (f"{int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
                 f"{int(eta % 60):02d}" if math.isfinite(eta) else "?")
      return (f"export: {self.done}/{self.total} sites "
              f"({100.0 * self.done / self.total:.1f}%), {rate:.1f} sites/s, "
              f"ETA {eta_txt}")
    return f"export: {self.done} sites, {rate:.1f} sites/s"


# ---------------------------------------------------------------------------
# The export.


def export_model(model: api.Model, data: str, output: str, *,
                 layer: str = "fc", batch: int = DEFAULT_BATCH,
                 fmt: Optional[str] = None, filter: Optional[str] = None,  # pylint: disable=redefined-builtin
                 mesh: Optional[Any] = None, checkpoint: str = "",
                 progress_every_s: float = 30.0, compute_dtype: str = "float32",
                 batches: Optional[Iterable[Dict[str, Any]]] = None
                 ) -> ExportSummary:
  """Writes `model`'s `layer` features for every site of `data` to `output`.

  Args:
    model: a `gandl_jax.load`ed model.
    data: shard directory / glob (as for training), local or gs://.
    output: the embeddings file (.parquet, or .csv with fmt="csv").
    layer: one of `model.embedding_layers`.
    batch: global batch (all devices and hosts); fixes the minibatch-stddev
      groups, so it is part of the result's definition.
    fmt: "parquet" or "csv" (default from the file name).
    filter: metadata filter expression of the input pipeline.
    mesh: default all devices (`parallel.make_mesh()`).
    checkpoint: recorded in the file metadata.
    compute_dtype: the dtype `model` was loaded with (recorded).
    batches: eval batches to use instead of `pipeline.eval_batches` (tests).
  """
  from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  fmt = output_format(output, fmt)
  check_layer(layer, model.embedding_layers)
  mesh = parallel.make_mesh() if mesh is None else mesh
  n_dev, n_hosts = int(mesh.devices.size), jax.process_count()
  group = int(model.config.get("mbstd_group_size") or 1)
  check_batch(batch, n_dev, n_hosts, group)
  info = pipeline.read_dataset_info(data)
  check_dataset(info, model.resolution, model.img_channels, data,
                checkpoint or "the checkpoint")
  embed = model.sharded_embed_fn(mesh, layer)
  dataset = info.get("dataset")
  pi = jax.process_index()
  multi = n_hosts > 1
  file_metadata = {
      META_LAYER: layer, META_STEP: model.step, META_KIMG: model.kimg,
      META_CHECKPOINT: checkpoint,
      META_MODEL_CONFIG: json.dumps(model.config, sort_keys=True),
      META_SOURCE: data, META_DATASET: dataset or "",
      META_FILTER: filter or "", META_BATCH: batch,
      META_MBSTD_GROUP: min(group, batch),
      META_MBSTD_CHANNELS: int(model.config.get("mbstd_num_channels", 1)),
      META_COMPUTE_DTYPE: compute_dtype, META_NUM_HOSTS: n_hosts,
      META_BATCHING: (
          f"fixed batches of {batch} sites: {batch // n_hosts} consecutive "
          f"sites in shard order from each of {n_hosts} host(s), the last "
          f"padded; minibatch-stddev groups of {min(group, batch)} "
          f"strided over the whole batch (sample i in group i mod "
          f"{batch // min(group, batch)}), as Model.embed with "
          f"batch_size={batch}"),
  }
  if batches is None:
    batches = pipeline.eval_batches(data, global_batch=batch, mesh=mesh,
                                    filter=filter or None)
  host_total = len(pipeline.host_sites(data, filter or None, pi, n_hosts))
  progress = Progress(host_total, progress_every_s)
  target = part_path(output, pi) if multi else output
  tmp = _tmp_for(target)
  writer: Optional[_TableWriter] = None
  meta_cols: List[str] = []
  num_batches = 0
  start = time.monotonic()
  def in_flight():
    """(batch number, batch, features) with the next batch already
    dispatched, so D computes while the host writes the previous rows."""
    pending = None
    for i, b in enumerate(batches):
      feats = embed(b["image"])  # asynchronous dispatch
      if pending is not None:
        yield pending
      pending = (i, b, feats)
    if pending is not None:
      yield pending

  try:
    for b_index, b, feats in in_flight():
      x = pipeline.host_rows(feats, mesh)
      valid = np.asarray(b["valid"], bool).reshape(-1)
      if len(valid) != len(x):
        raise ValueError(f"batch {b_index}: {len(valid)} `valid` flags for "
                         f"{len(x)} rows of this host")
      if not meta_cols:  # CSV: Recursion's layout, site_id + features
        meta_cols = (["site_id"] if fmt == "csv" else
                     metadata_columns(b, dataset))
      arrays = []
      for c in meta_cols:
        values = np.asarray(b[c])
        if len(values) != len(x):
          raise ValueError(f"batch {b_index}: metadata column {c!r} has "
                           f"{len(values)} rows, features {len(x)}")
        arrays.append(_column(values[valid], c))
      x = x[valid]
      if writer is None:
        schema_ = _schema(meta_cols, [a.type for a in arrays], x.shape[1],
                          multi, file_metadata)
        writer = _TableWriter(tmp, schema_, "parquet" if multi else fmt)
      arrays += [pa.array(x[:, j]) for j in range(x.shape[1])]
      if multi:
        arrays.append(pa.array(np.asarray(b["index"], np.int64)[valid]))
      writer.write(pa.Table.from_arrays(arrays, schema=writer.schema))
      num_batches += 1
      progress.update(len(x))
    if writer is None:
      raise ValueError(f"{data}: no sites to export"
                       + (f" (filter {filter!r})" if filter else ""))
    writer.close()
    _publish(tmp, target)
  except BaseException:
    if writer is not None:
      try:
        writer.close()
      except Exception:  # pylint: disable=broad-except
        pass
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  num_sites = writer.rows
  dim = len(writer.schema) - len(meta_cols) - (1 if multi else 0)
  progress.update(0, force=True)
  if multi:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("gandl-export: parts written")
    if pi == 0:
      num_sites = merge_parts(output, n_hosts, fmt, file_metadata)
    multihost_utils.sync_global_devices("gandl-export: merged")
  seconds = time.monotonic() - start
  return ExportSummary(output=str(output), format=fmt, num_sites=num_sites,
                       feature_dim=dim, layer=layer, step=model.step,
                       batch_size=batch, num_batches=num_batches,
                       seconds=seconds)


def export_embeddings(checkpoint: str, data: str, output: str, *,
                      layer: str = "fc", batch: int = DEFAULT_BATCH,
                      fmt: Optional[str] = None, step: Optional[int] = None,
                      filter: Optional[str] = None,  # pylint: disable=redefined-builtin
                      compute_dtype: str = "float32",
                      mesh: Optional[Any] = None,
                      progress_every_s: float = 30.0) -> ExportSummary:
  """Restores `checkpoint` (workdir, checkpoints dir or step dir; the latest
  step unless `step`) and runs `export_model`."""
  if not checkpoint:
    raise ValueError("no checkpoint given (--workdir or --checkpoint)")
  fmt = output_format(output, fmt)
  if not _is_remote(checkpoint):  # Orbax wants absolute paths
    checkpoint = os.path.abspath(checkpoint)
  try:
    model = api.load(checkpoint, step, compute_dtype=compute_dtype)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"cannot restore a checkpoint from {checkpoint}: "
                            f"{e}") from e
  check_layer(layer, model.embedding_layers)
  logging.info("export: %r, layer %s, batch %d -> %s", model, layer, batch,
               output)
  return export_model(model, data, output, layer=layer, batch=batch, fmt=fmt,
                      filter=filter, mesh=mesh, checkpoint=str(checkpoint),
                      progress_every_s=progress_every_s,
                      compute_dtype=compute_dtype)
