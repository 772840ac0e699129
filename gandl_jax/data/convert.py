"""RxRx19a / RxRx1 (or the synthetic tree), or any Cell Painting set described
by CellProfiler LoadData CSVs (`dataset="loaddata"`) -> deterministic TFRecord
shards.

Output directory (local or gs://)::

  {dataset}-{i:05d}-of-{n:05d}.tfrecord   one tf.train.Example per site
                                          (layout: gandl_jax/schema.py)
  dataset_info.json                       counts, resolution, channels,
                                          per-channel mean/std, source, command
  sites.csv                               shard, position and metadata of every
                                          converted site, in shard order
  errors.csv                              site_id, path, reason of every site
                                          that could not be converted
  _progress/                              one JSON per finished shard (resume):
                                          its plan, site ids, statistics, and
                                          the shard's size and SHA-256
  .gandl-convert.lock                     held while a conversion runs (see
                                          `lock_output`)

Sites are assigned to shards by a fixed permutation (seed 42) of the valid
metadata rows, so every shard mixes plates and conditions and the output is
identical for any worker count. Each shard is written to a temporary name and
renamed when complete; a rerun keeps finished shards whose plan (site ids,
resolution, channels, source size) is unchanged and whose size matches the
progress record, and redoes the rest. Before a shard is redone, the file under
its name (an older conversion's) is deleted, so a kill between the progress
record and the rename can never leave an old shard next to a new record.

The sites are read by `rxrx.py` and `loaddata.py`. This module is longer
than most (~590 lines) because planning, the resumable shard writer, its
progress records and the output lock are one job, a conversion that
survives kills and reruns, whose rules read best in one place.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import socket
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from gandl_jax.data import loaddata
from gandl_jax.data import rxrx
from gandl_jax.data.imagefile import MetadataError, SiteError
from gandl_jax import io as gio
from gandl_jax import progress as progress_lib
from gandl_jax import schema

SHARD_SEED = 42
TARGET_SHARD_BYTES = 128 * 2**20
MIN_SHARDS = 16          # so that up to 16 hosts each read whole files
PROGRESS_DIR = "_progress"
ERRORS_FILE = "errors.csv"
LOCK_FILE = ".gandl-convert.lock"
FORMAT_VERSION = 1


class OutputLockedError(FileExistsError):
  """Another conversion holds the output directory's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  return True


def _refusal(output_dir: str, path: str, other: Dict) -> OutputLockedError:
  who = (f"pid {other.get('pid')} on host {other.get('host')} since "
         f"{other.get('started')}" if other else "another process")
  return OutputLockedError(
      f"{output_dir} is being written by another conversion ({who}; lock "
      f"file {path}). Wait for it to finish, or use another --output. If "
      f"that conversion is no longer running (killed, machine gone), "
      f"delete {path} and rerun.")


def _read_record(path: str) -> Dict:
  try:
    other = json.loads(gio.read_text(path) or "{}")
  except (FileNotFoundError, ValueError):
    return {}
  return other if isinstance(other, dict) else {}


# Open descriptors of the locks this process holds, by lock path.
_HELD: Dict[str, int] = {}


def lock_output(output_dir: str) -> Dict[str, object]:
  """Takes the exclusive lock of `output_dir`; returns the lock record.

  The lock is the file OUTPUT/.gandl-convert.lock holding the pid, host and
  start time of its owner; `unlock_output` removes it when the conversion ends
  (also on errors and Ctrl-C). Two conversions into one directory would
  delete each other's temporary files: the second one is refused with an
  error naming the first.

  Local output: the owner also holds an exclusive `flock` on the file, which
  the kernel releases when the owner dies, however it dies. Whoever takes the
  flock decides alone, so of any number of processes started at once exactly
  one owns the lock. Under the flock, a record of this host whose pid no
  longer runs (a conversion killed with SIGKILL) is taken over with a warning;
  a record of another host (a shared file system) cannot be checked from here
  and is refused: the error says how to remove it once that conversion is
  known to be gone (delete the file).

  gs:// output: GCS has no exclusive create through tf.io.gfile, so the lock
  is written after checking that none exists and read back; this catches any
  conversion started more than a moment before, but two started within the
  same second could both proceed. Start one conversion per output.
  """
  path = gio.join(output_dir, LOCK_FILE)
  record = dict(pid=os.getpid(), host=socket.gethostname(),
                started=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"),
                command=" ".join(sys.argv))
  text = json.dumps(record) + "\n"
  if gio.is_remote(output_dir):
    if not gio.exists(path):
      gio.write_text(path, text)
      if json.loads(gio.read_text(path)) == record:
        return record
    raise _refusal(output_dir, path, _read_record(path))
  for _ in range(100):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise _refusal(output_dir, path, _read_record(path)) from None
    try:   # its owner may have removed the file between our open and flock
      current = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      current = False
    if not current:
      os.close(fd)
      continue
    other = _read_record(path)
    if other:
      if (other.get("host") != record["host"]
          or not isinstance(other.get("pid"), int)
          or _pid_alive(other["pid"])):
        os.close(fd)
        raise _refusal(output_dir, path, other)
      logging.warning("%s: taking over the stale lock of pid %d (no longer "
                      "running) started %s", path, other["pid"],
                      other.get("started"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode("utf-8"), 0)
    _HELD[path] = fd
    return record
  raise OutputLockedError(f"{path}: could not take the lock")


def unlock_output(output_dir: str, record: Dict[str, object]) -> None:
  """Removes the lock if it is still `record`'s."""
  path = gio.join(output_dir, LOCK_FILE)
  fd = _HELD.pop(path, None)
  try:
    if _read_record(path) == record:
      gio.remove(path)
  except FileNotFoundError:
    pass
  finally:
    if fd is not None:   # after the removal: see the inode check above
      os.close(fd)


def _tf():
  return gio.tensorflow()


def shard_name(dataset: str, index: int, num_shards: int) -> str:
  return f"{dataset}-{index:05d}-of-{num_shards:05d}.tfrecord"


def default_num_shards(num_sites: int, resolution: int, num_channels: int) -> int:
  """About 128 MiB per shard, and at least min(16, sites) shards."""
  total = num_sites * resolution * resolution * num_channels
  return max(1, math.ceil(total / TARGET_SHARD_BYTES), min(MIN_SHARDS, num_sites))


def dataset_columns(dataset: str) -> Dict[str, str]:
  """The metadata columns of `dataset`'s records and their TFRecord types
  (a LoadData set adds its CSV's Metadata_* columns: `read_loaddata`)."""
  return {c: schema.column_type(c, dataset) for c in schema.COLUMNS[dataset]}


def encode_example(image: np.ndarray, meta: Dict[str, object], dataset: str,
                   columns: Optional[Dict[str, str]] = None) -> bytes:
  """One site as a serialized tf.train.Example (see schema.TFRECORD_*)."""
  tf = _tf()
  feat = tf.train.Feature
  f = {
      schema.TFRECORD_IMAGE: feat(bytes_list=tf.train.BytesList(
          value=[np.ascontiguousarray(image, np.uint8).tobytes()])),
  }
  for name, n in zip(schema.TFRECORD_SHAPE, image.shape):
    f[name] = feat(int64_list=tf.train.Int64List(value=[int(n)]))
  for col, kind in (columns or dataset_columns(dataset)).items():
    v = meta[col]
    if kind == "int64":
      f[col] = feat(int64_list=tf.train.Int64List(value=[int(v)]))
    elif kind == "float":
      f[col] = feat(float_list=tf.train.FloatList(value=[float(v)]))
    else:
      f[col] = feat(bytes_list=tf.train.BytesList(value=[str(v).encode("utf-8")]))
  # deterministic: the feature map in key order. Without it the order (and so
  # the shard bytes and their SHA-256) follows the process's string hashing.
  return tf.train.Example(features=tf.train.Features(feature=f)
                          ).SerializeToString(deterministic=True)


def _csv(columns: Sequence[str], rows: Sequence[Dict[str, object]]) -> str:
  import csv  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({c: ("" if isinstance(r.get(c), float) and math.isnan(r[c])
                    else r.get(c, "")) for c in columns})
  return buf.getvalue()


def _plan_key(site_ids: Sequence[str], resolution: int, channels: Sequence[int],
              source_size: Sequence[int], compression: str,
              extra: Optional[object] = None) -> str:
  """What a finished shard depends on; `extra` (JSON): the LoadData files of
  its sites and the intensity windows."""
  h = hashlib.sha1()
  h.update(json.dumps([FORMAT_VERSION, resolution, list(channels),
                       list(source_size), compression]).encode())
  if extra is not None:
    h.update(json.dumps(extra, sort_keys=True).encode())
  for s in site_ids:
    h.update(s.encode() + b"\n")
  return h.hexdigest()


def read_plan(dataset: str, input_dir: str, subset: str = "all",
              channels: Sequence[int] = (),
              source_size: Optional[Tuple[int, int]] = None,
              ) -> Tuple[List[Dict[str, object]], List[Dict[str, object]], Tuple[int, int]]:
  """The sites to convert: (typed metadata rows, metadata errors, source size).

  Shared by gandl-convert and the TFDS builders (`tfds_builder.py`). Rows
  that do not parse and repeated site ids become error rows (site_id, path,
  reason); the source size is probed from a few sites unless given.
  """
  df = rxrx.select_subset(rxrx.read_metadata(dataset, input_dir), dataset, subset)
  errors: List[Dict[str, object]] = []
  metas: List[Dict[str, object]] = []
  seen = set()
  for row in df.to_dict("records"):
    try:
      m = rxrx.parse_row(row, dataset)
    except SiteError as e:
      errors.append(dict(site_id=row.get("site_id", ""),
                         path=gio.join(input_dir, "metadata.csv"),
                         reason=e.reason))
      continue
    if m["site_id"] in seen:
      errors.append(dict(site_id=m["site_id"], path=gio.join(input_dir, "metadata.csv"),
                         reason="duplicate site_id (first row kept)"))
      continue
    seen.add(m["site_id"])
    metas.append(m)
  if not metas:
    raise MetadataError(f"{gio.join(input_dir, 'metadata.csv')}: no "
                        f"usable rows for subset {subset!r}")
  if source_size is None:
    source_size = rxrx.probe_source_size(input_dir, metas, channels)
  return metas, errors, tuple(int(s) for s in source_size)


def site_order(num_sites: int) -> np.ndarray:
  """The fixed (seed 42) order of the valid rows in the output: shard i holds
  the i-th `np.array_split` part of it, in order."""
  return np.random.default_rng(SHARD_SEED).permutation(num_sites)


def channel_stats(total: Sequence[float], total_sq: Sequence[float],
                  pixels: int) -> Tuple[List[float], List[float]]:
  """Per-channel mean and std (0..255 scale, 4 decimals) from pixel sums."""
  mean = np.asarray(total, np.float64) / max(pixels, 1)
  std = np.sqrt(np.maximum(np.asarray(total_sq, np.float64) / max(pixels, 1)
                           - mean**2, 0.0))
  return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def dataset_info(dataset: str, *, shards: Sequence[Dict[str, object]],
                 num_failed: int, resolution: int, channels: Sequence[int],
                 compression: str, mean: Sequence[float], std: Sequence[float],
                 subset: str, source: str, source_size: Sequence[int],
                 command: str, columns: Optional[Dict[str, str]] = None,
                 intensity: Optional[Dict[str, object]] = None
                 ) -> Dict[str, object]:
  """The dataset_info.json fields the input pipeline reads (see module doc);
  `shards`: [{"file", "num_examples"}] in reading order. A LoadData set
  (`channels` are names) adds `intensity` (the 8-bit rescaling) and `crop`."""
  if dataset == schema.LOADDATA:
    channel_info = [dict(index=i + 1, name=c,
                         stain=schema.CELL_PAINTING_STAINS.get(c, (c,))[0],
                         target=schema.CELL_PAINTING_STAINS.get(c, (c, ""))[1])
                    for i, c in enumerate(channels)]
    extra = dict(intensity=intensity,
                 crop=("none" if source_size[0] == source_size[1] else
                       "centred square of the shorter side"))
  else:
    names = {c.index: c for c in schema.CHANNELS[dataset]}
    channel_info = [dict(index=c, stain=names[c].stain, target=names[c].target)
                    for c in channels]
    extra = {}
  return dict(
      format_version=FORMAT_VERSION,
      dataset=dataset,
      num_examples=sum(int(s["num_examples"]) for s in shards),
      num_failed=num_failed,
      num_shards=len(shards),
      shards=[dict(file=s["file"], num_examples=int(s["num_examples"])) for s in shards],
      resolution=resolution,
      channels=channel_info,
      num_channels=len(channels),
      image=dict(dtype="uint8", layout="HWC", feature=schema.TFRECORD_IMAGE,
                 shape=[resolution, resolution, len(channels)]),
      columns=dict(columns or dataset_columns(dataset)),
      compression=compression,
      mean=list(mean),
      std=list(std),
      subset=subset,
      source=source,
      source_size=list(source_size),
      resize="area average",
      shard_seed=SHARD_SEED,
      **extra,
      command=command,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  )


def sites_text(dataset: str, rows: Sequence[Dict[str, object]],
               columns: Optional[Sequence[str]] = None) -> str:
  """sites.csv: shard, position and metadata of every site, in reading order."""
  return _csv(("shard", "position") + tuple(columns or schema.COLUMNS[dataset]),
              rows)


def errors_text(errors: Sequence[Dict[str, object]]) -> str:
  """errors.csv: site_id, path, reason of every site not converted."""
  return _csv(("site_id", "path", "reason"), errors)


def convert(dataset: str, input_dir: str, output_dir: str, resolution: int,
            subset: str = "all", num_shards: Optional[int] = None,
            workers: int = 1, channels: Optional[Sequence[int]] = None,
            compression: str = "", overwrite: bool = False,
            source_size: Optional[Tuple[int, int]] = None,
            command: Optional[str] = None,
            path_map: Sequence[Tuple[str, str]] = (),
            clip_percentiles: Optional[Sequence[float]] = loaddata.DEFAULT_CLIP,
            intensity_sample: int = loaddata.DEFAULT_INTENSITY_SAMPLE,
            intensity_seed: int = 0, image_root: Optional[str] = None,
            allow_outside_root: bool = False) -> Dict[str, object]:
  """Converts a dataset tree to TFRecord shards; returns a summary dict.

  Args:
    dataset: "rxrx19a" or "rxrx1" (selects columns and channels), or
      "loaddata": any multi-channel set described by CellProfiler LoadData
      CSVs (docs/data.md, "Any Cell Painting set").
    input_dir: root of the download (holds metadata.csv and images/); for
      "loaddata" the CSV file, or several (a list or comma-separated).
    output_dir: where shards go (created; local or gs://).
    resolution: output edge in pixels (area-averaged from the source).
    subset: "all" or "controls" (RxRx19a: untreated wells; RxRx1: control
      wells).
    num_shards: default about 128 MiB per shard, at least 16.
    workers: processes decoding and resizing PNGs (1: in this process).
    channels: channel numbers to stack (default: all five of RxRx19a;
      w1..w5 of RxRx1); for "loaddata" channel names (the FileName_
      suffixes; default every one, in the CSV's order).
    compression: "" (none; fastest to read) or "GZIP".
    overwrite: redo every shard even when a finished one exists.
    source_size: (height, width) every PNG must have; default: the most
      common size among a few probed sites.
    command: recorded in dataset_info.json (the CLI passes its argv).
    path_map: "loaddata": (old, new) prefix replacements of the files'
      paths (e.g. an s3:// prefix -> the local copy).
    clip_percentiles: "loaddata": (low, high) percentiles of each channel's
      values over the sampled sites, mapped to 0 and 255; None: the full
      range of the bit depth (0..255 or 0..65535).
    intensity_sample: "loaddata": sites sampled for the percentiles.
    intensity_seed: "loaddata": seed of that sample.
    image_root: "loaddata": the directory every image must lie in (default:
      the CSV's directory, or a `path_map` entry's local side).
    allow_outside_root: "loaddata": read images outside the image root.

  Returns:
    {"num_examples", "num_failed", "num_shards", "output_dir", "errors_csv",
     "dataset_info", "skipped_shards"}.

  Raises:
    MetadataError: metadata.csv missing or without the published
      columns (nothing is written).
    ValueError: bad arguments, or shards of another plan in output_dir.
  """
  tf = _tf()
  dataset = dataset.lower()
  is_loaddata = dataset == schema.LOADDATA
  columns = windows = intensity = None
  if is_loaddata:
    inputs = ([p.strip() for p in input_dir.split(",") if p.strip()]
              if isinstance(input_dir, str) else list(input_dir))
    inputs = [p if gio.is_remote(p) else os.path.abspath(p) for p in inputs]
    input_dir = ",".join(inputs)
    if subset != "all":
      raise ValueError(f"subset {subset!r}: a LoadData set converts every "
                       "row (select rows in the CSV instead)")
  else:
    channels = rxrx.check_channels(dataset, channels)
    if not gio.is_remote(input_dir):
      input_dir = os.path.abspath(input_dir)
  if resolution < 4:
    raise ValueError(f"resolution must be >= 4, got {resolution}")
  compression = (compression or "").upper()
  if compression not in ("", "GZIP"):
    raise ValueError(f"compression must be '' or 'GZIP', got {compression!r}")

  if is_loaddata:
    channels, col_names, metas, errors = loaddata.read_loaddata(
        inputs, tuple(str(c) for c in channels or ()), path_map, image_root,
        allow_outside_root)
    if not metas:
      raise MetadataError(f"{input_dir}: no usable rows ({len(errors)} "
                          f"refused, first: {errors[0]['reason'] if errors else '-'})")
    columns = {c: schema.column_type(c, dataset) for c in col_names}
    if source_size is None:
      source_size = loaddata.probe_loaddata_size(metas, channels)
    source_size = tuple(int(v) for v in source_size)
    intensity = loaddata.intensity_windows(metas, channels, clip_percentiles,
                                           intensity_sample, intensity_seed,
                                           workers)
    windows = loaddata.site_windows(intensity)
  else:
    metas, errors, source_size = read_plan(dataset, input_dir, subset, channels,
                                           source_size)
  logging.info("%s: %d sites, source images %dx%d, converting to %dx%d x %d channels",
               input_dir, len(metas), source_size[1], source_size[0], resolution,
               resolution, len(channels))

  n = num_shards or default_num_shards(len(metas), resolution, len(channels))
  n = min(n, len(metas))
  perm = site_order(len(metas))
  plan = [[metas[i] for i in part] for part in np.array_split(perm, n)]

  tf.io.gfile.makedirs(output_dir)
  lock = lock_output(output_dir)
  try:
    return _write_shards(
        tf, dataset, input_dir, output_dir, resolution, subset, num_shards,
        n, plan, metas, errors, channels, compression, overwrite,
        source_size, workers, command, columns, windows, intensity)
  finally:
    unlock_output(output_dir, lock)


def _shard_digest(path: str) -> Tuple[int, str]:
  """(size in bytes, SHA-256 hex) of a local file."""
  h = hashlib.sha256()
  size = 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
      size += len(block)
  return size, h.hexdigest()


def _write_shards(tf, dataset, input_dir, output_dir, resolution, subset,
                  num_shards, n, plan, metas, errors, channels, compression,
                  overwrite, source_size, workers, command, columns=None,
                  windows=None, intensity=None):
  """The body of `convert` once the output directory is locked."""
  prog_dir = gio.join(output_dir, PROGRESS_DIR)
  tf.io.gfile.makedirs(prog_dir)
  others = [p for p in tf.io.gfile.glob(gio.join(output_dir, f"{dataset}-*-of-*.tfrecord"))
            if not p.endswith(f"-of-{n:05d}.tfrecord")]
  if others:
    raise ValueError(f"{output_dir} already holds shards of another conversion "
                     f"(e.g. {others[0]}); use an empty output directory or "
                     f"delete them")

  # Temporary files of an interrupted run (never read; shards are renamed
  # only when complete).
  for stale in tf.io.gfile.glob(gio.join(
      output_dir, gio.tmp_glob(f"{dataset}-*.tfrecord"))):
    tf.io.gfile.remove(stale)

  keys = [_plan_key([m["site_id"] for m in part], resolution, channels,
                    source_size, compression,
                    None if windows is None else dict(
                        windows=windows,
                        files=[m[loaddata.LOADDATA_FILES] for m in part]))
          for part in plan]
  stats: List[Optional[dict]] = [None] * n
  for i in range(n):
    path = gio.join(output_dir, shard_name(dataset, i, n))
    sp = gio.join(prog_dir, shard_name(dataset, i, n) + ".json")
    if not overwrite and tf.io.gfile.exists(path) and tf.io.gfile.exists(sp):
      with tf.io.gfile.GFile(sp, "r") as f:
        s = json.load(f)
      # A record without the shard's size (older converter) or with another
      # size than the file's is not trusted: the shard is redone.
      if (s.get("plan") == keys[i] and "bytes" in s
          and tf.io.gfile.stat(path).length == s["bytes"]):
        stats[i] = s
  skipped = sum(s is not None for s in stats)
  if skipped:
    logging.info("Resuming: %d of %d shards already complete", skipped, n)
  progress = progress_lib.Progress(
      len(metas), done=sum(len(plan[i]) for i in range(n) if stats[i]),
      name="convert", every_s=0.0)

  pool = None
  if workers > 1 and skipped < n:
    # spawn: workers import only numpy/PIL (rxrx.py, loaddata.py), not TF or JAX.
    pool = multiprocessing.get_context("spawn").Pool(workers)
  try:
    options = tf.io.TFRecordOptions(compression_type=compression or None)
    for i in range(n):
      if stats[i] is not None:
        continue
      name = shard_name(dataset, i, n)
      path = gio.join(output_dir, name)
      if windows is None:
        load = rxrx.load_task
        tasks = [(input_dir, m, channels, resolution, source_size)
                 for m in plan[i]]
      else:
        load = loaddata.load_task
        tasks = [(m, channels, resolution, source_size, windows)
                 for m in plan[i]]
      results = (pool.imap(load, tasks, chunksize=4) if pool
                 else map(load, tasks))
      s_sum = np.zeros(len(channels))
      s_sq = np.zeros(len(channels))
      written, shard_errors = [], []
      # The file of an older conversion under this name goes first: the
      # progress record below is written before the new shard is published,
      # and a kill in between must not leave the old shard under the record.
      gio.remove(path)
      with gio.atomic_path(path) as tmp:
        with tf.io.TFRecordWriter(tmp, options) as w:
          for r in results:
            if r.image is None:
              shard_errors.append(dict(site_id=r.meta["site_id"], path=r.path,
                                       reason=r.error))
              continue
            w.write(encode_example(r.image, r.meta, dataset, columns))
            x = r.image.reshape(-1, len(channels)).astype(np.float64)
            s_sum += x.sum(0)
            s_sq += (x * x).sum(0)
            written.append(r.meta["site_id"])
        size, digest = _shard_digest(tmp)
        stats[i] = dict(plan=keys[i], shard=name, site_ids=written,
                        errors=shard_errors, sum=s_sum.tolist(),
                        sumsq=s_sq.tolist(),
                        pixels=len(written) * resolution * resolution,
                        bytes=size, sha256=digest)
        # Progress record first, shard published last (when this block
        # ends): a shard file under its final name always has its record.
        gio.write_text(gio.join(prog_dir, name + ".json"),
                       json.dumps(stats[i]))
      progress.update(len(plan[i]))
  finally:
    if pool is not None:
      pool.close()
      pool.join()

  # Summary files.
  by_id = {m["site_id"]: m for m in metas}
  index_rows = []
  for i, s in enumerate(stats):
    for pos, sid in enumerate(s["site_ids"]):
      index_rows.append(dict(shard=s["shard"], position=pos,
                             **{k: v for k, v in by_id[sid].items()
                                if k != loaddata.LOADDATA_FILES}))
    errors += s["errors"]
  pixels = sum(s["pixels"] for s in stats)
  mean, std = channel_stats(np.sum([s["sum"] for s in stats], 0),
                            np.sum([s["sumsq"] for s in stats], 0), pixels)
  num_examples = len(index_rows)
  info = dataset_info(
      dataset,
      shards=[dict(file=s["shard"], num_examples=len(s["site_ids"])) for s in stats],
      num_failed=len(errors), resolution=resolution, channels=channels,
      compression=compression, mean=mean, std=std, subset=subset,
      source=input_dir, source_size=source_size, columns=columns,
      intensity=intensity,
      command=command or (f"gandl_jax.data.convert.convert(dataset={dataset!r}, "
                          f"input_dir={input_dir!r}, output_dir={output_dir!r}, "
                          f"resolution={resolution}, subset={subset!r}, "
                          f"num_shards={num_shards}, channels={list(channels)})"))
  gio.write_text(gio.join(output_dir, schema.SITES_INDEX_FILE),
                 sites_text(dataset, index_rows, columns and list(columns)))
  errors_path = gio.join(output_dir, ERRORS_FILE)
  gio.write_text(errors_path, errors_text(errors))
  gio.write_text(gio.join(output_dir, schema.DATASET_INFO_FILE),
              json.dumps(info, indent=2) + "\n")
  summary = dict(num_examples=num_examples, num_failed=len(errors), num_shards=n,
                 skipped_shards=skipped, output_dir=output_dir,
                 errors_csv=errors_path,
                 dataset_info=gio.join(output_dir, schema.DATASET_INFO_FILE))
  logging.info("Converted %d sites into %d shards in %s; %d failed%s", num_examples,
               n, output_dir, len(errors),
               f" (see {errors_path})" if errors else "")
  return summary
