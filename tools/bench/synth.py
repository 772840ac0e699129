r"""Speed of the synthetic generator (gandl-synth), per difficulty.

  python tools/bench_synth.py --size 64 --workers 2 --difficulty easy,hard,hard2

Writes the default RxRx19a tree (4 experiments x 2 plates x 48 wells x 4 sites
= 1,536 sites; rendering and 5 PNG files per site) into a temporary
directory per difficulty and prints sites/s (wall clock, all workers), plus
the CPU time per site of the process tree.
"""
import argparse
import json
import os
import resource
import shutil
import tempfile
import time

from gandl_jax.data import synthetic


def _cpu_s() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--plates", type=int, default=2)
  ap.add_argument("--dataset", default="rxrx19a")
  ap.add_argument("--difficulty", default=",".join(synthetic.DIFFICULTIES))
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  for diff in args.difficulty.split(","):
    out = tempfile.mkdtemp(prefix="bench-synth-")
    try:
      t0, c0 = time.monotonic(), _cpu_s()
      root = synthetic.generate(out, dataset=args.dataset, size=args.size,
                                plates=args.plates, seed=args.seed,
                                workers=args.workers, difficulty=diff)
      wall, cpu = time.monotonic() - t0, _cpu_s() - c0
      with open(os.path.join(root, "metadata.csv"), encoding="utf-8") as f:
        n = sum(1 for _ in f) - 1
      print(json.dumps({
          "difficulty": diff, "dataset": args.dataset, "size": args.size,
          "sites": n, "workers": args.workers, "seconds": round(wall, 2),
          "sites_per_s": round(n / wall, 1),
          "cpu_ms_per_site": round(1000 * cpu / n, 2),
          "load_avg_1min": round(os.getloadavg()[0], 1)}))
    finally:
      shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
  main()
