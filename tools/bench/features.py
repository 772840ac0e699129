r"""Speed of the non-GAN feature methods (gandl-features).

  python tools/bench_features.py --data SHARDS --method classical --workers 1,2

Prints, per worker count, sites/s of `gandl_jax.baselines.run.
compute_embeddings` over every site of SHARDS (reading, features, writing
Parquet), and the in-process time per site of the method's feature
function alone on the first 64 sites.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from gandl_jax.baselines import method
from gandl_jax.baselines import run as run_lib
from gandl_jax.data import pipeline


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", required=True, help="shards written by gandl-convert")
  ap.add_argument("--method", default="classical")
  ap.add_argument("--workers", default="1,2")
  ap.add_argument("--batch", type=int, default=64)
  args = ap.parse_args()
  info = pipeline.read_dataset_info(args.data)
  it, _ = pipeline.eval_host_batches(args.data, host_batch=64)
  b = next(iter(it))
  images = b["image"][np.asarray(b["valid"], bool)]
  fn = method(args.method).features
  fn(images[:2])   # warm-up (imports)
  t = time.monotonic()
  fn(images)
  per_site = (time.monotonic() - t) / len(images)
  print(json.dumps({"method": args.method, "resolution": info["resolution"],
                    "channels": info["num_channels"],
                    "function_ms_per_site": round(1000 * per_site, 2),
                    "function_sites_per_s_1_core": round(1 / per_site, 1)}))
  for w in (int(x) for x in args.workers.split(",")):
    out = tempfile.mkdtemp(prefix="bench-features-")
    try:
      s = run_lib.compute_embeddings(args.method, args.data,
                                     os.path.join(out, "emb.parquet"),
                                     batch=args.batch, workers=w,
                                     progress_every_s=1e9)
      print(json.dumps({**s.as_dict(), "output": None,
                        "load_avg_1min": round(os.getloadavg()[0], 1)}))
    finally:
      shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
  main()
