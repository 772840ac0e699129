"""Reading any Cell Painting set described by CellProfiler LoadData CSVs: one
row per site, one FileName_<channel> / PathName_<channel> pair per channel,
8- or 16-bit PNG or TIFF planes (multi-page files with Frame_<channel>),
rescaled per channel to 8 bits by an intensity window (`intensity_windows`:
percentile clipping over a sample of sites).

Image paths are confined to an image root (`read_loaddata`): by default the
LoadData CSV's directory, or the local side of the `--path_map` entry that
mapped the path, or `--image_root`; `..` and symlinks that leave it are
refused per row unless `--allow_outside_root`. A file is never read past the
size its header declares (`plane_file_bound`).

Nothing here imports TensorFlow unless a path is remote (`gs://...`).

One module (~660 lines): the CSV's columns, the path rules and the plane
decoding are the contract of one input format; the converter uses a handful
of its names (`read_loaddata`, `intensity_windows`, `load_task`, ...).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import multiprocessing
import os
import posixpath
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging
from PIL import Image

from gandl_jax import io as gio
from gandl_jax import schema
from gandl_jax.data.imagefile import (MetadataError, SiteError, SiteResult,
                                      decode_error, open_image_file, parse_int,
                                      resize_area_float)

LOADDATA_FILES = "_files"     # meta key: {channel: (path, page, root)}, not a
                              # column; root None: not confined
HIST_BINS = 2**16             # 8- and 16-bit values share one histogram
ROOT_HINT = ("pass --image_root DIR (a directory holding every image) or "
             "--allow_outside_root")
# Remote schemes read through tf.io.gfile; any other (s3://, http://) needs
# a --path_map to a local copy.
READABLE_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)")


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
  except Exception as e:  # zlib and EOF errors
    raise MetadataError(f"{path}: not a readable CSV file ({e})") from e
  check_header(path, raw.split(b"\n", 1)[0].decode("utf-8-sig", "replace"))
  try:
    return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
  except Exception as e:  # pandas raises several parser error types
    raise MetadataError(f"{path}: not a readable CSV file ({e})") from e


def _used_column(name: str) -> bool:
  return (name.startswith((schema.LOADDATA_FILE_PREFIX,
                           schema.LOADDATA_PATH_PREFIX,
                           schema.LOADDATA_FRAME_PREFIX,
                           schema.LOADDATA_METADATA_PREFIX))
          or any(name in keys for keys in schema.LOADDATA_KEY_COLUMNS.values()))


def check_header(path: str, line: str) -> None:
  """MetadataError for a header separated by ';' (LoadData CSVs use ',') or
  one naming a column we read twice (pandas would rename the second
  `FileName_OrigDNA.1`, a phantom channel)."""
  fields = next(csv.reader([line.rstrip("\r")]), [])
  if len(line.split(";")) > max(len(fields), 1):
    raise MetadataError(
        f"{path}: the header is separated by ';' ({line[:60]!r}...); LoadData "
        "CSVs are comma-separated: save it with ',' as the delimiter")
  seen = set()
  for name in (f.strip() for f in fields):
    if name in seen and _used_column(name):
      raise MetadataError(f"{path}: column {name} appears more than once in "
                          "the header; keep one")
    seen.add(name)


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
             path_map: Sequence[Tuple[str, str]], image_root: Optional[str]
             ) -> Tuple[str, str]:
  """(path, root): PathName + FileName, prefixes mapped, relative ones taken
  from the CSV's directory; the root it must stay in is `image_root`, else
  the local side of the path map entry used, else the CSV's directory."""
  base = os.path.dirname(csv_path)

  def below_csv(p):     # relative paths are taken from the CSV's directory
    if gio.is_remote(p) or os.path.isabs(p) or not base:
      return p
    return gio.join(base, p)

  full = gio.join(directory, name) if directory else name
  root = base
  for old, new in path_map:
    if full.startswith(old):
      full = new + full[len(old):]
      root = new if new.endswith("/") else posixpath.dirname(new)
      break
  return below_csv(full), image_root or below_csv(root) or "."


def _normal(path: str) -> Tuple[str, str]:
  """(scheme or "", normalized path) for the lexical root check."""
  m = _SCHEME.match(path)
  if m:
    return m.group(1), posixpath.normpath("/" + path[len(m.group(1)) + 3:])
  return "", os.path.normpath(os.path.abspath(path))


def inside_root(path: str, root: str) -> bool:
  """True when `path`, with `..` resolved (no file system access), lies
  below `root`."""
  (ps, p), (rs, r) = _normal(path), _normal(root)
  if ps != rs:
    return False
  sep = "/" if ps else os.sep
  return p == r or p.startswith(r.rstrip(sep) + sep)


def check_real_path(path: str, root: Optional[str]) -> str:
  """The path to open: `path` with its symlinks resolved when confined to a
  local `root`; SiteError if that leaves the root."""
  if root is None or gio.is_remote(path):
    return path
  real = os.path.realpath(path)
  if not inside_root(real, os.path.realpath(root)):
    raise SiteError(f"the file resolves to {real}, outside the image root "
                    f"{root} (a symlink or '..'); {ROOT_HINT}", path)
  return real


def read_loaddata(csv_paths: Sequence[str], channels: Sequence[str] = (),
                  path_map: Sequence[Tuple[str, str]] = (),
                  image_root: Optional[str] = None,
                  allow_outside_root: bool = False
                  ) -> Tuple[List[str], List[str], List[Dict[str, object]],
                             List[Dict[str, object]]]:
  """One or more LoadData CSVs -> (channels, columns, metas, errors).

  Each meta holds `site_id` (`schema.loaddata_site_id`: `{plate}_{well}_
  {site}`, "_" and "%" inside a field percent-encoded), `well_id`, `plate`,
  `well`, `site` and the CSV's other Metadata_* columns, plus the channel
  files under LOADDATA_FILES. A row is an error row (site_id, path, reason)
  when a FileName_/PathName_ cell is empty, the site does not parse, a path
  has a scheme other than gs:// (s3://...: map it with `path_map`; one
  warning names the prefixes up front), a path leaves its image root, or it
  repeats a site. The image root: `image_root` when given, else the local
  side of the `path_map` entry that mapped the path, else the CSV's
  directory; `allow_outside_root` lifts the rule (symlinks are checked when
  the file is read: `check_real_path`). A CSV without FileName_ or
  plate/well columns, separated by ';', or with a repeated column is a
  MetadataError.
  """
  if not csv_paths:
    raise MetadataError("no LoadData CSV given")
  if image_root and not gio.is_remote(image_root):
    image_root = os.path.abspath(image_root)
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
  unmapped: Dict[str, int] = {}     # "s3://bucket/" -> rows
  fp, pp, frp = (schema.LOADDATA_FILE_PREFIX, schema.LOADDATA_PATH_PREFIX,
                 schema.LOADDATA_FRAME_PREFIX)
  for path, df, keys in frames:
    for n, row in enumerate(df.to_dict("records")):
      plate = str(row[keys["plate"]]).strip()
      well = str(row[keys["well"]]).strip()
      site_text = str(row[keys["site"]]).strip() if keys["site"] else "1"
      sid = schema.loaddata_site_id(plate, well, site_text)
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
          full, root = _resolve(path, str(row.get(pp + ch, "")).strip(),
                                name, path_map, image_root)
          m = _SCHEME.match(full)
          if m and m.group(1).lower() not in READABLE_SCHEMES:
            prefix = f"{m.group(1)}://{m.group(2)}/"
            unmapped[prefix] = unmapped.get(prefix, 0) + 1
            raise SiteError(f"{full}: {m.group(1)}:// paths cannot be read "
                            f"here; map them to a local copy with --path_map "
                            f"{prefix}=/local/dir/")
          if not allow_outside_root and not inside_root(full, root):
            raise SiteError(f"{pp}{ch} and {fp}{ch} give {full}, outside the "
                            f"image root {root}; {ROOT_HINT}")
          files[ch] = (full, page, None if allow_outside_root else root)
      except SiteError as e:
        errors.append(dict(site_id=sid, path=where, reason=e.reason))
        continue
      sid = schema.loaddata_site_id(plate, well, site)
      if sid in seen:
        errors.append(dict(site_id=sid, path=where,
                           reason="duplicate plate, well and site (first row kept)"))
        continue
      seen.add(sid)
      meta: Dict[str, object] = dict(
          site_id=sid, well_id=schema.loaddata_well_id(plate, well),
          plate=plate, well=well, site=site)
      for c in extras:
        meta[c] = str(row.get(c, ""))
      meta[LOADDATA_FILES] = files
      metas.append(meta)
  if unmapped:
    total = sum(len(df) for _, df, _ in frames)
    logging.warning(
        "%d of %d rows point at %s, which cannot be read here (listed in "
        "errors.csv); map them to a local copy with %s", sum(unmapped.values()),
        total, ", ".join(sorted(unmapped)), " ".join(
            f"--path_map {p}=/local/dir/" for p in sorted(unmapped)))
  return list(chosen), columns, metas, errors
PLANE_SLACK_BYTES = 4 * 2**20    # headers, tags, OME-XML, thumbnails


def plane_file_bound(width: int, height: int, bytes_per_sample: int,
                     pages: int = 1) -> int:
  """The most bytes a PNG or TIFF of `pages` such planes may take: its raw
  samples (plus PNG's filter byte per row), 1/8 more for incompressible
  data's framing, and PLANE_SLACK_BYTES for headers and metadata."""
  raw = pages * height * (width * bytes_per_sample + 1)
  return raw + raw // 8 + PLANE_SLACK_BYTES


def _tiff_tag(im, tag: int):
  v = getattr(im, "tag_v2", {}).get(tag)
  return v[0] if isinstance(v, tuple) and v else v


def decode_plane(data, path: str, page: Optional[int] = None,
                 channel: str = "<channel>", file_size: Optional[int] = None,
                 check_size=None) -> Tuple[np.ndarray, int]:
  """One 8- or 16-bit grayscale plane of a PNG or TIFF -> (array, bits).

  `data`: the file's bytes, or a binary file object of `file_size` bytes.
  The header is read first: a file larger than its planes can take
  (`plane_file_bound`) is refused before its pixels are read, and
  `check_size(height, width)` may refuse the plane's size (raising
  SiteError) before they are decoded. A multi-page file needs its page
  named (`Frame_<channel>`); SiteError for corrupt files, other modes (RGB,
  float, 32-bit values outside 0..65535, signed 16-bit samples) and missing
  pages.
  """
  if isinstance(data, (bytes, bytearray, memoryview)):
    file_size = len(data) if file_size is None else file_size
    data = io.BytesIO(data)
  try:
    with Image.open(data) as im:
      mode = im.mode
      bits_per_sample = _tiff_tag(im, 258)
      if (mode.endswith("S") or im.format == "TIFF" and bits_per_sample == 16
          and _tiff_tag(im, 339) == 2):
        raise SiteError("signed 16-bit samples are not supported; convert "
                        "the image to unsigned 16-bit", path)
      if mode != "L" and not mode.startswith("I;16") and mode != "I":
        raise SiteError(f"expected an 8- or 16-bit grayscale image, got mode "
                        f"{mode}", path)
      pages = int(getattr(im, "n_frames", 1))
      if page is None and pages > 1:
        raise SiteError(f"{channel}: the file has {pages} pages; name the "
                        f"page in a {schema.LOADDATA_FRAME_PREFIX}{channel} "
                        "column", path)
      if page is not None:
        if page >= pages:
          raise SiteError(f"page {page} requested, the file has {pages}", path)
        im.seek(page)
      width, height = im.size
      if file_size is not None:
        per = (1 if mode == "L" else 2 if mode.startswith("I;16") else
               max(int(bits_per_sample or 32) // 8, 1))
        bound = plane_file_bound(width, height, per, pages)
        if file_size > bound:
          raise SiteError(
              f"the file is {file_size} bytes, more than its header's "
              f"{pages} page(s) of {width}x{height} {8 * per}-bit pixels can "
              f"take (at most {bound}); refused without reading it", path)
      if check_size is not None:
        check_size(height, width)
      im.load()
      if mode == "L":
        return np.asarray(im, dtype=np.uint8), 8
      a = np.asarray(im)
      if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        raise SiteError("32-bit image values outside 0..65535; expected an "
                        "8- or 16-bit grayscale image", path)
      return a.astype(np.uint16), 16
  except SiteError:
    raise
  except Exception as e:  # PIL raises many types for corrupt data
    raise decode_error(e, "image", path) from None


def read_plane(path: str, page: Optional[int], root: Optional[str],
               channel: str, check_size=None) -> Tuple[np.ndarray, int]:
  """One channel file, confined to `root` (`check_real_path`), decoded by
  `decode_plane` without reading more than its header declares.
  FileNotFoundError when it does not exist."""
  real = check_real_path(path, root)
  try:
    with open_image_file(real, "an image file") as (f, size):
      return decode_plane(f, path, page, channel, size, check_size)
  except SiteError as e:      # named by the CSV's path, not the resolved one
    raise SiteError(e.reason, path) from None


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
  one outside its image root, one larger than its header declares, channels
  of different sizes, a size other than `source_size` (both checked before
  the pixels are decoded).
  """
  files = meta[LOADDATA_FILES]
  planes: List[Tuple[np.ndarray, int]] = []
  missing = []
  for ch in channels:
    p, page, root = files[ch]

    def check_size(h, w, ch=ch, p=p):
      if planes and (h, w) != planes[0][0].shape:
        first = planes[0][0].shape
        raise SiteError(f"{ch} is {w}x{h} pixels but {channels[0]} of this "
                        f"site is {first[1]}x{first[0]} (channels of "
                        "different sizes)", p)
      if source_size is not None and (h, w) != tuple(source_size):
        raise SiteError(f"{ch} is {w}x{h} pixels, expected {source_size[1]}x"
                        f"{source_size[0]} like the rest of the dataset", p)

    try:
      planes.append(read_plane(p, page, root, ch, check_size))
    except FileNotFoundError:
      missing.append((ch, p))
    except SiteError:
      if not missing:
        raise
      break           # an earlier channel's absence is named first
  if len(missing) == len(channels):
    raise SiteError("no image files for this site (none of its channel files "
                    "exists)", files[channels[0]][0])
  if missing:
    raise SiteError(f"missing channel file {missing[0][0]}", missing[0][1])
  return planes


def rescale_8bit(a: np.ndarray, low: float, high: float) -> np.ndarray:
  """255 * clip((a - low) / (high - low), 0, 1) in float64 (no rounding);
  a window with high <= low becomes one intensity step wide."""
  width = high - low if high > low else 1.0
  return np.clip((a.astype(np.float64) - low) / width, 0.0, 1.0) * 255.0


def site_windows(intensity: Dict[str, object]) -> List[Tuple[float, float, int]]:
  """(low, high, bit depth) of each channel from `intensity_windows`' record:
  what `load_loaddata_site` takes."""
  return [(c["low"], c["high"], c["bit_depth"]) for c in intensity["channels"]]


def load_loaddata_site(meta: Dict[str, object], channels: Sequence[str],
                       resolution: int, source_size: Optional[Tuple[int, int]],
                       windows: Sequence[Sequence[float]]) -> np.ndarray:
  """Reads, checks, rescales (each channel's (low, high) window -> 0..255),
  centre-crops to a square, area-resizes and rounds one site: uint8 (R, R, C).

  A window given as (low, high, bits) also refuses a plane of another bit
  depth than its channel's (an 8-bit plane in a 16-bit channel).
  """
  planes = read_loaddata_planes(meta, channels, source_size)
  out = []
  for ch, (a, bits), window in zip(channels, planes, windows):
    low, high = window[0], window[1]
    if len(window) > 2 and bits != window[2]:
      raise SiteError(f"{ch} is a {bits}-bit plane in a {window[2]}-bit "
                      f"channel (its intensity window is for {window[2]}-bit "
                      f"values); convert it to {window[2]} bits",
                      meta[LOADDATA_FILES][ch][0])
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
  files: Tuple[str, ...] = ()             # each channel's file


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
  return HistogramResult(str(meta["site_id"]), hists, [b for _, b in planes],
                         files=tuple(meta[LOADDATA_FILES][c][0]
                                     for c in channels))


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


DEFAULT_CLIP = (0.1, 99.9)
DEFAULT_INTENSITY_SAMPLE = 64


def intensity_windows(metas: Sequence[Dict[str, object]], channels: Sequence[str],
                      clip_percentiles: Optional[Sequence[float]],
                      sample: int, seed: int, workers: int = 1
                      ) -> Dict[str, object]:
  """Each channel's (low, high) -> (0, 255) window of a LoadData set.

  The `clip_percentiles` of the channel's pixel values (the centred square
  that is converted, at source resolution) pooled over `sample` sites drawn
  with `seed` (`np.random.default_rng(seed).choice`, without replacement,
  sorted); unreadable sampled sites are skipped (they fail conversion
  later anyway). None: the full range of the channel's bit depth.

  A channel whose sampled planes mix 8- and 16-bit files is refused
  (MetadataError naming the channel and one file of each depth); a plane
  of another depth found later fails its site. A constant channel (every
  sampled value equal, e.g. saturated at 65535), or one whose two
  percentiles coincide, has no spread to window: it falls back to the full
  range of its bit depth, with a warning, so a constant value v becomes
  round(255 * v / (2**bits - 1)): 0 stays black, 65535 (or 255) white.
  Returns the dataset_info.json `intensity` record.
  """
  if clip_percentiles is not None:
    lo_q, hi_q = (float(q) for q in clip_percentiles)
    if not 0.0 <= lo_q < hi_q <= 100.0:
      raise ValueError(f"clip percentiles must be 0 <= low < high <= 100, got "
                       f"{list(clip_percentiles)}")
  if sample < 1:
    raise ValueError(f"intensity sample must be >= 1 site, got {sample}")
  k = min(sample, len(metas))
  idx = np.sort(np.random.default_rng(seed).choice(len(metas), k, replace=False))
  tasks = [(metas[i], tuple(channels)) for i in idx]
  hist, good, bad = None, [], []
  pool = (multiprocessing.get_context("spawn").Pool(min(workers, k))
          if workers > 1 and k > 1 else None)
  try:
    # Summed as they come: one (C, 65536) histogram held, not one per site.
    for r in (pool.imap(histogram_task, tasks) if pool
              else map(histogram_task, tasks)):
      if r.hists is None:
        bad.append(r)
        continue
      hist = r.hists if hist is None else hist + r.hists
      good.append(r)
      r.hists = None
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  if not good:
    raise MetadataError(
        f"none of the {k} sites sampled for the intensity percentiles could "
        f"be read (first: {bad[0].site_id}: {bad[0].error})")
  out = []
  for c, name in enumerate(channels):
    depth = {}
    for r in good:
      depth.setdefault(r.bits[c], r.files[c])
    if len(depth) > 1:
      raise MetadataError(
          f"channel {name} mixes bit depths: " + ", ".join(
              f"{f} is {b}-bit" for b, f in sorted(depth.items())) +
          "; convert its files to one bit depth")
    bits = next(iter(depth))
    if clip_percentiles is None:
      low, high = 0.0, float(2**bits - 1)
    else:
      low = histogram_percentile(hist[c], lo_q)
      high = histogram_percentile(hist[c], hi_q)
      if high <= low:
        logging.warning(
            "channel %s: the %g and %g percentiles are both %g (a constant "
            "channel); windowing it on the full %d-bit range 0..%d instead",
            name, lo_q, hi_q, low, bits, 2**bits - 1)
        low, high = 0.0, float(2**bits - 1)
    out.append(dict(name=name, bit_depth=bits, low=low, high=high))
  logging.info("Intensity windows from %d sites: %s", len(good), ", ".join(
      f"{c['name']} {c['low']:g}..{c['high']:g}" for c in out))
  return dict(
      method=("percentile clip" if clip_percentiles is not None
              else "full bit-depth range"),
      percentiles=None if clip_percentiles is None else [lo_q, hi_q],
      formula="round(255 * clip((x - low) / (high - low), 0, 1)), after "
              "area-averaging the rescaled values to the resolution",
      sample_seed=int(seed), sample_sites=len(good),
      sampled_site_ids=[r.site_id for r in good],
      skipped_site_ids=[r.site_id for r in bad],
      channels=out)


def probe_loaddata_size(metas: Sequence[Dict[str, object]],
                        channels: Sequence[str], probes: int = 16
                        ) -> Tuple[int, int]:
  """The most common first-channel size among up to `probes` spread sites."""
  if not metas:
    raise MetadataError("the LoadData CSV has no usable rows")
  idx = np.unique(np.linspace(0, len(metas) - 1, min(probes, len(metas))).astype(int))
  counts: Dict[Tuple[int, int], int] = {}

  def size(i):
    p, page, root = metas[i][LOADDATA_FILES][channels[0]]
    try:
      return read_plane(p, page, root, channels[0])[0].shape
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


def load_task(args) -> SiteResult:
  """Picklable worker entry: (meta, channels, resolution, source_size,
  windows) -> the site's image, or its error; `windows` holds each
  channel's (low, high) intensity window."""
  meta, channels, resolution, source_size, windows = args
  try:
    return SiteResult(meta, load_loaddata_site(meta, channels, resolution,
                                               source_size, windows))
  except SiteError as e:
    return SiteResult(meta, None, e.reason, e.path)
