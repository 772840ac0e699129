"""Reading the public RxRx19a / RxRx1 tree (metadata.csv and per-channel PNGs)
and LoadData CSVs of any Cell Painting set (8/16-bit PNG and TIFF planes).

Shared by the converter (`convert.py`), the TFDS builder (`tfds_rxrx19a.py`)
and the tests. Nothing here imports TensorFlow unless a path is remote
(`gs://...`), so conversion worker processes start quickly.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import math
import os
import re
import stat
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from gandl_jax import io as gio
from gandl_jax import schema

SUBSETS = ("all", "controls")


class MetadataError(ValueError):
  """metadata.csv cannot be used at all (missing file or columns)."""


class SiteError(Exception):
  """One site cannot be converted; `path` names the offending file."""

  def __init__(self, reason: str, path: str = ""):
    super().__init__(reason)
    self.reason = reason
    self.path = path


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


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_FLOAT_RE = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")
# Columns that name a directory or a file below images/ (schema.image_relpath).
PATH_COLUMNS = ("experiment", "well")


def parse_int(text: str, col: str) -> int:
  """A plain decimal int64 (no underscores, spaces or fractions); SiteError
  naming the column otherwise."""
  if not _INT_RE.match(text):
    raise SiteError(f"column {col}: expected an integer, got {text!r}")
  v = int(text)
  if not INT64_MIN <= v <= INT64_MAX:
    raise SiteError(f"column {col}: {text!r} is outside the int64 range")
  return v


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


def read_image_file(path: str) -> bytes:
  """The bytes of one image file.

  FileNotFoundError when nothing is there; SiteError when something other
  than a regular file is (a directory, a FIFO, a device, a symlink loop) or
  it cannot be read. Local files are opened non-blocking and checked with
  fstat before reading, so a FIFO never blocks.
  """
  if gio.is_remote(path):
    return gio.read_bytes(path)
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except FileNotFoundError:
    raise
  except OSError as e:
    reason = ("symlink loop" if e.errno == errno.ELOOP
              else e.strerror or type(e).__name__)
    raise SiteError(f"cannot open the image file ({reason})", path) from None
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      kind = ("a directory" if stat.S_ISDIR(mode) else
              "a FIFO" if stat.S_ISFIFO(mode) else
              "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
              "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
      raise SiteError(f"expected a PNG file, found {kind}", path)
    with os.fdopen(fd, "rb", closefd=False) as f:
      try:
        return f.read()
      except OSError as e:
        raise SiteError(f"cannot read the image file ({e.strerror or e})",
                        path) from None
  finally:
    os.close(fd)


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
    msg = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", " (in memory)", str(e))
    raise SiteError(f"corrupt or unreadable PNG ({type(e).__name__}: {msg})",
                    path) from None


def area_weights(src: int, dst: int) -> np.ndarray:
  """(dst, src) matrix: row i averages the source pixels output pixel i covers,
  each weighted by the length of its overlap with [i*src/dst, (i+1)*src/dst)."""
  edges = np.arange(dst + 1, dtype=np.float64) * (src / dst)
  lo, hi = edges[:-1, None], edges[1:, None]
  j = np.arange(src, dtype=np.float64)[None, :]
  w = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
  return w / w.sum(axis=1, keepdims=True)


def resize_area(img: np.ndarray, resolution: int) -> np.ndarray:
  """Area-averaging resize of a uint8 (H, W) image to (R, R) uint8.

  Each output pixel is the area-weighted mean of the input pixels it covers
  (exact k x k block means for integer factors), rounded half up.
  """
  h, w = img.shape
  if (h, w) == (resolution, resolution):
    return img
  if h % resolution == 0 and w % resolution == 0:
    kh, kw = h // resolution, w // resolution
    x = img.reshape(resolution, kh, resolution, kw).astype(np.float32).mean(axis=(1, 3))
  else:
    x = area_weights(h, resolution) @ img.astype(np.float64) @ area_weights(w, resolution).T
  return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def resize_area_float(img: np.ndarray, resolution: int) -> np.ndarray:
  """`resize_area` of a float (H, W) image in float64, without rounding."""
  h, w = img.shape
  x = img.astype(np.float64)
  if (h, w) == (resolution, resolution):
    return x
  if h % resolution == 0 and w % resolution == 0:
    kh, kw = h // resolution, w // resolution
    return x.reshape(resolution, kh, resolution, kw).mean(axis=(1, 3))
  return area_weights(h, resolution) @ x @ area_weights(w, resolution).T


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


@dataclasses.dataclass
class SiteResult:
  """What a conversion worker returns for one site."""
  meta: Dict[str, object]
  image: Optional[np.ndarray] = None
  error: str = ""
  path: str = ""


def load_task(args) -> SiteResult:
  """Picklable worker entry: (input_dir, meta, channels, resolution, size),
  plus the per-channel (low, high) intensity window for LoadData sites."""
  input_dir, meta, channels, resolution, source_size = args[:5]
  try:
    if LOADDATA_FILES in meta:
      image = load_loaddata_site(meta, channels, resolution, source_size,
                                 args[5])
    else:
      image = load_site(input_dir, meta, channels, resolution, source_size)
    return SiteResult(meta, image)
  except SiteError as e:
    return SiteResult(meta, None, e.reason, e.path)


# ----------------------------------------------------------------------------
# Any Cell Painting set: a CellProfiler LoadData CSV (one row per site, one
# FileName_<channel> / PathName_<channel> pair per channel), 8- or 16-bit
# PNG or TIFF planes, rescaled per channel to 8 bits by percentile clipping.

LOADDATA_FILES = "_files"     # meta key: {channel: (path, page)}, not a column
HIST_BINS = 2**16             # 8- and 16-bit values share one histogram


def _read_csv_text(path: str):
  import pandas as pd  # pylint: disable=import-outside-toplevel
  try:
    raw = gio.read_bytes(path)
  except FileNotFoundError as e:
    raise MetadataError(f"{path}: LoadData CSV not found") from e
  except IsADirectoryError as e:
    raise MetadataError(f"{path}: is a directory; expected a LoadData CSV "
                        "file") from e
  try:
    if raw[:2] == b"\x1f\x8b":      # load_data.csv.gz
      import gzip  # pylint: disable=import-outside-toplevel
      raw = gzip.decompress(raw)
    return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
  except Exception as e:  # pandas raises several parser error types
    raise MetadataError(f"{path}: not a readable CSV file ({e})") from e


def loaddata_channels(columns: Sequence[str]) -> List[str]:
  """Channel names: the suffixes of the FileName_<name> columns, in order."""
  pre = schema.LOADDATA_FILE_PREFIX
  return [c[len(pre):] for c in columns if c.startswith(pre) and len(c) > len(pre)]


def _key_column(columns: Sequence[str], ours: str) -> Optional[str]:
  return next((c for c in schema.LOADDATA_KEY_COLUMNS[ours] if c in columns),
              None)


def check_loaddata_columns(path: str, columns: Sequence[str],
                           channels: Sequence[str]) -> List[str]:
  """The channels to read (`channels`, default every FileName_ column);
  MetadataError naming the CSV and what is missing otherwise."""
  found = loaddata_channels(columns)
  missing = []
  if not found:
    missing.append("FileName_<channel> (e.g. FileName_OrigDNA, with its "
                   "directory in PathName_OrigDNA)")
  for ours in ("plate", "well"):
    if _key_column(columns, ours) is None:
      missing.append(" or ".join(schema.LOADDATA_KEY_COLUMNS[ours]))
  if missing:
    raise MetadataError(
        f"{path}: not a LoadData CSV, missing column(s): {'; '.join(missing)}"
        f" (found {list(columns)[:12]})")
  if not channels:
    return found
  absent = [c for c in channels if c not in found]
  if absent or len(set(channels)) != len(channels):
    raise MetadataError(
        f"{path}: channels {list(channels)} must be distinct names among its "
        f"FileName_ columns {found}" + (f"; missing {absent}" if absent else ""))
  return list(channels)


def parse_path_map(items: Sequence[str]) -> Tuple[Tuple[str, str], ...]:
  """`OLD=NEW` prefix replacements for PathName_ values."""
  out = []
  for item in items or ():
    old, sep, new = str(item).partition("=")
    if not sep or not old:
      raise ValueError(f"path map {item!r}: expected OLD=NEW, e.g. "
                       "s3://cellpainting-gallery/=/data/cpg/")
    out.append((old, new))
  return tuple(out)


def _resolve(csv_path: str, directory: str, name: str,
             path_map: Sequence[Tuple[str, str]]) -> str:
  """PathName + FileName, prefixes mapped, relative ones taken from the
  CSV's directory."""
  full = gio.join(directory, name) if directory else name
  for old, new in path_map:
    if full.startswith(old):
      full = new + full[len(old):]
      break
  if gio.is_remote(full) or os.path.isabs(full):
    return full
  base = os.path.dirname(csv_path)
  return gio.join(base, full) if base else full


def read_loaddata(csv_paths: Sequence[str], channels: Sequence[str] = (),
                  path_map: Sequence[Tuple[str, str]] = ()
                  ) -> Tuple[List[str], List[str], List[Dict[str, object]],
                             List[Dict[str, object]]]:
  """One or more LoadData CSVs -> (channels, columns, metas, errors).

  Each meta holds `site_id` (`{plate}_{well}_{site}`), `well_id`, `plate`,
  `well`, `site` and the CSV's other Metadata_* columns, plus the channel
  files under LOADDATA_FILES. A row with an empty FileName_/PathName_ cell
  or an unparsable site, and a repeated site, is an error row (site_id,
  path, reason); a CSV without FileName_ or plate/well columns a
  MetadataError.
  """
  if not csv_paths:
    raise MetadataError("no LoadData CSV given")
  frames, chosen, extras = [], None, []
  for path in csv_paths:
    df = _read_csv_text(path)
    sel = check_loaddata_columns(path, list(df.columns), channels)
    if chosen is None:
      chosen = sel
    elif channels == () and sel != chosen:
      raise MetadataError(f"{path}: channels {sel} differ from {chosen} of "
                          f"{csv_paths[0]}; pick common ones with --channels")
    keys = {ours: _key_column(df.columns, ours) for ours in ("plate", "well", "site")}
    pre = schema.LOADDATA_METADATA_PREFIX
    for c in df.columns:
      if c.startswith(pre) and c not in keys.values() and c not in extras:
        extras.append(c)
    frames.append((path, df, keys))
  columns = list(schema.LOADDATA_COLUMNS) + extras
  metas: List[Dict[str, object]] = []
  errors: List[Dict[str, object]] = []
  seen = set()
  fp, pp, frp = (schema.LOADDATA_FILE_PREFIX, schema.LOADDATA_PATH_PREFIX,
                 schema.LOADDATA_FRAME_PREFIX)
  for path, df, keys in frames:
    for n, row in enumerate(df.to_dict("records")):
      plate = str(row[keys["plate"]]).strip()
      well = str(row[keys["well"]]).strip()
      site_text = str(row[keys["site"]]).strip() if keys["site"] else "1"
      sid = f"{plate}_{well}_{site_text}"
      where = f"{path} (row {n + 2})"
      try:
        if not plate or not well:
          raise SiteError(f"column {keys['plate'] if not plate else keys['well']}:"
                          " empty")
        site = parse_int(site_text, keys["site"] or "site")
        files = {}
        for ch in chosen:
          name = str(row.get(fp + ch, "")).strip()
          if not name:
            raise SiteError(f"{fp}{ch} is empty")
          if (pp + ch) in row and not str(row[pp + ch]).strip():
            raise SiteError(f"{pp}{ch} is empty")
          frame = str(row.get(frp + ch, "")).strip()
          page = parse_int(frame, frp + ch) if frame else None
          if page is not None and page < 0:
            raise SiteError(f"{frp}{ch}: expected a page number >= 0, got {page}")
          files[ch] = (_resolve(path, str(row.get(pp + ch, "")).strip(), name,
                                path_map), page)
      except SiteError as e:
        errors.append(dict(site_id=sid, path=where, reason=e.reason))
        continue
      sid = f"{plate}_{well}_{site}"
      if sid in seen:
        errors.append(dict(site_id=sid, path=where,
                           reason="duplicate plate, well and site (first row kept)"))
        continue
      seen.add(sid)
      meta: Dict[str, object] = dict(site_id=sid, well_id=f"{plate}_{well}",
                                     plate=plate, well=well, site=site)
      for c in extras:
        meta[c] = str(row.get(c, ""))
      meta[LOADDATA_FILES] = files
      metas.append(meta)
  return list(chosen), columns, metas, errors


def decode_plane(data: bytes, path: str, page: Optional[int] = None,
                 channel: str = "<channel>") -> Tuple[np.ndarray, int]:
  """One 8- or 16-bit grayscale plane of a PNG or TIFF -> (array, bits).

  A multi-page file needs its page named (`Frame_<channel>`); SiteError for
  corrupt files, other modes (RGB, float, 32-bit) and missing pages.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      pages = int(getattr(im, "n_frames", 1))
      if page is None and pages > 1:
        raise SiteError(f"{channel}: the file has {pages} pages; name the "
                        f"page in a {schema.LOADDATA_FRAME_PREFIX}{channel} "
                        "column", path)
      if page is not None:
        if page >= pages:
          raise SiteError(f"page {page} requested, the file has {pages}", path)
        im.seek(page)
      im.load()
      mode = im.mode
      if mode == "L":
        return np.asarray(im, dtype=np.uint8), 8
      if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
          raise SiteError("32-bit image values outside 0..65535; expected an "
                          "8- or 16-bit grayscale image", path)
        return a.astype(np.uint16), 16
      raise SiteError(f"expected an 8- or 16-bit grayscale image, got mode "
                      f"{mode}", path)
  except SiteError:
    raise
  except Exception as e:  # PIL raises many types for corrupt data
    msg = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", " (in memory)", str(e))
    raise SiteError(f"corrupt or unreadable image ({type(e).__name__}: {msg})",
                    path) from None


def center_square(a: np.ndarray) -> np.ndarray:
  """The centred square of side min(H, W) (the whole image when square)."""
  h, w = a.shape
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return a[top:top + s, left:left + s]


def read_loaddata_planes(meta: Dict[str, object], channels: Sequence[str],
                         source_size: Optional[Tuple[int, int]] = None
                         ) -> List[Tuple[np.ndarray, int]]:
  """The (plane, bits) of every channel of one LoadData site, checked.

  SiteError naming the file: no file at all, a missing or unreadable one,
  channels of different sizes, a size other than `source_size`.
  """
  files = meta[LOADDATA_FILES]
  blobs = []
  for ch in channels:
    p = files[ch][0]
    try:
      blobs.append(read_image_file(p))
    except FileNotFoundError:
      blobs.append(None)
  if all(b is None for b in blobs):
    raise SiteError("no image files for this site (none of its channel files "
                    "exists)", files[channels[0]][0])
  planes = []
  for ch, b in zip(channels, blobs):
    p, page = files[ch]
    if b is None:
      raise SiteError(f"missing channel file {ch}", p)
    a, bits = decode_plane(b, p, page, ch)
    if planes and a.shape != planes[0][0].shape:
      raise SiteError(f"{ch} is {a.shape[1]}x{a.shape[0]} pixels but "
                      f"{channels[0]} of this site is {planes[0][0].shape[1]}x"
                      f"{planes[0][0].shape[0]} (channels of different sizes)", p)
    if source_size is not None and a.shape != tuple(source_size):
      raise SiteError(f"{ch} is {a.shape[1]}x{a.shape[0]} pixels, expected "
                      f"{source_size[1]}x{source_size[0]} like the rest of the "
                      "dataset", p)
    planes.append((a, bits))
  return planes


def rescale_8bit(a: np.ndarray, low: float, high: float) -> np.ndarray:
  """255 * clip((a - low) / (high - low), 0, 1) in float64 (no rounding);
  a window with high <= low becomes one intensity step wide."""
  width = high - low if high > low else 1.0
  return np.clip((a.astype(np.float64) - low) / width, 0.0, 1.0) * 255.0


def load_loaddata_site(meta: Dict[str, object], channels: Sequence[str],
                       resolution: int, source_size: Optional[Tuple[int, int]],
                       windows: Sequence[Tuple[float, float]]) -> np.ndarray:
  """Reads, checks, rescales (each channel's (low, high) window -> 0..255),
  centre-crops to a square, area-resizes and rounds one site: uint8 (R, R, C).
  """
  planes = read_loaddata_planes(meta, channels, source_size)
  out = []
  for ch, (a, _), (low, high) in zip(channels, planes, windows):
    a = center_square(a)
    if a.shape[0] < resolution:
      raise SiteError(f"{ch} is {a.shape[1]}x{a.shape[0]} pixels (after "
                      f"cropping to a square); need at least {resolution}x"
                      f"{resolution}", meta[LOADDATA_FILES][ch][0])
    x = resize_area_float(rescale_8bit(a, low, high), resolution)
    out.append(np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8))
  return np.stack(out, axis=-1)


@dataclasses.dataclass
class HistogramResult:
  """Per-channel value histograms (HIST_BINS) of one sampled site."""
  site_id: str
  hists: Optional[np.ndarray] = None     # (C, HIST_BINS) int64
  bits: Optional[List[int]] = None
  error: str = ""


def histogram_task(args) -> HistogramResult:
  """Picklable worker entry: (meta, channels) -> value counts per channel of
  the centred square that conversion keeps."""
  meta, channels = args
  try:
    planes = read_loaddata_planes(meta, channels)
  except SiteError as e:
    return HistogramResult(str(meta["site_id"]), error=e.reason)
  hists = np.stack([np.bincount(center_square(a).ravel(), minlength=HIST_BINS)
                    for a, _ in planes]).astype(np.int64)
  return HistogramResult(str(meta["site_id"]), hists, [b for _, b in planes])


def histogram_percentile(hist: np.ndarray, q: float) -> float:
  """np.percentile(values, q) (linear interpolation) of the values whose
  counts are `hist` (value v counted hist[v] times)."""
  cum = np.cumsum(hist)
  n = int(cum[-1])
  if n == 0:
    raise ValueError("empty histogram")
  pos = q / 100.0 * (n - 1)
  k = int(math.floor(pos))
  lo = int(np.searchsorted(cum, k, side="right"))
  hi = int(np.searchsorted(cum, min(k + 1, n - 1), side="right"))
  t = pos - k
  return float(lo + (hi - lo) * t) if t < 0.5 else float(hi - (hi - lo) * (1 - t))


def probe_loaddata_size(metas: Sequence[Dict[str, object]],
                        channels: Sequence[str], probes: int = 16
                        ) -> Tuple[int, int]:
  """The most common first-channel size among up to `probes` spread sites."""
  if not metas:
    raise MetadataError("the LoadData CSV has no usable rows")
  idx = np.unique(np.linspace(0, len(metas) - 1, min(probes, len(metas))).astype(int))
  counts: Dict[Tuple[int, int], int] = {}

  def size(i):
    p, page = metas[i][LOADDATA_FILES][channels[0]]
    try:
      return decode_plane(read_image_file(p), p, page, channels[0])[0].shape
    except (FileNotFoundError, SiteError):
      return None

  for i in idx:
    s = size(i)
    if s is not None:
      counts[s] = counts.get(s, 0) + 1
  if not counts:    # fall back to a scan: the first readable image decides
    s = next((s for s in map(size, range(len(metas))) if s is not None), None)
    if s is not None:
      return s
  if not counts:
    raise MetadataError(f"no readable {channels[0]} image for any row of the "
                        "LoadData CSV")
  return max(sorted(counts), key=lambda s: counts[s])
