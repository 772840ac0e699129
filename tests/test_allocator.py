"""gandl_jax/allocator.py: freed large blocks are reused, not faulted again."""
import os
import subprocess
import sys
import textwrap

import pytest

from gandl_jax import allocator

# In a fresh process: optionally apply the settings, then on a thread (where
# glibc would give a large block an mmap of its own) allocate, touch and free
# 96 MB twice, and print the minor page faults of the second round.
_CHILD = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from gandl_jax import allocator
    applied = allocator.keep_freed_memory() if sys.argv[1] == "1" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    faults = []
    def work():
      for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(96 << 20)
        libc.memset(p, 1, 96 << 20)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                      - before)
    t = threading.Thread(target=work)
    t.start(); t.join()
    print(applied, faults[1])
""")


def _run(apply: bool):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  r = subprocess.run([sys.executable, "-c", _CHILD, "1" if apply else "0"],
                     capture_output=True, text=True, env=env, check=True)
  applied, faults = r.stdout.split()
  return applied, int(faults)


def _thp_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_freed_blocks_are_reused_on_threads():
  applied, faults = _run(True)
  assert applied == "True"
  assert faults < 500, faults           # the 96 MB block came back untouched
  applied, faults = _run(False)         # glibc's defaults: a fresh mmap
  assert applied == "None"
  if not _thp_always():
    assert faults > 20_000, faults      # 96 MB / 4 KB pages = 24,576


def test_no_glibc_no_change(monkeypatch):
  monkeypatch.setattr(sys, "platform", "darwin")
  assert allocator._glibc() is None
  assert allocator.keep_freed_memory() is False


def test_own_tunables_are_left_alone(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  assert allocator.keep_freed_memory() is False
