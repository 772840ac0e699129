"""Benchmark gandl-evaluate at RxRx19a size: wall time and peak memory.

Generates RxRx19a-shaped embeddings with planted signal (HRCE/VERO, Mock /
UV / Active controls, 1,670 compounds x 6 half-log doses with known EC50s,
plate shifts), writes them as our Parquet layout plus metadata.csv and
synthetic_truth.csv, then runs the evaluation in a fresh child process and
reports its wall time and peak resident memory (ru_maxrss of the child).

  python tools/bench_evaluate.py                       # full: 305,520 x 1024
  python tools/bench_evaluate.py --sites 20000 --dim 256   # quick look

Targets (issue 6): full size under 120 s and 8 GB on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("sites", 305_520, "Total sites (RxRx19a: 305,520).")
flags.DEFINE_integer("dim", 1024, "Feature dimension.")
flags.DEFINE_string("workdir", "/tmp/gandl_bench_evaluate", "Scratch directory.")
flags.DEFINE_bool("keep", False, "Keep the generated files.")
flags.DEFINE_list("tasks", ["control", "cell_model", "dose_response", "truth"],
                  "Tasks to time.")
flags.DEFINE_integer("seed", 0, "Generator seed.")

# RxRx19a proportions (datasets.md): HRCE 284,080 and VERO 21,440 sites;
# Mock 9,120 and UV-inactivated 9,120; about 1,670 compounds x 6 doses.
_FULL = 305_520
_HRCE, _VERO = 284_080, 21_440


def _generate(workdir: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gandl_jax.evaluate import io as eio  # pylint: disable=g-import-not-at-top
  from gandl_jax.evaluate import simulate  # pylint: disable=g-import-not-at-top

  scale = FLAGS.sites / _FULL
  hrce = int(round(_HRCE * scale))
  cfg = simulate.SimConfig(
      sites_per_cell_type=(("HRCE", hrce), ("VERO", FLAGS.sites - hrce)),
      wells_per_plate=1380, dim=FLAGS.dim, frac_mock=9120 / _FULL,
      frac_uv=9120 / _FULL, frac_active=0.03,
      n_compounds=max(12, int(round(1670 * scale))), n_rescue=10, n_toxic=10,
      infection_effect=3.0, cell_effect=1.5, plate_shift=2.0, seed=FLAGS.seed)
  t = time.time()
  rng = np.random.default_rng(cfg.seed)
  truth = simulate.compounds_truth(cfg, rng)
  md = simulate.make_metadata(cfg, rng, truth)
  X = simulate.make_features(md, truth, cfg, rng)
  gen_s = time.time() - t
  t = time.time()
  md.to_csv(os.path.join(workdir, "metadata.csv"), index=False)
  truth.to_csv(os.path.join(workdir, "synthetic_truth.csv"), index=False)
  eio.write_embeddings(os.path.join(workdir, "embeddings.parquet"), md, X,
                       file_metadata={"gandl.layer": "bench"})
  write_s = time.time() - t
  size = os.path.getsize(os.path.join(workdir, "embeddings.parquet"))
  return {"sites": int(len(md)), "dim": int(X.shape[1]),
          "plates": int(md.groupby(["experiment", "plate"]).ngroups),
          "compounds": int(len(truth)),
          "generate_s": round(gen_s, 1), "write_s": round(write_s, 1),
          "parquet_gb": round(size / 2**30, 2)}


_CHILD = """
import json, sys, time
t = time.time()
from gandl_jax.evaluate import evaluate
w, tasks = sys.argv[1], sys.argv[2].split(",")
m = evaluate(w + "/embeddings.parquet", w + "/out", metadata=w + "/metadata.csv",
             tasks=tasks, compounds=["Remdesivir (GS-5734)", "GS-441524"])
print("CHILD_WALL", time.time() - t)
"""


def main(argv):
  del argv
  wd = FLAGS.workdir
  os.makedirs(wd, exist_ok=True)
  print(f"generating {FLAGS.sites} x {FLAGS.dim} embeddings in {wd} ...",
        flush=True)
  info = _generate(wd)
  print(json.dumps(info), flush=True)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  t = time.time()
  r = subprocess.run([sys.executable, "-c", _CHILD, wd, ",".join(FLAGS.tasks)],
                     env=env, capture_output=True, text=True)
  wall = time.time() - t
  peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  if r.returncode != 0:
    print(r.stdout[-3000:], r.stderr[-3000:])
    raise SystemExit(f"evaluation failed with exit code {r.returncode}")
  with open(os.path.join(wd, "out", "metrics.json")) as f:
    m = json.load(f)
  e = m["embeddings"]["embeddings"]
  print("\n".join(line for line in r.stdout.splitlines()
                  if line.startswith("  ")))
  print(f"\nevaluate: {info['sites']} sites x {info['dim']} features, "
        f"tasks {','.join(FLAGS.tasks)}")
  print(f"  wall time (process start to report written): {wall:.1f} s "
        f"(target < 120 s)")
  print(f"  peak resident memory: {peak_gb:.2f} GB (target < 8 GB)")
  print(f"  stage seconds: {json.dumps(e['timing_s'])}")
  for task in ("control", "cell_model"):
    if e.get(task, {}).get("status") == "ok":
      for split in ("random", "plate"):
        s = e[task].get(split, {})
        if s.get("status") == "ok":
          print(f"  {task} {split}: accuracy {s['accuracy']:.3f}, balanced "
                f"{s['balanced_accuracy']:.3f}, n_train {s['n_train']} "
                f"(used {s['n_train_used']}), n_test {s['n_test']}, C {s['C']}")
  if e.get("dose_response", {}).get("status") == "ok":
    d = e["dose_response"]
    print(f"  dose_response: {d['n_treated_sites']} treated sites, "
          f"{d['n_fits']} fits, flags {d['flags']}, hits {d['n_hits']}")
  if e.get("truth", {}).get("status") == "ok":
    t = e["truth"]
    print(f"  truth: hits found {t['hits_found']}/{t['true_hits']}, "
          f"called {t['predicted_hits']}, EC50 Spearman {t['ec50_spearman']}")
  ok = wall < 120 and peak_gb < 8
  print(f"  {'PASS' if ok else 'FAIL'} (wall < 120 s and peak < 8 GB)")
  if not FLAGS.keep:
    shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
