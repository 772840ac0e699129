"""Benchmark the ResNet-50 perceptual loss on this machine's default device.

Prints one JSON line per image size: images/s and XLA's FLOP count of
`resnet50.perceptual_loss` and of its gradient with respect to the
reconstructions (what a ConvAE training step adds), on (B, S, S, C) float
images (every channel a separate ResNet-50 pass up to conv4, for both the
reconstructions and the targets: 2 C passes per image).

  python tools/bench_perceptual.py                       # 32 and 64, C=5
  python tools/bench_perceptual.py --sizes 256 --batch 4 --repeats 2

Weights do not change the speed; `--weights none` (default) needs no network.
Compilation is excluded (one warm-up call per program).
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["32", "64"], "Image edges.")
flags.DEFINE_integer("batch", 8, "Images per batch.")
flags.DEFINE_integer("channels", 5, "Channels per image (RxRx19a: 5).")
flags.DEFINE_integer("repeats", 3, "Timed repeats.")
flags.DEFINE_string("weights", "none", "ResNet-50 weights.")


def _timed(fn, repeats):
  fn()  # warm-up: compile
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return sorted(out)


def _gflop(jitted, *args):
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan"))) / 1e9


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from gandl_jax.baselines import resnet50
  backbone = resnet50.load(FLAGS.weights)
  params = jax.device_put(backbone.params)
  device = (f"{jax.devices()[0].device_kind} x{len(jax.devices())}, "
            f"{os.cpu_count()} CPU cores")
  loss = jax.jit(resnet50.perceptual_loss)
  grad = jax.jit(jax.value_and_grad(resnet50.perceptual_loss, argnums=1))
  rng = np.random.default_rng(0)
  b, c = FLAGS.batch, FLAGS.channels
  for s in (int(v) for v in FLAGS.sizes):
    x = jax.device_put(rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32))
    y = jax.device_put(rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32))
    fwd = _timed(lambda: loss(params, x, y).block_until_ready(),
                 FLAGS.repeats)
    bwd = _timed(lambda: jax.block_until_ready(grad(params, x, y)),
                 FLAGS.repeats)
    print(json.dumps({
        "bench": "perceptual_loss", "size": s, "batch": b, "channels": c,
        "device": device, "weights": backbone.weights,
        "loss_images_per_s": {"median": round(b / fwd[len(fwd) // 2], 2),
                              "best": round(b / fwd[0], 2)},
        "loss_and_grad_images_per_s": {
            "median": round(b / bwd[len(bwd) // 2], 2),
            "best": round(b / bwd[0], 2)},
        "xla_gflop_per_image": {
            "loss": round(_gflop(loss, params, x, y) / b, 3),
            "loss_and_grad": round(_gflop(grad, params, x, y) / b, 3)}}))


if __name__ == "__main__":
  app.run(main)
