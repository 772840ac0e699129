"""tf.data input pipeline over the converter's TFRecord shards.

Two entry points, both delivering global `jax.Array`s sharded on the mesh's
`data` axis (via `gandl_jax.sharding.host_to_global`):

* `train_batches`: infinite, shuffled, augmented uint8 images (the training
  step maps them to [-1, 1] on the device), two batches in flight to the
  device (`prefetch_to_device`).
  Files are split per host (`files[process_index::process_count]`); every
  epoch has its own seeds (file order, shuffle, flips/rotations), so the stream
  is a pure function of (seed, host, batch number) and `start_batch` resumes
  it exactly: epoch = start // sites_per_host, then the first
  `start % sites_per_host` records of that epoch are skipped (read, not
  decoded; at most one epoch of this host's files).
* `eval_batches`: every (filtered) site exactly once, in shard order, uint8,
  no augmentation, the last batch padded, with a `valid` mask, the metadata
  and each row's global `index` (its position in sites.csv) as host-local
  numpy arrays. Hosts read disjoint files and all hosts yield the same number
  of batches (short hosts yield padding), so collective steps line up. Process
  0 merges per-host outputs by sorting on `index` (padding has index -1); the
  result does not depend on the number of hosts.

Metadata filters (`config.data.filter`, `eval_batches(filter=...)`,
`--filter` of gandl-export and gandl-features) are either a dict
`{column: value or [values]}` (all must hold) or a pandas `DataFrame.query`
condition over the metadata columns of sites.csv::

  disease_condition in ['Mock', 'Active SARS-CoV-2'] and cell_type == 'HRCE'
  treatment == '' and not (plate > 2)
  treatment_conc >= 1.0 or disease_condition != 'Active SARS-CoV-2'
  1 < plate <= 3 and well.str.startswith('B')

`==, !=, <, <=, >, >=, in, not in`, `and`, `or`, `not` (or `&`, `|`, `~`)
and parentheses; either side may be a column, a literal or a list of
literals, comparisons may be chained, and string columns have pandas' `.str`
methods. A value of the wrong type matches nothing (`plate == 'one'` selects
no site) rather than being refused; an unknown column or an expression that
is not a condition is an error naming the columns. The filter is evaluated
once on sites.csv (`select_sites`; counting sites reads no image); tf.data
keeps the records whose site_id it selected.

Two on-disk layouts are read, with the same records (schema.TFRECORD_*):
gandl-convert's directory (`*.tfrecord`, dataset_info.json, sites.csv) and a
TFDS dataset directory written by the builders in `tfds_builder.py`
(`DATA_DIR/rxrx19a/256/2.0.0`: TFDS's shard files and JSON, the same fields
as dataset_info.json in TFDS's metadata.json, and sites.csv). Everything
below (per-host files, shuffling, resume, eval order) is the same for both.

Paths are local or `gs://` (tf.io.gfile everywhere).

The module is longer than most (~600 lines) because the shard locator, the
filter and both streams share one contract, which records a host reads and
in which order (sites.csv order, files split per host); splitting them would
put that contract in several places.
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from gandl_jax import io as gio
from gandl_jax import config as config_lib
from gandl_jax import images as image_lib
from gandl_jax import schema
from gandl_jax import sharding

FilterSpec = Union[None, str, Mapping[str, Any]]


def _tf():
  return gio.tensorflow()   # TF serves only tf.data, off the accelerators


# --------------------------------------------------------------------------
# Locating shards and their metadata.


def _has_glob(p: str) -> bool:
  return any(ch in p for ch in "*?[")


def is_tfds_dir(directory: str) -> bool:
  """A TFDS dataset directory (it holds TFDS's features.json)."""
  return _tf().io.gfile.exists(os.path.join(directory, schema.TFDS_FEATURES_FILE))


def shard_dir(path: str) -> str:
  """Directory of the shards for a directory, a glob or a shard file."""
  tf = _tf()
  path = path.rstrip("/")
  if _has_glob(path) or (not tf.io.gfile.isdir(path) and (
      path.endswith(".tfrecord") or tf.io.gfile.exists(path))):
    d = os.path.dirname(path)
    if _has_glob(d):
      raise ValueError(f"{path}: wildcards are allowed only in the file name, "
                       "not in the directory")
    return d
  return path


def list_shards(path: str) -> List[str]:
  """Sorted shard files for a directory, a glob or a file.

  A directory's shards are those its dataset_info.json (or TFDS
  metadata.json) lists; every form is checked by `read_dataset_info`.
  """
  tf = _tf()
  if not path:
    raise ValueError("data path is empty; set config.data.path to a shard "
                     "directory or glob (e.g. '/data/shards/rxrx19a-256/*.tfrecord')")
  p = path.rstrip("/")
  checked = False
  if _has_glob(p):
    files = tf.io.gfile.glob(p)
  elif tf.io.gfile.isdir(p):
    files = [os.path.join(p, s["file"]) for s in read_dataset_info(p)["shards"]]
    checked = True
  else:
    files = [p] if tf.io.gfile.exists(p) else []
  files = sorted(f for f in files if ".tmp-" not in f)
  if not files:
    raise FileNotFoundError(f"{path}: no TFRecord shards found (run gandl-convert "
                            "or tfds build first)")
  if not checked:
    read_dataset_info(p)    # the directory must hold one complete conversion
  return files


class IncompleteDataError(FileNotFoundError):
  """A shard directory that is not one complete conversion."""


def _recorded_command(d: str) -> str:
  """The command that wrote (or is writing) shard directory `d`, from its
  progress records or lock file; "" when none is recorded."""
  for name in (os.path.join("_progress", "fingerprint.json"),
               ".gandl-convert.lock"):
    try:
      with _tf().io.gfile.GFile(os.path.join(d, name), "r") as fh:
        command = json.load(fh).get("command")
    except Exception:  # pylint: disable=broad-except
      continue        # missing, unreadable or not JSON: try the next one
    if isinstance(command, str) and command:
      return command
  return ""


def _incomplete(d: str, what: str, command: str) -> IncompleteDataError:
  rerun = (f"complete it with: {command}" if command else
           "convert it again (gandl-convert ... --overwrite)")
  return IncompleteDataError(f"{d}: not a complete conversion ({what}); "
                             f"{rerun}")


_SHARD_INDEX = re.compile(r"-\d{5}-of-\d{5}")
# Remote directories already checked in this process (a stat per shard is a
# request there): {(directory, dataset_info text, file names)}.
_CHECKED_REMOTE = set()


def check_complete(d: str, info: Mapping[str, Any], text: str = "") -> None:
  """Refuses shard directory `d` unless its files are exactly those `info`
  (its dataset_info.json or TFDS metadata.json) lists: every listed shard
  present, no other file of the same name pattern, each of the recorded size
  (where `info` records sizes), and sites.csv of the recorded size. Sizes,
  not hashes: cheap enough for every read. IncompleteDataError, one line
  naming `d` and the command that completes it, otherwise."""
  tf = _tf()
  command = str(info.get("command") or "") or _recorded_command(d)
  shards = info.get("shards")
  if (not isinstance(shards, list) or not shards
      or not all(isinstance(s, Mapping) and isinstance(s.get("file"), str)
                 for s in shards)):
    raise _incomplete(d, "its dataset info lists no shards", command)
  listed = {s["file"]: s for s in shards}
  present = set()
  for pattern in sorted({_SHARD_INDEX.sub("-*-of-*", f) for f in listed}):
    for f in tf.io.gfile.glob(os.path.join(d, pattern)):
      name = os.path.basename(f)
      if not name.startswith(".") and ".tmp-" not in name:
        present.add(name)
  missing = sorted(set(listed) - present)
  if missing:
    raise _incomplete(d, f"{len(missing)} of {len(listed)} listed shards "
                      f"missing, e.g. {missing[0]}", command)
  extra = sorted(present - set(listed))
  if extra:
    raise _incomplete(d, f"{len(extra)} shard files not in its dataset "
                      f"info, e.g. {extra[0]}", command)
  key = (d, text, tuple(sorted(present)))
  if gio.is_remote(d) and key in _CHECKED_REMOTE:
    return
  sized = [(os.path.join(d, f), s["bytes"]) for f, s in sorted(listed.items())
           if isinstance(s.get("bytes"), int)]
  if isinstance(info.get("sites_bytes"), int):
    sized.append((os.path.join(d, schema.SITES_INDEX_FILE), info["sites_bytes"]))

  def size(f):
    try:
      return tf.io.gfile.stat(f).length
    except tf.errors.NotFoundError:
      return None

  if gio.is_remote(d) and len(sized) > 8:
    from concurrent import futures  # pylint: disable=import-outside-toplevel
    with futures.ThreadPoolExecutor(16) as ex:
      got = list(ex.map(size, [f for f, _ in sized]))
  else:
    got = [size(f) for f, _ in sized]
  for (f, want), have in zip(sized, got):
    if have != want:
      raise _incomplete(d, f"{os.path.basename(f)} is "
                        + ("missing" if have is None else f"{have} bytes")
                        + f", its dataset info records {want}", command)
  if gio.is_remote(d):
    _CHECKED_REMOTE.add(key)


def read_dataset_info(path: str) -> Dict[str, Any]:
  """dataset_info.json that sits next to the shards of `path`, checked:
  every reader (training, export, features, the probe, TFDS directories)
  comes here first, so a directory that is not one complete conversion
  (`check_complete`) is refused by all of them."""
  tf = _tf()
  d = shard_dir(path)
  if is_tfds_dir(d):
    f = os.path.join(d, schema.TFDS_METADATA_FILE)
    if not tf.io.gfile.exists(f):
      raise FileNotFoundError(
          f"{f} not found: {d} is a TFDS dataset directory but not one built "
          "by gandl_jax's builders (tfds build gandl_jax/data/tfds_rxrx19a.py "
          "or tfds_rxrx1.py), which record the dataset's fields there")
  else:
    f = os.path.join(d, schema.DATASET_INFO_FILE)
  if not tf.io.gfile.exists(f):
    command = _recorded_command(d)
    if command:
      raise _incomplete(d, f"no {schema.DATASET_INFO_FILE}: a conversion is "
                        "running or was interrupted", command)
    versions = tf.io.gfile.glob(os.path.join(d, "*", schema.TFDS_FEATURES_FILE))
    hint = (f"; {d} holds TFDS versions: use the version directory, e.g. "
            f"{os.path.dirname(sorted(versions)[-1])}" if versions else "")
    raise FileNotFoundError(
        f"{f} not found: {path} does not look like gandl-convert output "
        f"(every shard directory has a {schema.DATASET_INFO_FILE}) or a TFDS "
        f"dataset built by gandl_jax's builders{hint}")
  with tf.io.gfile.GFile(f, "r") as fh:
    text = fh.read()
  try:
    info = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{f}: not valid JSON ({e})") from e
  if not isinstance(info, dict):
    raise ValueError(f"{f}: not a JSON object")
  for key in ("resolution", "num_channels", "columns", "dataset"):
    if key not in info:
      raise ValueError(f"{f}: missing field {key!r}")
  check_complete(d, info, text)
  return info


def read_sites_index(path: str):
  """sites.csv next to the shards: shard, position and metadata typed as
  dataset_info.json's `columns` say."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  tf = _tf()
  columns = read_dataset_info(path)["columns"]   # checks the directory first
  f = os.path.join(shard_dir(path), schema.SITES_INDEX_FILE)
  if not tf.io.gfile.exists(f):
    raise FileNotFoundError(f"{f} not found (written by gandl-convert or the "
                            "TFDS builders next to the shards)")
  with tf.io.gfile.GFile(f, "rb") as fh:
    df = pd.read_csv(fh, dtype=str, keep_default_na=False)
  for c in df.columns:
    kind = ("int64" if c == "position" else
            columns.get(c) or schema.column_type(c))
    if kind == "int64":
      df[c] = df[c].astype(np.int64)
    elif kind == "float":
      df[c] = df[c].replace("", "nan").astype(np.float64)
  return df


# --------------------------------------------------------------------------
# Metadata filters: evaluated once on sites.csv; tf.data keeps the records
# whose site_id was selected.

def select_sites(table, filter: FilterSpec,  # pylint: disable=redefined-builtin
                 source: str = "") -> np.ndarray:
  """Boolean mask over the rows of a sites.csv frame (`read_sites_index`).

  `filter`: None or "" (every row); a dict `{column: value or [values]}`
  (all must hold); or a condition in the syntax of pandas
  `DataFrame.query`, evaluated with `DataFrame.eval` (python engine, no
  `@` variables). ValueError, one line naming the filter and the columns,
  for an unknown column or an expression that is not a condition over the
  rows; `source` (a path) prefixes the message.
  """
  where = f"{source}: " if source else ""
  columns = [c for c in table.columns if c not in ("shard", "position")]
  if filter is None or (isinstance(filter, str) and not filter.strip()) or (
      isinstance(filter, Mapping) and not filter):
    return np.ones(len(table), bool)
  if isinstance(filter, Mapping):
    mask = np.ones(len(table), bool)
    for col, value in filter.items():
      if col not in columns:
        raise ValueError(f"{where}filter {dict(filter)!r}: unknown column "
                         f"{col!r}; columns are {columns}")
      values = (list(value) if isinstance(value, (list, tuple, set, frozenset))
                else [value])
      mask &= table[col].isin(values).to_numpy()
    return mask
  if not isinstance(filter, str):
    raise TypeError(f"filter must be a string, a dict or None, got "
                    f"{type(filter).__name__}")
  try:
    out = table[columns].eval(filter, engine="python", local_dict={},
                              global_dict={})
  except Exception as e:  # pandas raises many types for a bad expression
    msg = " ".join(str(e).split()) or type(e).__name__
    raise ValueError(f"{where}filter {filter!r}: {msg} (a pandas "
                     f"DataFrame.query condition over the columns "
                     f"{columns})") from None
  if not (hasattr(out, "dtype") and getattr(out, "shape", None) == (len(table),)
          and out.dtype == bool):
    raise ValueError(f"{where}filter {filter!r}: not a condition (it must give "
                     f"True or False per site, e.g. \"cell_type == 'HRCE'\"; "
                     f"compare with ==, not =); columns are {columns}")
  return np.asarray(out, bool)


def _site_id_filter(site_ids: Sequence[str]):
  """tf.data predicate: a parsed example's site_id is one of `site_ids`."""
  tf = _tf()
  keys = tf.constant(list(site_ids) or [""], tf.string)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          keys, tf.constant([bool(site_ids)] * max(len(site_ids), 1))),
      default_value=False)
  return lambda features: table.lookup(features["site_id"])


def _describe_columns(info: Mapping[str, Any]) -> str:
  return ", ".join(f"{c} ({k})" for c, k in info["columns"].items())


# --------------------------------------------------------------------------
# Parsing.


def _feature_spec(info: Mapping[str, Any], columns: Sequence[str]):
  tf = _tf()
  spec = {schema.TFRECORD_IMAGE: tf.io.FixedLenFeature([], tf.string)}
  for c in columns:
    kind = info["columns"][c]
    spec[c] = tf.io.FixedLenFeature(
        [], {"int64": tf.int64, "float": tf.float32, "bytes": tf.string}[kind])
  return spec


def _decode_image(raw, info):
  tf = _tf()
  r, c = int(info["resolution"]), int(info["num_channels"])
  img = tf.io.decode_raw(raw, tf.uint8)
  return tf.reshape(img, [r, r, c])


def _record_dataset(files, info, cycle_length: int = 1):
  tf = _tf()
  compression = info.get("compression") or None
  files_ds = files if isinstance(files, tf.data.Dataset) else \
      tf.data.Dataset.from_tensor_slices(list(files))
  if cycle_length <= 1:
    return files_ds.flat_map(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression))
  return files_ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, compression_type=compression,
                                        buffer_size=8 * 2**20),
      cycle_length=cycle_length, block_length=1,
      num_parallel_calls=cycle_length, deterministic=True)


def _host_files(files: Sequence[str], process_index: int, process_count: int) -> List[str]:
  return list(files[process_index::process_count])


def check_dataset(info: Mapping[str, Any], path: str,
                  resolution: Optional[int],
                  channels: Union[None, int, Sequence[int]],
                  against: str = "the model") -> None:
  """The shards' resolution and channels (a count, or the channel numbers)
  must be what the model (`against`: the config or a checkpoint) expects."""
  errors = []
  if resolution is not None and int(info["resolution"]) != int(resolution):
    errors.append(
        f"the shards have resolution {info['resolution']} but {against} "
        f"expects {resolution} (convert with gandl-convert --resolution "
        f"{resolution}, or change the config's resolution)")
  if isinstance(channels, (int, np.integer)) and (
      int(info["num_channels"]) != int(channels)):
    errors.append(f"the shards have {info['num_channels']} channels but "
                  f"{against} expects {channels} (a model's channel count "
                  f"follows its data: set config.model.img_channels = "
                  f"{info['num_channels']}, e.g. --config.model.img_channels "
                  f"{info['num_channels']})")
  if errors:
    raise ValueError(f"{path}: " + "; ".join(errors))
  if channels is None or isinstance(channels, (int, np.integer)):
    return
  have = [c["index"] if isinstance(c, Mapping) else int(c)
          for c in info.get("channels", [])]
  if list(have) != [int(c) for c in channels]:
    raise ValueError(f"{path}: the shards hold channels {have} but "
                     f"{against} expects {list(channels)}")


def host_sites(path: str, filter: FilterSpec = None,  # pylint: disable=redefined-builtin
               process_index: int = 0, process_count: int = 1, *,
               _table=None, _files=None):
  """Rows of sites.csv (filtered) that this host reads, in reading order.

  The frame keeps its sites.csv row number as the index (the global `index`
  of eval_batches).
  """
  files = _files or list_shards(path)
  df = read_sites_index(path) if _table is None else _table
  names = [os.path.basename(f) for f in _host_files(files, process_index, process_count)]
  order = {n: i for i, n in enumerate(names)}
  sel = df[df["shard"].isin(names).to_numpy() & select_sites(df, filter, path)]
  key = sel["shard"].map(order).to_numpy() * (1 << 32) + sel["position"].to_numpy()
  return sel.iloc[np.argsort(key, kind="stable")]


# --------------------------------------------------------------------------
# Training stream.


def train_dataset(path: str, *, host_batch: int, seed: int,
                  filter: FilterSpec = None,  # pylint: disable=redefined-builtin
                  shuffle_buffer: Optional[int] = None,
                  x_flip: Optional[bool] = None, rot90: Optional[bool] = None,
                  num_parallel_calls: Optional[int] = None,
                  prefetch: Optional[int] = None, start_batch: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  resolution: Optional[int] = None,
                  channels: Union[None, int, Sequence[int]] = None,
                  normalize: bool = False):
  """This host's infinite tf.data stream of image batches (see module doc).

  Returns (dataset, sites_per_epoch_on_this_host). Elements are uint8
  (host_batch, R, R, C) (float32 in [-1, 1] when `normalize`, four times
  the bytes; training normalizes on the device instead).
  Options left None take `config.data_config()`'s defaults.
  """
  given = dict(shuffle_buffer=shuffle_buffer, x_flip=x_flip, rot90=rot90,
               num_parallel_calls=num_parallel_calls, prefetch=prefetch)
  opt = config_lib.full_data_config(
      {k: v for k, v in given.items() if v is not None})
  shuffle_buffer, x_flip, rot90 = (opt["shuffle_buffer"], opt["x_flip"],
                                   opt["rot90"])
  num_parallel_calls, prefetch = opt["num_parallel_calls"], opt["prefetch"]
  tf = _tf()
  info = read_dataset_info(path)
  check_dataset(info, path, resolution, channels)
  files = list_shards(path)
  if len(files) < process_count:
    raise ValueError(f"{path}: {len(files)} shard files for {process_count} hosts; "
                     "convert with --num_shards >= the number of hosts")
  host = _host_files(files, process_index, process_count)
  rows = host_sites(path, filter, process_index, process_count,
                    _files=files)
  n_host = len(rows)
  if n_host == 0:
    raise ValueError(f"{path}: no sites on host {process_index} of {process_count}"
                     f" match the filter {filter!r} (columns: "
                     f"{_describe_columns(info)})")
  keep = None if not filter else _site_id_filter(rows["site_id"].tolist())
  start = int(start_batch) * int(host_batch)
  epoch0, skip = divmod(start, n_host)
  spec = _feature_spec(info, [] if keep is None else ["site_id"])
  autotune = tf.data.AUTOTUNE
  npc = autotune if num_parallel_calls in (None, -1) else int(num_parallel_calls)
  nf = len(host)
  host_t = tf.constant(host)
  # Python ints: numpy 2.4's scalars refuse to combine with symbolic tensors.
  base = int(seed) * 1_000_003 + int(process_index) * 7_919

  def one_epoch(epoch):
    s = tf.stack([tf.constant(base, tf.int64), epoch])
    order = tf.random.experimental.stateless_shuffle(tf.range(nf), seed=s)
    ds = _record_dataset(tf.data.Dataset.from_tensor_slices(tf.gather(host_t, order)),
                         info, cycle_length=min(nf, 8))
    ds = ds.map(lambda r: tf.io.parse_single_example(r, spec), num_parallel_calls=npc,
                deterministic=True)
    if keep is not None:
      ds = ds.filter(keep)
    ds = ds.map(lambda f: f[schema.TFRECORD_IMAGE])
    if shuffle_buffer and shuffle_buffer > 1:
      ds = ds.shuffle(int(shuffle_buffer), seed=base * 31 + epoch * 1_000_033 + 17,
                      reshuffle_each_iteration=False)
    ep = tf.data.Dataset.from_tensors(epoch).repeat()
    return tf.data.Dataset.zip((ep, tf.data.Dataset.range(n_host), ds))

  ds = tf.data.Dataset.range(epoch0, 2**62).flat_map(one_epoch)
  if skip:
    ds = ds.skip(skip)

  def decode(epoch, idx, raw):
    img = _decode_image(raw, info)
    if x_flip or rot90:
      s = tf.stack([base + epoch * 7 + 3, idx])
      if x_flip:
        flip = tf.random.stateless_uniform([], seed=s, dtype=tf.float32) < 0.5
        img = tf.cond(flip, lambda: tf.reverse(img, axis=[1]), lambda: img)
      if rot90:
        k = tf.random.stateless_uniform([], seed=s + 1, minval=0, maxval=4,
                                        dtype=tf.int32)
        img = tf.image.rot90(img, k)
    r, c = int(info["resolution"]), int(info["num_channels"])
    img = tf.ensure_shape(img, [r, r, c])
    if normalize:
      img = tf.cast(img, tf.float32) * float(image_lib.PIXEL_SCALE) - 1.0
    return img

  ds = ds.map(decode, num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(int(host_batch), drop_remainder=True)
  ds = ds.prefetch(autotune if prefetch in (None, -1) else int(prefetch))
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = 0
  return ds.with_options(opts), n_host


def prefetch_to_device(iterator: Iterator[Any], size: int,
                       put: Callable[[Any], Any]) -> Iterator[Any]:
  """Yields `put(x)` for each `x` of `iterator`, keeping `size` of them
  in flight: each `put` (an asynchronous host-to-device copy, e.g.
  `sharding.host_to_global`) is issued `size - 1` batches before the
  consumer takes its result, so the copy of the next batch overlaps the
  device's work on the current one (as flax's `prefetch_to_device`). `size`
  <= 1: each batch is put when it is taken."""
  queue = collections.deque()

  def enqueue(n):
    for x in itertools.islice(iterator, n):
      queue.append(put(x))

  enqueue(max(int(size), 1))
  while queue:
    yield queue.popleft()
    enqueue(1)


# Batches `train_batches` keeps in flight on the devices.
DEVICE_PREFETCH = 2


def train_batches(data_config: Any, *, global_batch: int, mesh, seed: int,
                  resolution: int, channels: Union[int, Sequence[int]],
                  start_batch: int = 0,
                  device_prefetch: int = DEVICE_PREFETCH
                  ) -> Iterator[Dict[str, Any]]:
  """Infinite iterator of {'image': uint8 (global_batch, R, R, C)} jax.Arrays.

  `data_config` is `config.data` (path, filter, shuffle_buffer, x_flip, rot90,
  num_parallel_calls, prefetch). `start_batch` is the number of batches
  already consumed (resume); the stream continues exactly where it stopped.
  Shapes, channels and the filter are checked before anything is compiled.
  Each host's batch goes to its devices as uint8, sharded on the mesh's
  `data` axis (`sharding.host_to_global`, multi-host), `device_prefetch`
  batches ahead (`prefetch_to_device`); the consumer maps it to [-1, 1]
  (`images.to_float`, inside the jitted training step).
  """
  import jax  # pylint: disable=import-outside-toplevel
  cfg = config_lib.full_data_config(data_config)
  sharding.check_global_batch(global_batch, mesh)
  host_batch = sharding.host_batch_size(global_batch)
  ds, _ = train_dataset(
      cfg["path"], host_batch=host_batch, seed=seed,
      filter=cfg["filter"] or None, shuffle_buffer=cfg["shuffle_buffer"],
      x_flip=bool(cfg["x_flip"]), rot90=bool(cfg["rot90"]),
      num_parallel_calls=cfg["num_parallel_calls"],
      prefetch=cfg["prefetch"], start_batch=start_batch,
      process_index=jax.process_index(), process_count=jax.process_count(),
      resolution=resolution, channels=channels, normalize=False)
  put = lambda batch: {"image": sharding.host_to_global(batch, mesh)}
  return prefetch_to_device(ds.as_numpy_iterator(), device_prefetch, put)


# --------------------------------------------------------------------------
# Evaluation / export stream.


# Keys of an eval batch that are not metadata columns (`index`: the site's
# row in sites.csv, the global order key; -1 for padding).
NON_METADATA_KEYS = ("image", "valid", "index")


def _pad_value(kind: str):
  return {"int64": -1, "float": math.nan, "bytes": ""}[kind]


def eval_host_batches(path: str, *, host_batch: int,
                      filter: FilterSpec = None,  # pylint: disable=redefined-builtin
                      process_index: int = 0, process_count: int = 1,
                      ) -> Tuple[Iterator[Dict[str, np.ndarray]], int]:
  """This host's eval batches as numpy dicts, and the batch count (all hosts).

  Each dict: 'image' uint8 (host_batch, R, R, C), 'valid' bool, 'index' int64
  (row of sites.csv, -1 for padding) and every metadata column (str / int64 /
  float). All hosts get the same number of batches.
  """
  tf = _tf()
  info = read_dataset_info(path)
  files = list_shards(path)
  table = read_sites_index(path)
  kw = dict(_table=table, _files=files)
  counts = [len(host_sites(path, filter, h, process_count, **kw))
            for h in range(process_count)]
  if sum(counts) == 0:
    raise ValueError(f"{path}: no sites match the filter {filter!r} (columns: "
                     f"{_describe_columns(info)})")
  num_batches = max(math.ceil(c / host_batch) for c in counts)
  rows = host_sites(path, filter, process_index, process_count, **kw)
  want_ids = rows["site_id"].to_numpy()
  want_index = rows.index.to_numpy().astype(np.int64)
  keep = None if not filter else _site_id_filter(want_ids.tolist())
  columns = list(info["columns"])
  spec = _feature_spec(info, columns)
  host = _host_files(files, process_index, process_count)
  r, c = int(info["resolution"]), int(info["num_channels"])

  def parse(rec):
    f = tf.io.parse_single_example(rec, spec)
    f[schema.TFRECORD_IMAGE] = _decode_image(f[schema.TFRECORD_IMAGE], info)
    return f

  def gen():
    done = 0
    if host:
      ds = _record_dataset(host, info).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                           deterministic=True)
      if keep is not None:
        ds = ds.filter(keep)
      ds = ds.batch(host_batch).prefetch(2)
      for b in ds.as_numpy_iterator():
        n = len(b[schema.TFRECORD_IMAGE])
        out = {"image": np.zeros((host_batch, r, r, c), np.uint8)}
        out["image"][:n] = b[schema.TFRECORD_IMAGE]
        out["valid"] = np.arange(host_batch) < n
        ids = [x.decode("utf-8") for x in b["site_id"]]
        if done + n > len(want_ids) or list(want_ids[done:done + n]) != ids:
          raise ValueError(f"{path}: shards and {schema.SITES_INDEX_FILE} disagree "
                           f"near site {ids[0]!r}; reconvert the dataset")
        idx = np.full(host_batch, -1, np.int64)
        idx[:n] = want_index[done:done + n]
        out["index"] = idx
        for col in columns:
          kind = info["columns"][col]
          v = b[col]
          if kind == "bytes":
            arr = np.full(host_batch, "", dtype=object)
            arr[:n] = [x.decode("utf-8") for x in v]
          else:
            arr = np.full(host_batch, _pad_value(kind),
                          np.int64 if kind == "int64" else np.float32)
            arr[:n] = v
          out[col] = arr
        done += n
        yield out
    if done != len(want_ids):
      raise ValueError(f"{path}: read {done} sites on host {process_index}, "
                       f"{schema.SITES_INDEX_FILE} lists {len(want_ids)}")
    emitted = math.ceil(done / host_batch)
    for _ in range(num_batches - emitted):
      out = {"image": np.zeros((host_batch, r, r, c), np.uint8),
             "valid": np.zeros(host_batch, bool),
             "index": np.full(host_batch, -1, np.int64)}
      for col in columns:
        kind = info["columns"][col]
        out[col] = (np.full(host_batch, "", dtype=object) if kind == "bytes" else
                    np.full(host_batch, _pad_value(kind),
                            np.int64 if kind == "int64" else np.float32))
      yield out

  return gen(), num_batches


def eval_batches(path: str, *, global_batch: int, mesh,
                 filter: FilterSpec = None,  # pylint: disable=redefined-builtin
                 ) -> Iterator[Dict[str, Any]]:
  """Every site once: {'image': global uint8 jax.Array, 'valid', 'index', metadata}.

  'image' is sharded on the mesh's data axis; 'valid', 'index' and the
  metadata columns are numpy arrays for this host's rows, in the order this
  host fed them (use `host_rows` to bring a model output back to the same
  rows). Merging across hosts: each host keeps rows with `valid`, process 0
  concatenates all hosts' rows and sorts by `index`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  sharding.check_global_batch(global_batch, mesh)
  host_batch = sharding.host_batch_size(global_batch)
  it, _ = eval_host_batches(path, host_batch=host_batch, filter=filter,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())

  def gen():
    for b in it:
      b = dict(b)
      b["image"] = sharding.host_to_global(b["image"], mesh)
      yield b

  return gen()


def num_eval_batches(path: str, *, global_batch: int,
                     filter: FilterSpec = None,  # pylint: disable=redefined-builtin
                     process_count: Optional[int] = None) -> int:
  """How many batches eval_batches yields (the same on every host)."""
  import jax  # pylint: disable=import-outside-toplevel
  pc = jax.process_count() if process_count is None else process_count
  hb = global_batch // pc
  kw = dict(_table=read_sites_index(path), _files=list_shards(path))
  return max(math.ceil(len(host_sites(path, filter, h, pc, **kw)) / hb)
             for h in range(pc))


def host_rows(x, mesh) -> np.ndarray:
  """This host's rows of a data-sharded global array, in the order it fed them."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, P(sharding.DATA_AXIS)))
