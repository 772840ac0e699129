"""Reading the public RxRx19a / RxRx1 tree (metadata.csv and per-channel
8-bit PNGs), or the synthetic tree in the same layout.

Shared by the converter (`convert.py`), the TFDS builder (`tfds_builder.py`)
and the tests. Nothing here imports TensorFlow unless a path is remote
(`gs://...`), so conversion worker processes start quickly.
"""
from __future__ import annotations

import io
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from gandl_jax import io as gio
from gandl_jax import schema
from gandl_jax.data.imagefile import (MetadataError, SiteError, SiteResult,
                                      decode_error, parse_int, read_image_file,
                                      resize_area)

SUBSETS = ("all", "controls")


def default_channels(dataset: str) -> Tuple[int, ...]:
  if dataset == "rxrx1":
    return tuple(schema.RXRX1_DEFAULT_CHANNELS)
  return tuple(c.index for c in schema.CHANNELS[dataset])


def check_channels(dataset: str, channels: Optional[Sequence[int]]) -> Tuple[int, ...]:
  if dataset not in schema.COLUMNS:
    raise ValueError(f"dataset must be one of {sorted(schema.COLUMNS)}, got {dataset!r}")
  if channels is None or len(channels) == 0:
    return default_channels(dataset)
  valid = [c.index for c in schema.CHANNELS[dataset]]
  out = tuple(int(c) for c in channels)
  bad = [c for c in out if c not in valid]
  if bad or len(set(out)) != len(out):
    raise ValueError(f"channels {list(out)} invalid for {dataset}: each must be "
                     f"one of {valid}, without repeats")
  return out


def read_metadata(dataset: str, input_dir: str):
  """metadata.csv as a DataFrame of strings (empty cells stay "").

  Raises MetadataError naming the file and the missing columns when the file
  does not have every published column.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  path = gio.join(input_dir, "metadata.csv")
  try:
    raw = gio.read_bytes(path)
  except FileNotFoundError as e:
    raise MetadataError(f"{path}: not found; expected the {dataset} metadata.csv "
                        "at the root of the download") from e
  try:
    df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
  except Exception as e:  # pandas raises several parser error types
    raise MetadataError(f"{path}: not a readable CSV file ({e})") from e
  expected = schema.COLUMNS[dataset]
  missing = [c for c in expected if c not in df.columns]
  if missing:
    raise MetadataError(
        f"{path}: missing column(s) {missing}; a {dataset} metadata.csv must "
        f"have the columns {list(expected)} (found {list(df.columns)})")
  return df[list(expected)]


def select_subset(df, dataset: str, subset: str):
  """`all`, or `controls` (RxRx19a: untreated wells; RxRx1: control wells)."""
  if subset not in SUBSETS:
    raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
  if subset == "all":
    return df
  if dataset == "rxrx19a":
    return df[df["treatment"].str.strip() == ""]
  return df[df["well_type"] != "treatment"]


_FLOAT_RE = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")
# Columns that name a directory or a file below images/ (schema.image_relpath).
PATH_COLUMNS = ("experiment", "well")


def parse_float(text: str, col: str) -> float:
  """A finite decimal number, or NaN for an empty cell (missing)."""
  if text == "":
    return math.nan
  v = float(text) if _FLOAT_RE.match(text) else None
  if v is None or not math.isfinite(v):
    raise SiteError(f"column {col}: expected a finite number or empty, got "
                    f"{text!r}")
  return v


def check_path_component(text: str, col: str) -> str:
  """`text` must be one plain file-name component (it becomes part of an
  image path): no '/', '\\', NUL, '.' or '..', not empty."""
  if (not text.strip() or text in (".", "..")
      or any(c in text for c in ("/", "\\", "\0"))):
    raise SiteError(f"column {col}: {text!r} is not a plain name (image "
                    f"paths are built from it; '/', '\\', '.' and '..' "
                    f"would leave images/)")
  return text


def parse_row(row: Dict[str, str], dataset: str) -> Dict[str, object]:
  """Typed metadata of one row; SiteError naming the bad column otherwise.

  Integers must be plain decimal int64 values (`1_0` or ` 1` are refused,
  not read as 10 or 1); floats finite or empty (NaN); the columns image
  paths are built from (`PATH_COLUMNS`) plain names.
  """
  out: Dict[str, object] = {}
  for col in schema.COLUMNS[dataset]:
    v = row[col]
    kind = schema.column_type(col)
    if kind == "int64":
      out[col] = parse_int(v, col)
    elif kind == "float":
      out[col] = parse_float(v, col)
    else:
      out[col] = v
  for col in ("experiment", "well", "site_id"):
    if not str(out[col]).strip():
      raise SiteError(f"column {col}: empty")
  for col in PATH_COLUMNS:
    check_path_component(str(out[col]), col)
  return out


def site_paths(input_dir: str, meta: Dict[str, object],
               channels: Sequence[int]) -> List[str]:
  """The channel PNGs of one site; SiteError if a path would leave images/."""
  paths = []
  for ch in channels:
    rel = schema.image_relpath(str(meta["experiment"]), int(meta["plate"]),
                               str(meta["well"]), int(meta["site"]), ch)
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
      raise SiteError(f"image path {rel!r} leaves images/",
                      gio.join(input_dir, "images"))
    paths.append(gio.join(input_dir, "images", rel))
  return paths
def decode_png(data: bytes, path: str) -> np.ndarray:
  """8-bit grayscale PNG -> uint8 (H, W); SiteError when corrupt or not 8-bit."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode != "L":
        raise SiteError(f"expected an 8-bit grayscale PNG, got mode {im.mode}", path)
      return np.asarray(im, dtype=np.uint8)
  except SiteError:
    raise
  except Exception as e:  # PIL raises many types for corrupt data
    raise decode_error(e, "PNG", path) from None


def load_site(input_dir: str, meta: Dict[str, object], channels: Sequence[int],
              resolution: int, source_size: Optional[Tuple[int, int]]) -> np.ndarray:
  """Reads, checks and resizes one site: uint8 (R, R, C).

  Raises SiteError with the reason and the offending file: no image at all
  for the site, a missing channel, a corrupt PNG, or a size that differs from
  `source_size` (or is not square, or smaller than `resolution`).
  """
  paths = site_paths(input_dir, meta, channels)
  blobs: List[Optional[bytes]] = []
  for p in paths:
    try:
      blobs.append(read_image_file(p))
    except FileNotFoundError:
      blobs.append(None)
  if all(b is None for b in blobs):
    raise SiteError("no image files for this site (metadata row without images)",
                    paths[0])
  planes = []
  for ch, p, b in zip(channels, paths, blobs):
    if b is None:
      raise SiteError(f"missing channel file w{ch}", p)
    a = decode_png(b, p)
    if source_size is not None and a.shape != tuple(source_size):
      raise SiteError(f"w{ch} is {a.shape[1]}x{a.shape[0]} pixels, expected "
                      f"{source_size[1]}x{source_size[0]} like the rest of the "
                      "dataset", p)
    if a.shape[0] != a.shape[1] or a.shape[0] < resolution:
      raise SiteError(f"w{ch} is {a.shape[1]}x{a.shape[0]} pixels; need a square "
                      f"image of at least {resolution}x{resolution}", p)
    planes.append(resize_area(a, resolution))
  return np.stack(planes, axis=-1)


def probe_source_size(input_dir: str, metas: Sequence[Dict[str, object]],
                      channels: Sequence[int], probes: int = 16) -> Tuple[int, int]:
  """The most common image size among up to `probes` evenly spread sites."""
  if not metas:
    raise MetadataError(f"{input_dir}: no metadata rows to convert")
  idx = np.unique(np.linspace(0, len(metas) - 1, min(probes, len(metas))).astype(int))
  counts: Dict[Tuple[int, int], int] = {}
  for i in idx:
    for p in site_paths(input_dir, metas[i], channels[:1]):
      try:
        a = decode_png(read_image_file(p), p)
      except (FileNotFoundError, SiteError):
        continue
      counts[a.shape] = counts.get(a.shape, 0) + 1
  if not counts:
    # Fall back to a scan until one readable image is found.
    for m in metas:
      for p in site_paths(input_dir, m, channels):
        try:
          return decode_png(read_image_file(p), p).shape
        except (FileNotFoundError, SiteError):
          continue
    raise MetadataError(f"{input_dir}/images: no readable PNG for any metadata row")
  return max(sorted(counts), key=lambda s: counts[s])

def load_task(args) -> SiteResult:
  """Picklable worker entry: (input_dir, meta, channels, resolution,
  source_size) -> the site's image, or its error."""
  input_dir, meta, channels, resolution, source_size = args
  try:
    return SiteResult(meta, load_site(input_dir, meta, channels, resolution,
                                      source_size))
  except SiteError as e:
    return SiteResult(meta, None, e.reason, e.path)
