"""What the RxRx and LoadData readers share: their error types, reading one
image file safely, plain-integer parsing and area-averaging resizes.

Nothing here imports TensorFlow unless a path is remote (`gs://...`), so
conversion worker processes start quickly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import stat
from typing import BinaryIO, Dict, Iterator, Optional, Tuple

import numpy as np

from gandl_jax import io as gio


class MetadataError(ValueError):
  """metadata.csv cannot be used at all (missing file or columns)."""


class SiteError(Exception):
  """One site cannot be converted; `path` names the offending file."""

  def __init__(self, reason: str, path: str = ""):
    super().__init__(reason)
    self.reason = reason
    self.path = path


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
_INT_RE = re.compile(r"^[+-]?[0-9]+$")


def parse_int(text: str, col: str) -> int:
  """A plain decimal int64 (no underscores, spaces or fractions); SiteError
  naming the column otherwise."""
  if not _INT_RE.match(text):
    raise SiteError(f"column {col}: expected an integer, got {text!r}")
  v = int(text)
  if not INT64_MIN <= v <= INT64_MAX:
    raise SiteError(f"column {col}: {text!r} is outside the int64 range")
  return v


@contextlib.contextmanager
def open_image_file(path: str, what: str = "an image file"
                    ) -> Iterator[Tuple[BinaryIO, int]]:
  """(binary file object, size in bytes) of one image file, nothing read.

  FileNotFoundError when nothing is there; SiteError when something other
  than a regular file is (a directory, a FIFO, a device, a symlink loop) or
  it cannot be opened (`what` names what was expected). Local files are
  opened non-blocking and checked with fstat, so a FIFO never blocks. A
  remote file (gs://) that cannot be read for any other reason than its
  absence is a SiteError too, not an abort.
  """
  if gio.is_remote(path):
    tf = gio.tensorflow()
    try:
      size = int(tf.io.gfile.stat(path).length)
      f = tf.io.gfile.GFile(path, "rb")
    except tf.errors.NotFoundError:
      raise FileNotFoundError(path) from None
    except Exception as e:  # tf.errors.OpError subclasses and more
      raise SiteError(f"cannot read the image file ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})",
                      path) from None
    with f:
      yield f, size
    return
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except FileNotFoundError:
    raise
  except OSError as e:
    reason = ("symlink loop" if e.errno == errno.ELOOP
              else e.strerror or type(e).__name__)
    raise SiteError(f"cannot open the image file ({reason})", path) from None
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      mode = st.st_mode
      kind = ("a directory" if stat.S_ISDIR(mode) else
              "a FIFO" if stat.S_ISFIFO(mode) else
              "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
              "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
      raise SiteError(f"expected {what}, found {kind}", path)
    with os.fdopen(fd, "rb", closefd=False) as f:
      yield f, int(st.st_size)
  finally:
    os.close(fd)


def read_image_file(path: str) -> bytes:
  """The bytes of one image file (`open_image_file`'s checks and errors)."""
  with open_image_file(path) as (f, _):
    try:
      return f.read()
    except OSError as e:
      raise SiteError(f"cannot read the image file ({e.strerror or e})",
                      path) from None


def decode_error(e: Exception, what: str, path: str) -> SiteError:
  """SiteError for an image PIL could not decode (`what`: "PNG", "image"),
  without the in-memory buffer's address in the message."""
  msg = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", " (in memory)", str(e))
  return SiteError(f"corrupt or unreadable {what} ({type(e).__name__}: {msg})",
                   path)


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


@dataclasses.dataclass
class SiteResult:
  """What a conversion worker returns for one site."""
  meta: Dict[str, object]
  image: Optional[np.ndarray] = None
  error: str = ""
  path: str = ""
