"""Files, local or remote (gs://...): the project's only atomic writer and
remote-path helpers.

Every output file is written to a temporary local file first and published
when complete (an atomic rename locally, a single-object upload on GCS, which
is atomic too), so a killed process never leaves a half-written file under
the final name. Remote paths go through `tf.io.gfile` (imported on first use,
so local-only users never load TensorFlow).

tests/test_io.py fails if a second "temporary file, then rename" helper
appears in the package: write through `atomic_path`/`atomic_write` instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Callable, Iterator


def tensorflow():
  """TensorFlow, imported with its GPUs and TPUs hidden: the project uses it
  only for tf.data, gfile, TensorBoard and Keras weights, and JAX owns the
  accelerators. The one place that imports it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # already initialised, or no such type
    pass
  return tf


def _gfile():
  return tensorflow().io.gfile


def is_remote(path: Any) -> bool:
  """True for URLs such as gs://bucket/x (anything with a scheme)."""
  return "://" in str(path)


def join(*parts: str) -> str:
  """os.path.join for local paths, '/'-joining for remote ones."""
  if is_remote(parts[0]):
    return "/".join([str(parts[0]).rstrip("/")] +
                    [str(p).strip("/") for p in parts[1:]])
  return os.path.join(*parts)


def absolute(path: str) -> str:
  """Absolute local path (Orbax wants one); remote paths unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Removes a file if it exists."""
  if is_remote(path):
    if _gfile().exists(path):
      _gfile().remove(path)
  elif os.path.lexists(path):
    os.remove(path)


def read_bytes(path: str) -> bytes:
  """A whole file; FileNotFoundError when it does not exist."""
  if is_remote(path):
    tf = tensorflow()
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()
    except tf.errors.NotFoundError as e:
      raise FileNotFoundError(path) from e
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def tmp_glob(name: str) -> str:
  """Glob of the temporary files `atomic_path` makes for files named `name`
  (which may itself hold globs)."""
  return f".{name}.tmp-*"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary local path; when the block ends without an exception
  its file is published as `path`, otherwise it is removed.

  Temporary names are `.NAME.tmp-XXXXXXXX.EXT`: hidden, and recognisable as
  leftovers of a killed process (`tmp_glob`).

  The temporary file lives next to `path` (same file system: the rename is
  atomic) or, for remote paths, in the local temp directory. It keeps the
  suffix of `path` so that writers which pick a format by extension work.
  """
  path = str(path)
  remote = is_remote(path)
  directory = (tempfile.gettempdir() if remote
               else os.path.dirname(os.path.abspath(path)))
  if not remote:
    os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  suffix = "".join(s for s in os.path.splitext(name)[1:])
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.tmp-",
                            suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    if remote:
      _gfile().makedirs(os.path.dirname(path))
      _gfile().copy(tmp, path, overwrite=True)
      os.remove(tmp)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write(path: str, write_fn: Callable[[Any], Any],
                 mode: str = "w") -> None:
  """Calls `write_fn(file_object)` on a temporary file opened with `mode`,
  then publishes it as `path` (see `atomic_path`)."""
  with atomic_path(path) as tmp:
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with open(tmp, mode, **kwargs) as f:  # pylint: disable=unspecified-encoding
      write_fn(f)


def write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def write_bytes(path: str, data: bytes) -> None:
  atomic_write(path, lambda f: f.write(data), mode="wb")


def write_json(path: str, obj: Any, indent: int = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent, sort_keys=True,
                              default=str) + "\n")


def append_line(path: str, line: str) -> None:
  """Appends one line (e.g. to metrics.jsonl). GCS objects cannot be appended
  to, so remote files are rewritten whole (keep such files small)."""
  line = line if line.endswith("\n") else line + "\n"
  if is_remote(path):
    old = read_text(path) if exists(path) else ""
    write_text(path, old + line)
  else:
    with open(path, "a", encoding="utf-8") as f:
      f.write(line)
