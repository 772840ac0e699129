"""Process-wide C allocator settings for commands that churn large buffers.

`gandl-evaluate` at RxRx19a size fits 50-odd linear SVMs; each fit makes
scikit-learn's float64 copy of the training rows and liblinear's own working
copy (about 100 + 220 MB on 13,845 x 1,024), then frees both. glibc serves
blocks that large with mmap and unmaps them on free, so every fit touches
fresh pages that the kernel must fault in and zero: measured 15 of the
command's 70 CPU seconds in the kernel, most of it `clear_page`. With the
settings below, freed blocks stay in the process and the next fit reuses
them (about half of that system time gone; results unchanged: only where
the bytes live changes).

`keep_freed_memory()` must run before the libraries that start threads
(numpy's BLAS, polars) are imported: a thread that allocates gets an arena
of its own, and large blocks of such arenas are always mmap'ed. Only
glibc has these settings (`mallopt`); elsewhere (musl, macOS, Windows) the
call does nothing and returns False. Set GLIBC_TUNABLES with
`glibc.malloc.*` entries to choose your own settings instead: the call then
leaves the allocator alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# Free memory at the top of the heap returned to the system only beyond this
# (mallopt takes an int: at most 2 GiB - 1).
TRIM_THRESHOLD = (1 << 31) - 1


def _glibc():
  """The C library as a ctypes handle where it is glibc, else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
      return None
  except (ValueError, OSError):        # not glibc (musl has no such name)
    return None
  try:
    libc = ctypes.CDLL(None)
    fn = libc.mallopt
  except (OSError, AttributeError):
    return None
  fn.argtypes = (ctypes.c_int, ctypes.c_int)
  fn.restype = ctypes.c_int
  return libc


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of returning it.

  One arena for all threads (M_ARENA_MAX 1: a thread's own arena would
  mmap every block over 64 MB), no mmap'ed blocks (M_MMAP_MAX 0: large
  blocks come from the heap and go back to it), and the heap's free top
  kept up to 2 GiB (M_TRIM_THRESHOLD). Freed blocks are reused, not
  returned, so the peak can grow by what fragmentation leaves unused
  (gandl-evaluate at RxRx19a size: 3.48 against 3.37 GB). Returns whether
  the settings were applied (glibc only; not when GLIBC_TUNABLES sets
  malloc tunables).
  """
  if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    return False
  libc = _glibc()
  if libc is None:
    return False
  ok = True
  for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                       (M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
    ok = bool(libc.mallopt(param, value)) and ok
  return ok
