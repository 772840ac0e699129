"""Benchmark the DenseNet-121 baselines on this machine's default JAX device.

Prints one JSON line per measurement:

* `keras_vs_jax`: images/s of DenseNet-121 (no top, GAP) on (B, S, S, 3)
  float inputs, Keras `model.predict` (TensorFlow, oneDNN on CPU) against the
  JAX port (`gandl_jax.baselines.densenet`), interleaved repeats, median and
  best; the reason the port exists (see docs/baselines.md);
* `concat`: sites/s of the concatenated features (5 channels per site, so 5
  network passes per site) on uint8 (B, S, S, 5) sites;
* `collapsed`: site passes/s of the collapsed model's training step (forward
  and backward through the frozen DenseNet, Adam on the 1x1 conv + head),
  and what a given number of training sites x epochs would take.

  python tools/bench_baselines.py                      # 256x256, random weights
  python tools/bench_baselines.py --size 224 --batch 16 --repeats 5

Weights do not change the speed; `--weights none` (default) needs no network.
Compilation is excluded (one warm-up call per program).
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 256, "Image edge (RxRx19a shards: 256).")
flags.DEFINE_integer("batch", 8, "Sites per batch (concat, collapsed); images "
                     "per batch for keras_vs_jax.")
flags.DEFINE_integer("repeats", 3, "Timed repeats of each measurement.")
flags.DEFINE_string("weights", "none", "DenseNet-121 weights.")
flags.DEFINE_list("only", ["keras_vs_jax", "concat", "collapsed"],
                  "Which measurements.")
flags.DEFINE_integer("train_sites", 10_000, "collapsed: training sites of one "
                     "task and split, for the time estimate (set it to the "
                     "task's n_train in metrics.json).")
flags.DEFINE_integer("epochs", 5, "collapsed: epochs for the time estimate.")


def _timed(fn, repeats):
  fn()  # warm-up: compile
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def _rate(n, seconds):
  seconds = sorted(seconds)
  return {"median": round(n / seconds[len(seconds) // 2], 2),
          "best": round(n / seconds[0], 2)}


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from gandl_jax.baselines import collapsed, densenet
  rng = np.random.default_rng(0)
  s, b, reps = FLAGS.size, FLAGS.batch, FLAGS.repeats
  backbone = densenet.load_backbone(FLAGS.weights)
  device = f"{jax.devices()[0].platform} x{len(jax.devices())}, " \
           f"{os.cpu_count()} CPU cores"
  params = jax.device_put(backbone.params)

  if "keras_vs_jax" in FLAGS.only:
    model = densenet.keras_model(None, 0)
    x = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    f = jax.jit(densenet.pooled)
    times = {"keras": [], "jax": []}
    f(params, x).block_until_ready()
    model.predict(x, batch_size=b, verbose=0)
    for _ in range(reps):  # interleaved: both see the same machine load
      t = time.perf_counter()
      f(params, x).block_until_ready()
      times["jax"].append(time.perf_counter() - t)
      t = time.perf_counter()
      model.predict(x, batch_size=b, verbose=0).mean(axis=(1, 2))
      times["keras"].append(time.perf_counter() - t)
    print(json.dumps({"bench": "keras_vs_jax", "size": s, "batch": b,
                      "device": device, "images_per_s": {
                          k: _rate(b, v) for k, v in times.items()}}))

  if "concat" in FLAGS.only:
    sites = rng.integers(0, 256, (b, s, s, 5), dtype=np.uint8)
    fn = densenet._jitted_concat(None, "float32")  # pylint: disable=protected-access
    cost = fn.lower(params, sites).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float((cost or {}).get("flops", float("nan"))) / b / 1e9
    t = _timed(lambda: fn(params, sites).block_until_ready(), reps)
    print(json.dumps({"bench": "concat", "size": s, "batch_sites": b,
                      "device": device, "sites_per_s": _rate(b, t),
                      "xla_gflop_per_site": round(gflop, 2)}))

  if "collapsed" in FLAGS.only:
    cfg = collapsed.CollapsedConfig(batch=b)
    runner = collapsed.Runner(backbone, cfg)
    n = runner.batch
    images = rng.integers(0, 256, (n, s, s, 5), dtype=np.uint8)
    labels = np.arange(n) % 2
    trainable = jax.device_put(collapsed.init_trainable(5, 2, 0), runner.repl)
    opt = jax.device_put(runner.tx.init(trainable), runner.repl)
    state = [trainable, opt]
    scaler = jax.device_put(collapsed.fit_scaler(
        np.random.default_rng(0).random((4, densenet.FEATURE_DIM))),
                            runner.repl)

    def step():
      state[0], state[1] = runner.train_epoch(
          state[0], state[1], scaler, images, labels, np.ones(n, np.float32),
          np.random.default_rng(0))
      jax.block_until_ready(state[0])
    t = _timed(step, reps)
    rate = _rate(n, t)
    est = FLAGS.train_sites * FLAGS.epochs / rate["median"]
    print(json.dumps({"bench": "collapsed_train", "size": s,
                      "batch_sites": n, "device": device,
                      "site_passes_per_s": rate,
                      "estimate": f"{FLAGS.train_sites} training sites x "
                                  f"{FLAGS.epochs} epochs: {est / 3600:.1f} h "
                                  f"per task and split"}))


if __name__ == "__main__":
  app.run(main)
