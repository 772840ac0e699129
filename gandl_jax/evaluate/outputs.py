"""The files one gandl-evaluate run writes in its output directory, listed
in a manifest (`.gandl-evaluate-files.json`) so that the next run into the
same directory removes them before it writes its own: a table a run no
longer writes (e.g. `map_activity_<set>.csv` of a set not evaluated this
time) cannot pass for a result of the new run. Files the manifest does not
list (the user's own) are never touched.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Callable, List

from gandl_jax import io as gio

MANIFEST = ".gandl-evaluate-files.json"


class OutputFiles:
  """The manifest of one run: `add(rel)` before each file is written (so a
  run stopped halfway is cleaned up by the next one too); the first `add`
  (or `clear_previous`) removes the files of the run before."""

  def __init__(self, output_dir: str, log: Callable[[str], None] = print):
    self.output_dir = output_dir
    self.log = log
    self.files: List[str] = []
    self._cleared = False
    self._lock = threading.Lock()

  @property
  def manifest(self) -> str:
    return os.path.join(self.output_dir, MANIFEST)

  def _inside(self, rel: str) -> bool:
    root = os.path.realpath(self.output_dir)
    path = os.path.realpath(os.path.join(root, rel))
    return os.path.commonpath([root, path]) == root and path != root

  def _previous(self) -> List[str]:
    try:
      with open(self.manifest) as f:
        listed = json.load(f).get("files", [])
    except FileNotFoundError:
      return []
    except (OSError, ValueError, AttributeError) as e:
      self.log(f"{self.manifest}: unreadable ({e}); files of an earlier run "
               f"are not removed")
      return []
    return [r for r in listed if isinstance(r, str) and self._inside(r)]

  def _write(self) -> None:
    text = json.dumps({"written_by": "gandl-evaluate",
                       "files": sorted(set(self.files))}, indent=1)
    gio.atomic_write(self.manifest, lambda f: f.write(text + "\n"))

  def _clear_locked(self) -> None:
    if self._cleared:
      return
    self._cleared = True
    removed = 0
    for rel in self._previous():
      path = os.path.join(self.output_dir, rel)
      if os.path.isfile(path) and not os.path.islink(path):
        os.remove(path)
        removed += 1
    if removed:
      self.log(f"removed {removed} file(s) of the previous run in "
               f"{self.output_dir}")
    self._write()

  def clear_previous(self) -> None:
    """Removes the files the previous run listed (once)."""
    with self._lock:
      self._clear_locked()

  def add(self, rel: str) -> str:
    """Records `rel` (relative to the output directory) before it is
    written; returns it."""
    with self._lock:
      self._clear_locked()
      if rel not in self.files:
        self.files.append(rel)
        self._write()
    return rel
