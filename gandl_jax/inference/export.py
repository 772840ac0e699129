"""Discriminator embeddings for every site of a set of shards (gandl-export).

  from gandl_jax.inference import export
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

A step chosen by training's representation probe (`step="best"`,
`gandl-export --step best [--layer L]`: the best probe score of layer L, by
default the run's `config.probe_layer`) was chosen on the probe's plates:
the file lists them (`gandl.probe_plates`, a JSON list of
`{experiment}_{plate}` keys) with the selection (`gandl.checkpoint_selection`:
layer and score), and gandl-evaluate scores the control task without them.

Minibatch stddev: D's features for a site depend weakly on the other sites of
its minibatch-stddev group. Batches are fixed (B consecutive sites in shard
order, B / hosts from each host's files; groups formed over the whole global
batch as `Model.embed` does), so the output is a deterministic function of
checkpoint, shards, filter, B and the number of hosts, independent of the
number of devices per host.

Other model families (the ConvAE baseline, configs/convae_rxrx19a.py): a
checkpoint whose meta names a family loads as that family's model, whose
`Embedding` (`gandl_jax.families`: the encoder's bottleneck for the ConvAE)
goes through the same `export_model` and `write_features`, in the same
layout (`gandl.family` names the family).

Several hosts: each host writes its rows to `OUTPUT.part-{process_index}`;
after a barrier process 0 merges them in global order into OUTPUT and removes
the parts, so OUTPUT must be on storage every host sees (gs://, NFS).
Every file is written to a temporary name first and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

import jax
import numpy as np
import pyarrow as pa
from absl import logging

from gandl_jax import checkpoint as ckpt_lib
from gandl_jax.data import pipeline
from gandl_jax import embeddings
from gandl_jax import families
from gandl_jax.inference import api
from gandl_jax import io as gio
from gandl_jax.model import embed as embed_lib
from gandl_jax.model import networks
from gandl_jax import progress as progress_lib
from gandl_jax import schema
from gandl_jax import sharding

DEFAULT_BATCH = 64
ROW_COLUMN = "_gandl_index"      # global order key, only inside part files
PART_SUFFIX = ".part-{index}"

# Parquet key-value metadata written by the exporter (gandl_jax.embeddings).
META_LAYER = embeddings.META_KEY_LAYER
META_STEP = embeddings.META_KEY_STEP
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
META_FALLBACK = "gandl.checkpoint_fallback"
META_FAMILY = "gandl.family"       # absent for a GAN
META_PROBE_PLATES = embeddings.META_KEY_PROBE_PLATES
META_SELECTION = "gandl.checkpoint_selection"



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
  # The latest step when it was unreadable and `step` is an older one
  # (export_embeddings(allow_fallback=True)); None otherwise.
  fallback_from_step: Optional[int] = None
  # The probe layer the step was selected on (`step="best"`); None otherwise.
  selected_on_layer: Optional[str] = None

  @property
  def sites_per_s(self) -> float:
    return self.num_sites / self.seconds if self.seconds > 0 else 0.0

  def as_dict(self) -> Dict[str, Any]:
    return dict(dataclasses.asdict(self), sites_per_s=round(self.sites_per_s, 2))


# ---------------------------------------------------------------------------
# The data-parallel embedding function.


def sharded_embed_fn(model: api.Model, mesh: Any, layer: str = "fc"):
  """Data-parallel `model.embed` on `mesh` (a `sharding.make_mesh` mesh).

  Returns `fn(images) -> features`: `images` a global (B, R, R, C) array
  sharded on the mesh's `data` axis, uint8 in [0, 255] or float in [-1, 1];
  `features` a (B, F) float32 array with the same sharding. The minibatch-
  stddev groups are formed over the whole global batch exactly as `embed`
  forms them for one batch of B images (`mbstd_shards=1`), so the features
  do not depend on the number of devices; B must be a multiple of the
  mesh size and of min(mbstd_group_size, B).
  """
  jitted = embed_lib.data_parallel_features(model.discriminator, mesh, layer)
  repl = sharding.replicated(mesh)

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, repl,
                                        lambda idx: host[idx])

  d_vars = jax.tree_util.tree_map(put, model.d_variables)
  group = int(model.config["mbstd_group_size"] or 1)
  n_dev = int(mesh.devices.size)

  def fn(images):
    sharding.check_batch(int(images.shape[0]), n_dev, 1, group)
    return jitted(d_vars, images)

  return fn


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
    if not gio.exists(p):
      raise FileNotFoundError(
          f"{p}: part of host {i} is not visible from process 0; on several "
          f"hosts --output must be on storage all hosts share (gs:// or a "
          f"network file system)")
    tables.append(embeddings.read_parquet(p))
  table = pa.concat_tables(tables)
  order = np.argsort(table.column(ROW_COLUMN).to_numpy(), kind="stable")
  table = table.take(pa.array(order)).drop_columns([ROW_COLUMN])
  if columns is not None:
    table = table.select(list(columns))
  table = table.replace_schema_metadata(
      {k.encode(): str(v).encode() for k, v in file_metadata.items()})
  embeddings.write_table(output, table, fmt)
  for i in range(num_parts):
    gio.remove(part_path(output, i))
  return table.num_rows


# ---------------------------------------------------------------------------
# The export.


def _channel_names(channels: Sequence[Any]) -> str:
  return ", ".join(c["name"] if "name" in c else
                   f"w{c.get('index')} {c.get('stain')}" for c in channels)


def check_channels(model: api.Model, info: Dict[str, Any], data: str,
                   against: str = "the model") -> None:
  """The shards must hold the channels the model was trained on, in order.

  gandl-train checkpoints record the training shards' channels
  (`meta['dataset']['channels']`); they are compared with the shards'
  (`dataset_info.json`) by stain, so RxRx1 shards fit an RxRx19a model only
  when converted with the same five stains (`--channels 1,2,3,4,5`).
  Checkpoints without that record (gandl-import) are checked by count only
  (`pipeline.check_dataset`).
  """
  want = (model.meta.get("dataset") or {}).get("channels") or []
  have = info.get("channels") or []
  if not want or not have:
    return
  key = lambda c: c.get("stain") or c.get("index")  # noqa: E731
  if [key(c) for c in want] != [key(c) for c in have]:
    trained_on = (model.meta.get("dataset") or {}).get("dataset") or "?"
    raise ValueError(
        f"{data}: the shards ({info.get('dataset')}) hold channels "
        f"[{_channel_names(have)}] but {against} was trained on "
        f"({trained_on}) [{_channel_names(want)}]; "
        + _convert_hint(want, str(info.get("dataset") or "")))


def _convert_hint(want: Sequence[Dict[str, Any]], dataset: str) -> str:
  """The gandl-convert --channels value, in `dataset`'s own terms (RxRx:
  channel numbers, LoadData: FileName_ suffixes), that converts shards with
  the `want` channels; or why none does."""
  if dataset == schema.LOADDATA:
    by_stain = {v[0]: k for k, v in schema.CELL_PAINTING_STAINS.items()}
    values = [c.get("name") or by_stain.get(c.get("stain")) for c in want]
  else:
    by_stain = {c.stain: c.index for c in schema.CHANNELS.get(dataset, ())}
    values = [by_stain.get(c.get("stain")) for c in want]
  if not dataset or any(v is None for v in values):
    return (f"no gandl-convert --channels value gives {dataset or 'these'} "
            f"shards those channels: use a model trained on {dataset or 'such'}"
            f" shards")
  return (f"convert the shards with gandl-convert --dataset {dataset} "
          f"--channels {','.join(str(v) for v in values)}")


@dataclasses.dataclass(frozen=True)
class Embedding:
  """What a model family exports (`export_model`): `layer` (recorded as
  `gandl.layer`); `group`: the global batch must be a multiple of
  min(group, batch) (D's minibatch-stddev groups; 1 where a site's row
  depends on that site alone); `make_fn(mesh)` -> `fn(images) -> features`,
  data-parallel on the mesh as `write_features` wants it; `metadata`: the
  family's own Parquet metadata keys (`gandl.*`)."""
  layer: str
  group: int
  make_fn: Callable[[Any], Callable[[Any], Any]]
  metadata: Dict[str, Any]


def gan_embedding(model: api.Model, layer: Optional[str], batch: int,
                  num_hosts: int) -> Embedding:
  """D's `layer` features (default 'fc', GAN-DL's embedding), in fixed
  batches whose minibatch-stddev groups are part of the result."""
  layer = layer or "fc"
  networks.check_embedding_layer(layer, model.resolution)
  group = int(model.config["mbstd_group_size"] or 1)
  g = min(group, batch)
  return Embedding(
      layer=layer, group=group,
      make_fn=lambda mesh: sharded_embed_fn(model, mesh, layer),
      metadata={
          META_MBSTD_GROUP: g,
          META_MBSTD_CHANNELS: int(model.config["mbstd_num_channels"]),
          META_BATCHING: (
              f"fixed batches of {batch} sites: {batch // num_hosts} "
              f"consecutive sites in shard order from each of {num_hosts} "
              f"host(s), the last padded; minibatch-stddev groups of {g} "
              f"strided over the whole batch (sample i in group i mod "
              f"{batch // g}), as Model.embed with batch_size={batch}")})


def model_embedding(model: Any, layer: Optional[str], batch: int,
                    num_hosts: int) -> Embedding:
  """The `Embedding` of a loaded model: `gan_embedding`, or its family's
  `embedding` (`gandl_jax.families`)."""
  plugin = families.plugin(model.meta)
  build = gan_embedding if plugin is None else plugin.embedding
  return build(model, layer, batch, num_hosts)


def export_model(model: Any, data: str, output: str, *,
                 layer: Optional[str] = None, batch: int = DEFAULT_BATCH,
                 fmt: Optional[str] = None, filter: Optional[str] = None,  # pylint: disable=redefined-builtin
                 mesh: Optional[Any] = None, checkpoint: str = "",
                 progress_every_s: float = 30.0, compute_dtype: str = "float32",
                 batches: Optional[Iterable[Dict[str, Any]]] = None,
                 selection: Optional[Dict[str, Any]] = None
                 ) -> ExportSummary:
  """Writes `model`'s `layer` features for every site of `data` to `output`:
  the one export path of every model family (`model_embedding`).

  Args:
    model: a `gandl_jax.load`ed model (a GAN `Model` or another family's).
    data: shard directory / glob (as for training), local or gs://.
    output: the embeddings file (.parquet, or .csv with fmt="csv").
    layer: one of `model.embedding_layers` (default: the family's embedding,
      'fc' for a GAN, 'bottleneck' for the ConvAE).
    batch: global batch (all devices and hosts); for a GAN it fixes the
      minibatch-stddev groups, so it is part of the result's definition.
    fmt: "parquet" or "csv" (default from the file name).
    filter: metadata filter expression of the input pipeline.
    mesh: default all devices (`sharding.make_mesh()`).
    checkpoint: recorded in the file metadata.
    compute_dtype: the dtype `model` was loaded with (recorded).
    batches: eval batches to use instead of `pipeline.eval_batches` (tests).
    selection: `checkpoint.best_selection` when the probe chose the step:
      its plates and layer go into the file metadata.
  """
  fmt = embeddings.output_format(output, fmt)
  mesh = sharding.make_mesh() if mesh is None else mesh
  n_dev, n_hosts = int(mesh.devices.size), jax.process_count()
  emb = model_embedding(model, layer, batch, n_hosts)
  sharding.check_batch(batch, n_dev, n_hosts, emb.group, name="batch")
  info = pipeline.read_dataset_info(data)
  pipeline.check_dataset(info, data, model.resolution, model.img_channels,
                         against=checkpoint or "the checkpoint")
  check_channels(model, info, data, against=checkpoint or "the checkpoint")
  dataset = info.get("dataset")
  fallback = model.meta.get("fallback")
  file_metadata = {
      META_LAYER: emb.layer, META_STEP: model.step, META_KIMG: model.kimg,
      META_CHECKPOINT: checkpoint,
      META_MODEL_CONFIG: json.dumps(model.config, sort_keys=True),
      META_SOURCE: data, META_DATASET: dataset or "",
      META_FILTER: filter or "", META_BATCH: batch,
      META_COMPUTE_DTYPE: compute_dtype, META_NUM_HOSTS: n_hosts,
      **({META_FALLBACK: json.dumps(fallback)} if fallback else {}),
      **selection_metadata(selection),
      **emb.metadata,
  }
  written = write_features(emb.make_fn(mesh), data, output, batch=batch,
                           fmt=fmt, mesh=mesh, file_metadata=file_metadata,
                           filter=filter, dataset=dataset,
                           progress_every_s=progress_every_s, batches=batches)
  return ExportSummary(output=str(output), format=fmt,
                       num_sites=written.num_sites,
                       feature_dim=written.feature_dim, layer=emb.layer,
                       step=model.step, batch_size=batch,
                       num_batches=written.num_batches,
                       seconds=written.seconds,
                       fallback_from_step=(fallback or {}).get("latest_step"),
                       selected_on_layer=(selection or {}).get("layer"))


def selection_metadata(selection: Optional[Dict[str, Any]]) -> Dict[str, str]:
  """The file metadata of a probe-selected step: `gandl.probe_plates` (when
  the record lists the plates) and `gandl.checkpoint_selection`."""
  if not selection:
    return {}
  out = {META_SELECTION: json.dumps(
      {"by": "representation probe", "layer": selection["layer"],
       "score": selection["score"]})}
  if selection.get("plates"):
    out[META_PROBE_PLATES] = json.dumps(sorted(selection["plates"]))
  else:
    logging.warning("export: step %d was selected by a probe that does not "
                    "record its plates (it drew from every plate): the "
                    "control task's figures on these embeddings are "
                    "optimistic", selection["step"])
  return out


@dataclasses.dataclass
class Written:
  num_sites: int
  feature_dim: int
  num_batches: int
  seconds: float


def write_features(embed: Callable[[Any], Any], data: str, output: str, *,
                   batch: int, fmt: str, mesh: Any,
                   file_metadata: Dict[str, Any],
                   filter: Optional[str] = None,  # pylint: disable=redefined-builtin
                   dataset: Optional[str] = None,
                   progress_every_s: float = 30.0,
                   batches: Optional[Iterable[Dict[str, Any]]] = None,
                   name: str = "export") -> Written:
  """Runs `embed` over every site of `data` and writes the embeddings file
  (gandl-export, gandl-features).

  `embed(images)`: a global, data-sharded (batch, R, R, C) uint8 array ->
  (batch, F) features with the same sharding, dispatched asynchronously so
  the next batch computes while this host writes. Sites come from
  `pipeline.eval_batches` (or `batches`); padding rows are dropped; several
  hosts write parts that process 0 merges (module docstring).
  `file_metadata`: the Parquet key-value metadata (`gandl.*` keys).
  """
  n_hosts = jax.process_count()
  pi = jax.process_index()
  multi = n_hosts > 1
  file_metadata = dict(file_metadata)
  file_metadata.setdefault(META_NUM_HOSTS, n_hosts)
  if batches is None:
    batches = pipeline.eval_batches(data, global_batch=batch, mesh=mesh,
                                    filter=filter or None)
  host_total = len(pipeline.host_sites(data, filter or None, pi, n_hosts))
  progress = progress_lib.Progress(host_total, name=name,
                                   every_s=progress_every_s)
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

  if multi:   # parts carry the global row key; process 0 merges them
    writer = embeddings.Writer(part_path(output, pi), "parquet", file_metadata,
                               extra=[pa.field(ROW_COLUMN, pa.int64())],
                               dataset=dataset)
  else:
    writer = embeddings.Writer(output, fmt, file_metadata, dataset=dataset)
  with writer:
    for b_index, b, feats in in_flight():
      x = pipeline.host_rows(feats, mesh)
      valid = np.asarray(b["valid"], bool).reshape(-1)
      if len(valid) != len(x):
        raise ValueError(f"batch {b_index}: {len(valid)} `valid` flags for "
                         f"{len(x)} rows of this host")
      # CSV: Recursion's layout, site_id + features.
      cols = (["site_id"] if fmt == "csv" and not multi else
              [k for k in b if k not in pipeline.NON_METADATA_KEYS])
      meta = {}
      for c in cols:
        values = np.asarray(b[c])
        if len(values) != len(x):
          raise ValueError(f"batch {b_index}: metadata column {c!r} has "
                           f"{len(values)} rows, features {len(x)}")
        meta[c] = values[valid]
      extra = [np.asarray(b["index"], np.int64)[valid]] if multi else []
      writer.write(meta, x[valid], extra)
      num_batches += 1
      progress.update(int(valid.sum()))
      if num_batches == 1 and progress.done < host_total:
        progress.restart()   # the first batch compiled: keep it off the ETA
    if writer.rows == 0:
      raise ValueError(f"{data}: no sites to export"
                       + (f" (filter {filter!r})" if filter else ""))
  num_sites, dim = writer.rows, writer.dim
  progress.update(0, force=True)
  if multi:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("gandl-export: parts written")
    if pi == 0:
      columns = (["site_id"] + embeddings.feature_names(dim) if fmt == "csv"
                 else None)
      num_sites = merge_parts(output, n_hosts, fmt, file_metadata, columns)
    multihost_utils.sync_global_devices("gandl-export: merged")
  return Written(num_sites=num_sites, feature_dim=dim,
                 num_batches=num_batches, seconds=time.monotonic() - start)


def export_embeddings(checkpoint: str, data: str, output: str, *,
                      layer: Optional[str] = None,
                      batch: int = DEFAULT_BATCH,
                      fmt: Optional[str] = None,
                      step: Union[None, int, str] = None,
                      filter: Optional[str] = None,  # pylint: disable=redefined-builtin
                      compute_dtype: str = "float32",
                      mesh: Optional[Any] = None,
                      progress_every_s: float = 30.0,
                      overwrite: bool = False,
                      allow_fallback: bool = False) -> ExportSummary:
  """Restores `checkpoint` (workdir, checkpoints dir or step dir; the latest
  step unless `step`, an int or 'best': the best training-probe score of
  `layer`) and runs `export_model`.

  `layer`: default the family's embedding ('fc', GAN-DL's, for a GAN
  checkpoint; 'bottleneck' for a ConvAE baseline's); with step='best' the
  layer the step is selected on, default the run's `config.probe_layer`.

  An existing `output` is refused unless `overwrite`. An unreadable latest
  checkpoint is refused unless `step` names another one or `allow_fallback`
  (then the newest readable step is used; the summary's `step` and
  `fallback_from_step` and the file's `gandl.checkpoint_step` and
  `gandl.checkpoint_fallback` metadata say so).
  """
  if not checkpoint:
    raise ValueError("no checkpoint given (--workdir or --checkpoint)")
  fmt = embeddings.output_format(output, fmt)
  if not overwrite and gio.exists(output):
    raise FileExistsError(f"{output} already exists; pass --overwrite "
                          f"(overwrite=True) to replace it")
  checkpoint = gio.absolute(checkpoint)   # Orbax wants absolute paths
  selection = None
  try:
    if str(step).strip().lower() == ckpt_lib.BEST:
      selection = ckpt_lib.best_selection(checkpoint, layer)
      step, layer = selection["step"], selection["layer"]
    model = api.load(checkpoint, step, compute_dtype=compute_dtype,
                     allow_fallback=allow_fallback)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"cannot restore a checkpoint from {checkpoint}: "
                            f"{e}") from e
  # The layer is checked here, before anything is read or written.
  layer = model_embedding(model, layer, batch, jax.process_count()).layer
  if model.meta.get("fallback"):
    logging.warning("export: using checkpoint step %d, NOT the latest (%d, "
                    "unreadable)", model.step,
                    model.meta["fallback"]["latest_step"])
  logging.info("export: %r, layer %s, batch %d -> %s", model, layer, batch,
               output)
  if selection:
    logging.info("export: step %d has the best probe score of layer %s "
                 "(%.4f); %d probe plates recorded", selection["step"],
                 selection["layer"], selection["score"],
                 len(selection["plates"]))
  return export_model(model, data, output, layer=layer, batch=batch, fmt=fmt,
                      filter=filter, mesh=mesh, checkpoint=str(checkpoint),
                      progress_every_s=progress_every_s,
                      compute_dtype=compute_dtype, selection=selection)
