"""RxRx19a / RxRx1 (or the synthetic tree), or any Cell Painting set described
by CellProfiler LoadData CSVs (`dataset="loaddata"`) -> deterministic TFRecord
shards.

Output directory (local or gs://)::

  {dataset}-{i:05d}-of-{n:05d}.tfrecord   one tf.train.Example per site
                                          (layout: gandl_jax/schema.py)
  sites.csv                               shard, position and metadata of every
                                          converted site, in shard order
  errors.csv                              site_id, path, reason of every site
                                          that could not be converted
  dataset_info.json                       counts, resolution, channels,
                                          per-channel mean/std, source, command,
                                          the fingerprint and every shard's
                                          name, record count, size and SHA-256;
                                          written last: the commit marker
  _progress/fingerprint.json              the fingerprint of this conversion
                                          (`fingerprint`), written first
  _progress/{shard}.json                  one JSON per finished shard (resume):
                                          fingerprint, site ids, statistics,
                                          the shard's size and SHA-256
  .gandl-convert.lock                     held while a conversion runs (see
                                          `lock_output`)

Sites are assigned to shards by a fixed permutation (seed 42) of the valid
metadata rows, so every shard mixes plates and conditions and the output is
identical for any worker count.

Fingerprint: a SHA-256 of everything the shard bytes depend on (every
converted metadata row with all its columns and, for LoadData, its files, in
plan order; dataset, resolution, channels, source size, shard count,
compression, intensity windows, record format). A rerun with the same
fingerprint resumes: finished shards whose progress record carries the
fingerprint and whose size matches are kept, the rest redone. A rerun with
another fingerprint is refused with a one-line diff (`describe_change`)
unless `overwrite`, which redoes every shard.

Commit marker: before any shard is touched, dataset_info.json (and
sites.csv, errors.csv) are removed; dataset_info.json is written last, once
every shard is in place. Readers (`pipeline.read_dataset_info`) refuse a
directory without it or whose shard files differ from its list, so an
interrupted conversion is never read. Each shard is written to a temporary
name and renamed when complete; before a shard is redone, the file under its
name is deleted, so a kill between the progress record and the rename can
never leave an old shard next to a new record.

The sites are read by `rxrx.py` and `loaddata.py`. This module is longer
than most (~800 lines) because planning, the fingerprint, the resumable
shard writer, its progress records and the output lock are one job, a
conversion that survives kills and reruns, whose rules read best in one
place.
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
FINGERPRINT_FILE = "fingerprint.json"   # in PROGRESS_DIR
FORMAT_VERSION = 1


class ConversionError(ValueError):
  """A conversion that cannot produce a usable directory (no site converted,
  sources smaller than the resolution, a changed fingerprint)."""


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


def _row_digest(meta: Dict[str, object]) -> str:
  """A short SHA-256 of one metadata row: every column (and LoadData files)."""
  text = json.dumps(meta, sort_keys=True, default=str, ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint(dataset: str, planned: Sequence[Dict[str, object]], *,
                resolution: int, channels: Sequence[object],
                source_size: Sequence[int], num_shards: int,
                compression: str, columns: Sequence[str],
                intensity: Optional[Dict[str, object]] = None
                ) -> Dict[str, object]:
  """What the shard bytes depend on, and its SHA-256.

  Args:
    dataset: "rxrx19a", "rxrx1" or "loaddata".
    planned: the metadata rows to convert, in plan order (shard 0 first).
    resolution, channels, source_size, num_shards, compression: as converted.
    columns: the record's metadata columns, in order.
    intensity: a LoadData set's `intensity` record (percentiles, windows).

  Returns:
    {"sha256", "parts" (the settings), "rows" ([site_id, row digest] in plan
    order)}; `describe_change` compares two of them.
  """
  parts = dict(format_version=FORMAT_VERSION, dataset=dataset,
               resolution=int(resolution),
               channels=[str(c) if isinstance(c, str) else int(c)
                         for c in channels],
               source_size=[int(v) for v in source_size],
               num_shards=int(num_shards), compression=compression,
               columns=list(columns))
  if intensity is not None:
    parts["clip_percentiles"] = intensity.get("percentiles")
    parts["windows"] = [[c["name"], float(c["low"]), float(c["high"])]
                        for c in intensity["channels"]]
  rows = [[str(m["site_id"]), _row_digest(m)] for m in planned]
  h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8"))
  for sid, digest in rows:
    h.update(f"{sid}\t{digest}\n".encode("utf-8"))
  return dict(sha256=h.hexdigest(), parts=parts, rows=rows)


def _settings(text) -> str:
  return (",".join(str(v) for v in text) if isinstance(text, (list, tuple))
          else str(text))


def describe_change(old: Optional[Dict[str, object]],
                    new: Dict[str, object]) -> str:
  """A short one-line diff of two `fingerprint`s, e.g. "resolution 64 -> 32;
  columns added: Metadata_JCP2022; metadata rows changed: 12 sites"."""
  if not old or "parts" not in old:
    return "no fingerprint recorded"
  a, b = old["parts"], new["parts"]
  out = []
  for key in ("format_version", "dataset", "resolution", "channels",
              "source_size", "num_shards", "compression", "clip_percentiles"):
    if a.get(key) != b.get(key):
      out.append(f"{key} {_settings(a.get(key))} -> {_settings(b.get(key))}")
  ca, cb = list(a.get("columns", [])), list(b.get("columns", []))
  added = [c for c in cb if c not in ca]
  removed = [c for c in ca if c not in cb]
  if added:
    out.append("columns added: " + ", ".join(added))
  if removed:
    out.append("columns removed: " + ", ".join(removed))
  if not added and not removed and ca != cb:
    out.append("column order changed")
  if a.get("clip_percentiles") == b.get("clip_percentiles") and (
      a.get("windows") != b.get("windows")):
    out.append("intensity windows changed")
  ra = {sid: d for sid, d in old.get("rows", [])}
  rb = {sid: d for sid, d in new.get("rows", [])}
  gone = [s for s in ra if s not in rb]
  new_ids = [s for s in rb if s not in ra]
  changed = [s for s in rb if s in ra and ra[s] != rb[s]]
  if new_ids:
    out.append(f"sites added: {len(new_ids)} (e.g. {new_ids[0]})")
  if gone:
    out.append(f"sites removed: {len(gone)} (e.g. {gone[0]})")
  if changed and not (added or removed):
    out.append(f"metadata rows changed: {len(changed)} sites (e.g. "
               f"{changed[0]})")
  if not out and [s for s, _ in old.get("rows", [])] != [
      s for s, _ in new.get("rows", [])]:
    out.append("site order changed (rows reordered)")
  return "; ".join(out) or "fingerprint differs"


def read_fingerprint(output_dir: str) -> Optional[Dict[str, object]]:
  """The fingerprint recorded in `output_dir` (None when there is none)."""
  path = gio.join(output_dir, PROGRESS_DIR, FINGERPRINT_FILE)
  if not gio.exists(path):
    return None
  try:
    out = json.loads(gio.read_text(path))
  except ValueError:
    return {}
  return out if isinstance(out, dict) else {}


def check_source_size(source_size: Sequence[int], resolution: int,
                      where: str, square: bool) -> None:
  """ConversionError when no site of `source_size` could be converted at
  `resolution` (smaller sources, or non-square RxRx images)."""
  h, w = (int(v) for v in source_size)
  if square and h != w:
    raise ConversionError(
        f"{where}: the source images are {w}x{h} pixels (not square); no site "
        "would convert")
  if min(h, w) < resolution:
    raise ConversionError(
        f"{where}: the source images are {w}x{h} pixels, smaller than "
        f"--resolution {resolution}; no site would convert (use --resolution "
        f"{min(h, w)} or less)" if min(h, w) >= 4 else
        f"{where}: the source images are {w}x{h} pixels, smaller than "
        f"--resolution {resolution} (at least 4x4 is needed); no site would "
        "convert")


def read_plan(dataset: str, input_dir: str, subset: str = "all",
              channels: Sequence[int] = (),
              source_size: Optional[Tuple[int, int]] = None,
              resolution: Optional[int] = None,
              ) -> Tuple[List[Dict[str, object]], List[Dict[str, object]], Tuple[int, int]]:
  """The sites to convert: (typed metadata rows, metadata errors, source size).

  Shared by gandl-convert and the TFDS builders (`tfds_builder.py`). Rows
  that do not parse and repeated site ids become error rows (site_id, path,
  reason); the source size is probed from a few sites unless given. With a
  `resolution`, sources too small (or not square) for it are refused here
  (ConversionError), before any site is read.
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
  source_size = tuple(int(s) for s in source_size)
  if resolution is not None:
    check_source_size(source_size, resolution, gio.join(input_dir, "images"),
                      square=True)
  return metas, errors, source_size


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
                 intensity: Optional[Dict[str, object]] = None,
                 fingerprint: Optional[Dict[str, object]] = None,
                 sites_bytes: Optional[int] = None,
                 ) -> Dict[str, object]:
  """The dataset_info.json fields the input pipeline reads (see module doc);
  `shards`: [{"file", "num_examples", and optionally "bytes", "sha256"}] in
  reading order (readers check the files against the names and sizes;
  `sites_bytes`: the size of sites.csv, checked as well). A LoadData set
  (`channels` are names) adds `intensity` (the 8-bit rescaling) and `crop`;
  `fingerprint`: what the shards depend on (`fingerprint`, without rows)."""
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
      shards=[dict(file=s["file"], num_examples=int(s["num_examples"]),
                   **{k: s[k] for k in ("bytes", "sha256") if k in s})
              for s in shards],
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
      **({} if fingerprint is None else dict(fingerprint=fingerprint)),
      **({} if sites_bytes is None else dict(sites_bytes=int(sites_bytes))),
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
    overwrite: replace the conversion in `output_dir`: every shard is
      redone (required when the recorded fingerprint differs).
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
    ConversionError: `output_dir` holds a conversion with another
      fingerprint and not `overwrite` (nothing is touched); sources smaller
      than `resolution` (nothing is written); no site converted (no shards
      and no dataset_info.json are left, errors.csv lists the reasons).
    ValueError: bad arguments.
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
    check_source_size(source_size, resolution, input_dir, square=False)
    intensity = loaddata.intensity_windows(metas, channels, clip_percentiles,
                                           intensity_sample, intensity_seed,
                                           workers)
    windows = loaddata.site_windows(intensity)
  else:
    metas, errors, source_size = read_plan(dataset, input_dir, subset, channels,
                                           source_size, resolution)
  logging.info("%s: %d sites, source images %dx%d, converting to %dx%d x %d channels",
               input_dir, len(metas), source_size[1], source_size[0], resolution,
               resolution, len(channels))

  n = num_shards or default_num_shards(len(metas), resolution, len(channels))
  n = min(n, len(metas))
  perm = site_order(len(metas))
  plan = [[metas[i] for i in part] for part in np.array_split(perm, n)]

  command = command or (
      f"gandl_jax.data.convert.convert(dataset={dataset!r}, "
      f"input_dir={input_dir!r}, output_dir={output_dir!r}, "
      f"resolution={resolution}, subset={subset!r}, num_shards={num_shards}, "
      f"channels={list(channels)})")
  fp = fingerprint(dataset, [m for part in plan for m in part],
                   resolution=resolution, channels=channels,
                   source_size=source_size, num_shards=n,
                   compression=compression,
                   columns=list(columns or dataset_columns(dataset)),
                   intensity=intensity)
  fp["command"] = command

  tf.io.gfile.makedirs(output_dir)
  lock = lock_output(output_dir)
  try:
    return _write_shards(
        tf, dataset, input_dir, output_dir, resolution, subset,
        n, plan, metas, errors, channels, compression, overwrite,
        source_size, workers, command, fp, columns, windows, intensity)
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


def _shard_files(output_dir: str, datasets: Sequence[str]) -> List[str]:
  """Shard files (any count) of `datasets` in `output_dir`."""
  tf = _tf()
  return sorted(p for d in sorted(set(datasets)) for p in tf.io.gfile.glob(
      gio.join(output_dir, f"{d}-*-of-*.tfrecord")))


def _start(output_dir: str, dataset: str, n: int, fp: Dict[str, object],
           overwrite: bool) -> None:
  """Checks the recorded fingerprint, then invalidates the directory's commit
  marker and records `fp`, before any shard is touched."""
  tf = _tf()
  prog_dir = gio.join(output_dir, PROGRESS_DIR)
  old = read_fingerprint(output_dir)
  datasets = [dataset] + ([old["parts"]["dataset"]] if old and "parts" in old
                          else [])
  shards = _shard_files(output_dir, datasets)
  records = [p for p in tf.io.gfile.glob(gio.join(prog_dir, "*.tfrecord.json"))]
  if not overwrite and (old is not None or shards or records):
    if old is None or old.get("sha256") != fp["sha256"]:
      raise ConversionError(
          f"{output_dir} holds another conversion ("
          f"{describe_change(old, fp)}); pass --overwrite to replace it, or "
          "use another --output")
    others = [p for p in shards if not p.endswith(f"-of-{n:05d}.tfrecord")]
    if others:
      raise ConversionError(
          f"{output_dir} already holds shards of another conversion (e.g. "
          f"{others[0]}); pass --overwrite to replace them, or delete them")
  # The commit marker goes first: from here until the end the directory is
  # refused by every reader.
  for name in (schema.DATASET_INFO_FILE, schema.SITES_INDEX_FILE, ERRORS_FILE):
    gio.remove(gio.join(output_dir, name))
  tf.io.gfile.makedirs(prog_dir)
  gio.write_text(gio.join(prog_dir, FINGERPRINT_FILE), json.dumps(fp) + "\n")
  if overwrite:
    for p in shards:
      if not p.endswith(f"-of-{n:05d}.tfrecord"):
        gio.remove(p)
        gio.remove(gio.join(prog_dir, os.path.basename(p) + ".json"))
  # Temporary files of an interrupted run (never read; shards are renamed
  # only when complete).
  for d in set(datasets):
    for stale in tf.io.gfile.glob(gio.join(
        output_dir, gio.tmp_glob(f"{d}-*.tfrecord"))):
      tf.io.gfile.remove(stale)


def _write_shards(tf, dataset, input_dir, output_dir, resolution, subset,
                  n, plan, metas, errors, channels, compression,
                  overwrite, source_size, workers, command, fp, columns=None,
                  windows=None, intensity=None):
  """The body of `convert` once the output directory is locked."""
  prog_dir = gio.join(output_dir, PROGRESS_DIR)
  _start(output_dir, dataset, n, fp, overwrite)
  stats: List[Optional[dict]] = [None] * n
  for i in range(n):
    path = gio.join(output_dir, shard_name(dataset, i, n))
    sp = gio.join(prog_dir, shard_name(dataset, i, n) + ".json")
    if not overwrite and tf.io.gfile.exists(path) and tf.io.gfile.exists(sp):
      with tf.io.gfile.GFile(sp, "r") as f:
        s = json.load(f)
      # A record of another fingerprint, or with another size than the
      # file's, is not trusted: the shard is redone.
      if (s.get("fingerprint") == fp["sha256"] and "bytes" in s
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
        stats[i] = dict(fingerprint=fp["sha256"], shard=name, site_ids=written,
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
  errors_path = gio.join(output_dir, ERRORS_FILE)
  if num_examples == 0:
    # Nothing usable: no (empty) shards and no dataset_info.json are left,
    # only errors.csv with every site's reason.
    for s in stats:
      gio.remove(gio.join(output_dir, s["shard"]))
      gio.remove(gio.join(prog_dir, s["shard"] + ".json"))
    gio.remove(gio.join(prog_dir, FINGERPRINT_FILE))
    gio.write_text(errors_path, errors_text(errors))
    first = errors[0] if errors else dict(site_id="-", reason="-")
    raise ConversionError(
        f"{input_dir}: no site converted ({len(errors)} failed, first "
        f"{first['site_id']}: {first['reason']}); every reason is in "
        f"{errors_path}")
  sites = sites_text(dataset, index_rows, columns and list(columns))
  info = dataset_info(
      dataset,
      shards=[dict(file=s["shard"], num_examples=len(s["site_ids"]),
                   bytes=s["bytes"], sha256=s["sha256"]) for s in stats],
      num_failed=len(errors), resolution=resolution, channels=channels,
      compression=compression, mean=mean, std=std, subset=subset,
      source=input_dir, source_size=source_size, columns=columns,
      intensity=intensity, command=command,
      fingerprint=dict(sha256=fp["sha256"], **fp["parts"]),
      sites_bytes=len(sites.encode("utf-8")))
  gio.write_text(gio.join(output_dir, schema.SITES_INDEX_FILE), sites)
  gio.write_text(errors_path, errors_text(errors))
  # Last: the commit marker (see the module doc).
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
