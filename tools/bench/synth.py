r"""Speed of the synthetic generator (gandl-synth), per difficulty.

  python -m tools.bench.synth --size 64 --workers 2 --difficulty easy,hard

Writes the RxRx19a tree (4 experiments x --plates plates x 48 wells x 4 sites;
rendering and 5 PNG files per site) into a temporary directory per difficulty
and round, and records sites/s (wall clock, all workers) and the CPU
milliseconds per site of the process tree.
"""
import os
import resource
import shutil
import tempfile
import time

from absl import flags

from gandl_jax.data import synthetic
from tools.bench import harness

harness.define_flags(rounds=1, warmup=0)
_SIZE = flags.DEFINE_integer("size", 64, "Image edge.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes.")
_PLATES = flags.DEFINE_integer("plates", 2, "Plates per experiment.")
_DATASET = flags.DEFINE_string("dataset", "rxrx19a", "Dataset layout.")
_DIFFICULTY = flags.DEFINE_list("difficulty", list(synthetic.DIFFICULTIES),
                                "Difficulties to time.")
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")


def _children_cpu_s() -> float:
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return kids.ru_utime + kids.ru_stime


def _generate(difficulty, sites):
  """One round: the tree into a fresh temporary directory; its site count
  goes to `sites`, the worker processes' CPU seconds are added to the
  sample's own."""
  def run():
    out = tempfile.mkdtemp(prefix="bench-synth-")
    try:
      c0, t0 = _children_cpu_s(), time.perf_counter()
      own0 = time.process_time()
      root = synthetic.generate(out, dataset=_DATASET.value, size=_SIZE.value,
                                plates=_PLATES.value, seed=_SEED.value,
                                workers=_WORKERS.value, difficulty=difficulty)
      wall = time.perf_counter() - t0
      cpu = time.process_time() - own0 + _children_cpu_s() - c0
      with open(os.path.join(root, "metadata.csv"), encoding="utf-8") as f:
        sites[difficulty] = sum(1 for _ in f) - 1
      return harness.Sample(wall, cpu)
    finally:
      shutil.rmtree(out, ignore_errors=True)
  return run


def main(argv):
  del argv
  sites = {}
  times = harness.alternate({d: _generate(d, sites) for d in _DIFFICULTY.value},
                            flags.FLAGS.rounds, flags.FLAGS.warmup)
  for d, t in times.items():
    n = sites[d]
    cfg = {"difficulty": d, "dataset": _DATASET.value, "size": _SIZE.value,
           "sites": n, "workers": _WORKERS.value}
    harness.emit("sites_per_s", n / t.median, "sites/s", cfg, timing=t)
    harness.emit("cpu_ms_per_site", 1000 * t.cpu_median / n, "CPU ms", cfg,
                 timing=t)


if __name__ == "__main__":
  harness.run(main, "synth")
