"""TFDS builders for RxRx19a / RxRx1 whose examples come from an Apache Beam
pipeline, reading sites exactly as gandl-convert does.

The dataset builders themselves are `tfds_rxrx19a.py` and `tfds_rxrx1.py`
(one builder per module, as `tfds build FILE.py` requires); this module holds
what they share:

* the plan: `convert.read_plan` (metadata.csv, row checks, duplicate ids,
  probed source size) and `convert.site_order` (the seed-42 order of the
  sites), computed once on the launching machine and written to a plan file
  in the (still incomplete) dataset directory;
* the Beam pipeline (`_sites_transform`): plan lines -> Reshuffle -> one
  `rxrx.load_task` per site (read, check, area-resize) -> examples, plus
  two small side outputs collected from the workers: the failed sites and the
  per-channel pixel sums. With Beam missing (no `[beam]` extra), the same
  functions run in this process as a Python generator;
* the index, written after the pipeline (`_write_index`): sites.csv (shard
  file, position, metadata), errors.csv (site_id, path, reason) next to the
  shards, and the dataset_info.json fields of gandl-convert in TFDS's
  metadata.json (`builder.info.metadata`).

Records carry the same features as gandl-convert's (schema.TFRECORD_*: raw
uint8 `image` bytes, `height`, `width`, `channels`, every metadata column), so
`gandl_jax.data.pipeline` reads a TFDS directory with the same parser. The
site order is also the same: examples are keyed by their rank in
`convert.site_order` and written with `disable_shuffling`, which makes TFDS
write them sorted by key, so sites.csv follows from the plan, the failed
sites and TFDS's shard lengths; the first record of every shard is checked
against it before the dataset is published.

Runner: without `--beam_pipeline_options` (or with options that name no
runner) the pipeline runs on Beam's local FnApiRunner (`LOCAL_RUNNER`); Beam's
`DirectRunner` first tries to download its Prism runner binary.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from gandl_jax.data import convert
from gandl_jax.data import rxrx
from gandl_jax.data import synthetic
from gandl_jax import io as gio
from gandl_jax import schema

RESOLUTIONS = (8, 16, 32, 64, 128, 256, 512, 1024)
LOCAL_RUNNER = "FnApiRunner"
SPLIT = "train"
# Scratch files in the incomplete dataset directory, removed before it is
# published.
PLAN_FILE = "_gandl_plan.jsonl"
SITE_ERRORS_FILE = "_gandl_site_errors.json"
SUMS_FILE = "_gandl_sums.json"


@dataclasses.dataclass
class RxrxConfig(tfds.core.BuilderConfig):
  resolution: int = 256


def resolution_configs(dataset: str, resolutions: Sequence[int]) -> List[RxrxConfig]:
  """One builder config per output resolution, named by it ("256")."""
  ch = rxrx.default_channels(dataset)
  return [RxrxConfig(name=str(r), resolution=r,
                     description=f"{r}x{r} pixels, {len(ch)} channels ("
                     + ", ".join(f"w{c}" for c in ch) + "), area-resized")
          for r in resolutions]


@dataclasses.dataclass(frozen=True)
class SiteJob:
  """What a worker needs to turn one plan line into an example (picklable)."""
  root: str
  dataset: str
  channels: Tuple[int, ...]
  resolution: int
  source_size: Tuple[int, int]


def read_site(task: Sequence[Any], job: SiteJob) -> Dict[str, Any]:
  """[rank, metadata] -> {"rank", and "example" + "sums" or "error"}.

  The site is read, checked and resized by `rxrx.load_task`, the function
  gandl-convert's workers run.
  """
  rank, meta = int(task[0]), dict(task[1])
  r = rxrx.load_task((job.root, meta, job.channels, job.resolution,
                      job.source_size))
  if r.image is None:
    return dict(rank=rank, error=dict(site_id=meta["site_id"], path=r.path,
                                      reason=r.error))
  ex = {schema.TFRECORD_IMAGE: r.image}
  ex.update({k: np.int64(n) for k, n in zip(schema.TFRECORD_SHAPE, r.image.shape)})
  ex.update({c: meta[c] for c in schema.COLUMNS[job.dataset]})
  x = r.image.reshape(-1, r.image.shape[-1]).astype(np.int64)
  sums = [int(x.shape[0]), x.sum(0).tolist(), (x * x).sum(0).tolist()]
  return dict(rank=rank, example=ex, sums=sums)


def _example(result: Dict[str, Any]):
  if "example" in result:
    yield result["rank"], result["example"]


def _error(result: Dict[str, Any]):
  if "error" in result:
    yield [result["rank"], result["error"]]


def _sums(result: Dict[str, Any]):
  if "sums" in result:
    yield result["sums"]


def add_sums(items) -> List[Any]:
  """[pixels, per-channel sums, per-channel sums of squares], added up
  (exact integers; an empty input gives [0, [], []])."""
  pixels, tot, tot_sq = 0, None, None
  for p, s, sq in items:
    pixels += p
    tot = list(s) if tot is None else [a + b for a, b in zip(tot, s)]
    tot_sq = list(sq) if tot_sq is None else [a + b for a, b in zip(tot_sq, sq)]
  return [pixels, tot or [], tot_sq or []]


def tf_stat_size(path: str) -> int:
  """Size in bytes of a local or remote file."""
  return gio.tensorflow().io.gfile.stat(path).length


def _write_json(value: Any, path: str) -> None:
  gio.write_text(path, json.dumps(value))


def _sites_transform(job: SiteJob, plan_path: str, errors_path: str,
                     sums_path: str):
  """The Beam PTransform (PBegin -> (rank, example) PCollection)."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel

  @beam.ptransform_fn
  def sites(pbegin):
    results = (pbegin
               | "ReadPlan" >> beam.io.ReadFromText(plan_path)
               | "ParsePlan" >> beam.Map(json.loads)
               # Break fusion with the one-file read: sites spread over workers.
               | "Spread" >> beam.Reshuffle()
               | "ReadSites" >> beam.Map(read_site, job=job))
    _ = (results
         | "Errors" >> beam.FlatMap(_error)
         | "CollectErrors" >> beam.combiners.ToList()
         | "WriteErrors" >> beam.Map(_write_json, path=errors_path))
    _ = (results
         | "Sums" >> beam.FlatMap(_sums)
         | "AddSums" >> beam.CombineGlobally(add_sums)
         | "WriteSums" >> beam.Map(_write_json, path=sums_path))
    return results | "Examples" >> beam.FlatMap(_example)

  return sites()  # pylint: disable=no-value-for-parameter


def _iter_sites(job: SiteJob, planned: Sequence[Dict[str, Any]],
                errors_path: str, sums_path: str) -> Iterator[Tuple[int, Dict]]:
  """The same as `_sites_transform`, in this process (no Beam)."""
  errors, sums = [], []
  for rank, meta in enumerate(planned):
    res = read_site([rank, meta], job)
    errors.extend(_error(res))
    sums.extend(_sums(res))
    yield from _example(res)
  _write_json(errors, errors_path)
  _write_json(add_sums(sums), sums_path)


def have_beam() -> bool:
  try:
    import apache_beam  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def with_local_runner(download_config):
  """`download_config` with LOCAL_RUNNER unless a runner was chosen."""
  if download_config.beam_runner is not None or not have_beam():
    return download_config
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  opts = download_config.beam_options or pipeline_options.PipelineOptions()
  std = opts.view_as(pipeline_options.StandardOptions)
  if not std.runner:
    std.runner = LOCAL_RUNNER
  return dataclasses.replace(download_config, beam_options=opts)


def builder_class(dataset: str):
  """The builder of `dataset` ("rxrx19a" or "rxrx1")."""
  # pylint: disable=import-outside-toplevel
  if dataset == "rxrx19a":
    from gandl_jax.data import tfds_rxrx19a
    return tfds_rxrx19a.Rxrx19a
  if dataset == "rxrx1":
    from gandl_jax.data import tfds_rxrx1
    return tfds_rxrx1.Rxrx1
  raise ValueError(f"dataset must be 'rxrx19a' or 'rxrx1', got {dataset!r}")


def build(dataset: str, manual_dir: str, data_dir: str, resolution: int,
          beam_options=None, num_shards: Optional[int] = None) -> Dict[str, Any]:
  """`tfds build` from Python: builds (or reuses) the dataset at `resolution`
  and returns {"path" (the directory to train on), "num_examples",
  "num_failed", "errors_csv"}."""
  cls = builder_class(dataset)
  if str(resolution) not in {c.name for c in cls.BUILDER_CONFIGS}:
    raise ValueError(f"{dataset}: no TFDS config for resolution {resolution}; "
                     f"configs: {[c.name for c in cls.BUILDER_CONFIGS]}")
  b = cls(config=str(resolution), data_dir=data_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, beam_options=beam_options, num_shards=num_shards))
  path = os.fspath(b.data_path)
  return dict(path=path, num_examples=int(b.info.splits[SPLIT].num_examples),
              num_failed=int(b.info.metadata["num_failed"]),
              errors_csv=gio.join(path, convert.ERRORS_FILE))


def find_root(manual_dir: str, dataset: str) -> str:
  """`manual_dir`, or its `RxRx19a/` / `RxRx1/` folder, whichever holds
  metadata.csv."""
  root = str(manual_dir)
  sub = gio.join(root, synthetic.DATASET_DIRS[dataset])
  if not gio.exists(gio.join(root, "metadata.csv")) and gio.exists(
      gio.join(sub, "metadata.csv")):
    return sub
  return root


class RxrxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared by the RxRx19a and RxRx1 builders; subclasses set DATASET."""

  DATASET = ""
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9's default resolves the path through the `importlib_resources`
    # backport, which is not installed on Python >= 3.9; the file is enough.
    return epath.Path(inspect.getfile(cls))

  @property
  def channels(self) -> Tuple[int, ...]:
    return rxrx.default_channels(self.DATASET)

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    feats = {schema.TFRECORD_IMAGE: tfds.features.Tensor(
        shape=(r, r, len(self.channels)), dtype=np.uint8,
        encoding=tfds.features.Encoding.BYTES)}
    for name in schema.TFRECORD_SHAPE:
      feats[name] = tfds.features.Scalar(np.int64)
    for col in schema.COLUMNS[self.DATASET]:
      kind = schema.column_type(col)
      feats[col] = (tfds.features.Text() if kind == "bytes" else
                    tfds.features.Scalar(np.int64 if kind == "int64" else np.float32))
    return self.dataset_info_from_configs(
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(feats),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        # Written sorted by key (the site's rank in convert.site_order).
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _download_and_prepare(self, dl_manager, download_config):
    if download_config.nondeterministic_order:
      raise ValueError("nondeterministic_order is not supported: the site "
                       "index (sites.csv) relies on TFDS writing the sites "
                       "in key order")
    self._max_sites = download_config.max_examples_per_split
    super()._download_and_prepare(dl_manager, with_local_runner(download_config))
    self._write_index()

  def _scratch(self, name: str) -> str:
    return os.fspath(self.data_path / name)

  def _split_generators(self, dl_manager):
    root = find_root(dl_manager.manual_dir, self.DATASET)
    # Sources smaller than the resolution: one error here, before Beam runs.
    metas, meta_errors, size = convert.read_plan(
        self.DATASET, root, "all", self.channels,
        resolution=int(self.builder_config.resolution))
    planned = [metas[i] for i in convert.site_order(len(metas))]
    if getattr(self, "_max_sites", None) is not None:
      planned = planned[:self._max_sites]
    job = SiteJob(root, self.DATASET, self.channels,
                  int(self.builder_config.resolution), size)
    self._plan = dict(job=job, planned=planned, meta_errors=meta_errors)
    logging.info("%s: %d sites, source images %dx%d, building %dx%d x %d "
                 "channels", root, len(planned), size[1], size[0],
                 job.resolution, job.resolution, len(job.channels))
    errors_path, sums_path = (self._scratch(SITE_ERRORS_FILE),
                              self._scratch(SUMS_FILE))
    if have_beam():
      plan_path = self._scratch(PLAN_FILE)
      gio.write_text(plan_path, "".join(
          json.dumps([rank, m]) + "\n" for rank, m in enumerate(planned)))
      return {SPLIT: _sites_transform(job, plan_path, errors_path, sums_path)}
    logging.info("apache_beam is not installed: reading the sites in this "
                 "process (install gandl-jax[beam] to use Beam)")
    return {SPLIT: _iter_sites(job, planned, errors_path, sums_path)}

  def _generate_examples(self, **unused):
    # Required by TFDS's builder interface but never called:
    # _split_generators returns the generators (or the Beam PTransform).
    raise RuntimeError("_generate_examples is not used by this builder; "
                       "_split_generators yields the examples")

  def _write_index(self) -> None:
    """sites.csv, errors.csv and the metadata, from the plan and the pipeline's
    side outputs; scratch files removed."""
    plan, job = self._plan, self._plan["job"]
    site_errors = json.loads(gio.read_text(self._scratch(SITE_ERRORS_FILE)))
    pixels, tot, tot_sq = json.loads(gio.read_text(self._scratch(SUMS_FILE)))
    failed = {rank for rank, _ in site_errors}
    valid = [m for rank, m in enumerate(plan["planned"]) if rank not in failed]
    if not valid:
      first = sorted(site_errors, key=lambda x: x[0])[0][1] if site_errors else {}
      raise convert.ConversionError(
          f"{job.root}: no site converted ({len(site_errors)} failed, first "
          f"{first.get('site_id', '-')}: {first.get('reason', '-')})")
    split = self.info.splits[SPLIT]
    files, lengths = split.filenames, list(split.shard_lengths)
    if sum(lengths) != len(valid):
      raise RuntimeError(f"{self.data_path}: TFDS wrote {sum(lengths)} examples "
                         f"but {len(valid)} sites were read")
    rows, it = [], iter(valid)
    for f, n in zip(files, lengths):
      rows.extend(dict(shard=f, position=pos, **next(it)) for pos in range(n))
    self._check_order(rows)
    errors = plan["meta_errors"] + [e for _, e in sorted(site_errors, key=lambda x: x[0])]
    sites = convert.sites_text(self.DATASET, rows)
    gio.write_text(self._scratch(schema.SITES_INDEX_FILE), sites)
    gio.write_text(self._scratch(convert.ERRORS_FILE), convert.errors_text(errors))
    mean, std = convert.channel_stats(tot or [0] * len(job.channels),
                                      tot_sq or [0] * len(job.channels), pixels)
    info = convert.dataset_info(
        self.DATASET,
        shards=[dict(file=f, num_examples=n,
                     bytes=int(tf_stat_size(self._scratch(f))))
                for f, n in zip(files, lengths)],
        sites_bytes=len(sites.encode("utf-8")),
        num_failed=len(errors), resolution=job.resolution, channels=job.channels,
        compression="", mean=mean, std=std, subset="all", source=job.root,
        source_size=job.source_size,
        command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    info["builder"] = f"{self.name}/{self.builder_config.name}:{self.version}"
    self.info.metadata.update(info)
    for name in (PLAN_FILE, SITE_ERRORS_FILE, SUMS_FILE):
      if gio.exists(self._scratch(name)):
        gio.remove(self._scratch(name))
    logging.info("%s: %d sites in %d shards; %d failed%s", self.data_path,
                 len(rows), len(files), len(errors),
                 f" (see {convert.ERRORS_FILE})" if errors else "")

  def _check_order(self, rows: Sequence[Dict[str, Any]]) -> None:
    """The first record of every shard is the site sites.csv puts there."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    spec = {"site_id": tf.io.FixedLenFeature([], tf.string)}
    for row in rows:
      if row["position"] != 0:
        continue
      path = self._scratch(row["shard"])
      for rec in tf.data.TFRecordDataset(path).take(1):
        got = tf.io.parse_single_example(rec, spec)["site_id"].numpy().decode()
        if got != row["site_id"]:
          raise RuntimeError(f"{path}: first record is {got!r}, expected "
                             f"{row['site_id']!r}; this TFDS version does not "
                             "write examples in key order")
