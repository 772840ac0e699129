"""The ResNet-50 perceptual loss on the default device.

Records, per image size, images/s and XLA's FLOPs of
`resnet50.perceptual_loss` and of its gradient with respect to the
reconstructions (what a ConvAE training step adds), on (B, S, S, C) float
images (every channel a separate ResNet-50 pass up to conv4, for both the
reconstructions and the targets: 2 C passes per image).

  python -m tools.bench.perceptual                       # 32 and 64, C=5
  python -m tools.bench.perceptual --sizes 256 --batch 4 --rounds 2

Weights do not change the speed; `--weights none` (default) needs no network.
"""
from __future__ import annotations

import os

from absl import flags

from tools.bench import harness

harness.define_flags(rounds=3, warmup=1)
FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["32", "64"], "Image edges.")
flags.DEFINE_integer("batch", 8, "Images per batch.")
flags.DEFINE_integer("channels", 5, "Channels per image (RxRx19a: 5).")
flags.DEFINE_string("weights", "none", "ResNet-50 weights.")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from gandl_jax.baselines import resnet50
  backbone = resnet50.load(FLAGS.weights)
  params = jax.device_put(backbone.params)
  loss = jax.jit(resnet50.perceptual_loss)
  grad = jax.jit(jax.value_and_grad(resnet50.perceptual_loss, argnums=1))
  rng = np.random.default_rng(0)
  b, c = FLAGS.batch, FLAGS.channels
  for s in (int(v) for v in FLAGS.sizes):
    x = jax.device_put(rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32))
    y = jax.device_put(rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32))
    cfg = {"size": s, "batch": b, "channels": c, "weights": backbone.weights}
    for name, fn in (("loss", loss), ("loss_and_grad", grad)):
      t = harness.time_rounds(
          lambda fn=fn: jax.block_until_ready(fn(params, x, y)),
          FLAGS.rounds, max(FLAGS.warmup, 1))
      harness.emit(f"{name}/images_per_s", b / t.median, "images/s", cfg,
                   timing=t)
      flops = harness.flops(fn.lower(params, x, y).compile())
      if flops:
        harness.emit(f"{name}/xla_gflop_per_image", flops / b / 1e9,
                     "GFLOP", cfg)


if __name__ == "__main__":
  harness.run(main, "perceptual")
