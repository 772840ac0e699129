"""The DenseNet-121 baselines on the default JAX device.

Records:

* `keras_vs_jax`: images/s of DenseNet-121 (no top, GAP) on (B, S, S, 3)
  float inputs, Keras `model.predict` (TensorFlow, oneDNN on CPU) against the
  JAX port (`gandl_jax.baselines.densenet`), in alternating rounds; the
  reason the port exists (see docs/baselines.md);
* `concat`: sites/s of the concatenated features (5 channels per site, so 5
  network passes per site) on uint8 (B, S, S, 5) sites;
* `collapsed`: site passes/s of the collapsed model's training step (forward
  and backward through the frozen DenseNet, Adam on the 1x1 conv + head),
  and what a given number of training sites x epochs would take.

  python -m tools.bench.baselines                  # 256x256, random weights
  python -m tools.bench.baselines --size 224 --batch 16 --rounds 5

Weights do not change the speed; `--weights none` (default) needs no network.
Compilation is excluded (one warm-up call per program).
"""
from __future__ import annotations

import os

from absl import flags

from tools.bench import harness

harness.define_flags(rounds=3, warmup=1)
FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 256, "Image edge (RxRx19a shards: 256).")
flags.DEFINE_integer("batch", 8, "Sites per batch (concat, collapsed); images "
                     "per batch for keras_vs_jax.")
flags.DEFINE_string("weights", "none", "DenseNet-121 weights.")
flags.DEFINE_list("only", ["keras_vs_jax", "concat", "collapsed"],
                  "Which measurements.")
flags.DEFINE_integer("train_sites", 10_000, "collapsed: training sites of one "
                     "task and split, for the time estimate (set it to the "
                     "task's n_train in metrics.json).")
flags.DEFINE_integer("epochs", 5, "collapsed: epochs for the time estimate.")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from gandl_jax.baselines import collapsed, densenet
  rng = np.random.default_rng(0)
  s, b = FLAGS.size, FLAGS.batch
  rounds, warmup = FLAGS.rounds, FLAGS.warmup
  backbone = densenet.load_backbone(FLAGS.weights)
  params = jax.device_put(backbone.params)

  if "keras_vs_jax" in FLAGS.only:
    model = densenet.keras_model(None, 0)
    x = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    f = jax.jit(densenet.pooled)
    times = harness.alternate(
        {"jax": lambda: f(params, x).block_until_ready(),
         "keras": lambda: model.predict(x, batch_size=b, verbose=0).mean(
             axis=(1, 2))}, rounds, warmup)
    for name, t in times.items():
      harness.emit(f"{name}/images_per_s", b / t.median, "images/s",
                   {"size": s, "batch": b, "weights": FLAGS.weights},
                   bench="baselines/keras_vs_jax", timing=t)

  if "concat" in FLAGS.only:
    sites = rng.integers(0, 256, (b, s, s, 5), dtype=np.uint8)
    fn = densenet._jitted_concat(None, "float32")  # pylint: disable=protected-access
    flops = harness.flops(fn.lower(params, sites).compile())
    t = harness.time_rounds(lambda: fn(params, sites).block_until_ready(),
                            rounds, warmup)
    cfg = {"size": s, "batch_sites": b, "weights": FLAGS.weights}
    harness.emit("sites_per_s", b / t.median, "sites/s", cfg,
                 bench="baselines/concat", timing=t)
    if flops:
      harness.emit("xla_gflop_per_site", flops / b / 1e9, "GFLOP", cfg,
                   bench="baselines/concat")

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
    t = harness.time_rounds(step, rounds, warmup)
    rate = n / t.median
    est = FLAGS.train_sites * FLAGS.epochs / rate
    harness.emit("site_passes_per_s", rate, "sites/s",
                 {"size": s, "batch_sites": n, "weights": FLAGS.weights},
                 bench="baselines/collapsed_train", timing=t)
    harness.say(f"collapsed: {FLAGS.train_sites} training sites x "
                f"{FLAGS.epochs} epochs: {est / 3600:.1f} h per task and split")


if __name__ == "__main__":
  harness.run(main, "baselines")
