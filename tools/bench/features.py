r"""Speed of the non-GAN feature methods (gandl-features).

  python -m tools.bench.features --data SHARDS --method classical --workers 1,2

Records, per worker count, sites/s of `gandl_jax.baselines.run.
compute_embeddings` over every site of SHARDS (reading, features, writing
Parquet), and the in-process time per site of the method's feature function
alone on the first 64 sites.
"""
import os
import shutil
import tempfile

import numpy as np
from absl import flags

from gandl_jax.baselines import method
from gandl_jax.baselines import run as run_lib
from gandl_jax.data import pipeline
from tools.bench import harness

harness.define_flags(rounds=1, warmup=0)
_DATA = flags.DEFINE_string("data", None, "Shards written by gandl-convert.")
_METHOD = flags.DEFINE_string("method", "classical", "Feature method.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker counts.")
_BATCH = flags.DEFINE_integer("batch", 64, "Sites per batch.")
flags.mark_flags_as_required(["data"])


def _compute(workers, sites):
  def run():
    out = tempfile.mkdtemp(prefix="bench-features-")
    try:
      s = run_lib.compute_embeddings(_METHOD.value, _DATA.value,
                                     os.path.join(out, "emb.parquet"),
                                     batch=_BATCH.value, workers=workers,
                                     progress_every_s=1e9)
      sites[workers] = s.num_sites
    finally:
      shutil.rmtree(out, ignore_errors=True)
  return run


def main(argv):
  del argv
  info = pipeline.read_dataset_info(_DATA.value)
  it, _ = pipeline.eval_host_batches(_DATA.value, host_batch=64)
  b = next(iter(it))
  images = b["image"][np.asarray(b["valid"], bool)]
  fn = method(_METHOD.value).features
  cfg = {"method": _METHOD.value, "resolution": info["resolution"],
         "channels": info["num_channels"]}
  t = harness.time_rounds(lambda: fn(images), flags.FLAGS.rounds,
                          warmup=1)   # the warm-up imports
  harness.emit("function_ms_per_site", 1000 * t.median / len(images), "ms",
               dict(cfg, sites=len(images)), timing=t)
  sites = {}
  times = harness.alternate(
      {int(w): _compute(int(w), sites) for w in _WORKERS.value},
      flags.FLAGS.rounds, flags.FLAGS.warmup)
  for w, t in times.items():
    harness.emit("sites_per_s", sites[w] / t.median, "sites/s",
                 dict(cfg, workers=w, sites=sites[w], batch=_BATCH.value),
                 timing=t)


if __name__ == "__main__":
  harness.run(main, "features")
