r"""Benchmark of the full GAN-DL training iteration (no input pipeline).

Measures images/s, sec/kimg, TFLOP/s per device (XLA cost analysis) and peak
device memory of the real jitted phases (G main, D main, and the lazy
regularizers amortized at their intervals) on device-resident random images,
so it also runs where TensorFlow is not installed (e.g. a bare GPU machine).

  python tools/bench_train.py --config configs/demo.py
  python tools/bench_train.py --config configs/gandl_rxrx19a.py:256 \
      --config.batch_size=32 --config.compute_dtype=bfloat16 --iterations 32

Prints one human-readable summary and one JSON line (for tables).
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.train import monitor
from gandl_jax.train.steps import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_ITERS = flags.DEFINE_integer(
    "iterations", 32, "Timed iterations (a multiple of the R1 interval "
    "amortizes every phase exactly).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed iterations after the "
                               "compiling one.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  n_dev = mesh.devices.size
  config_lib.validate(config, n_dev, jax.process_count())
  tr = Trainer(config, mesh)
  b, r, c = tr.batch, config.model.resolution, config.model.img_channels
  state = tr.init_state(config.seed)
  real = jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(1), (b, r, r, c), jnp.float32,
                         -1, 1), sharding.data_sharded(mesh))

  t0 = time.time()
  state, _ = tr.train_step(state, real, 0, 0)          # compiles every phase
  jax.block_until_ready(state)
  compile_s = time.time() - t0
  step = 1
  for _ in range(_WARMUP.value):
    state, _ = tr.train_step(state, real, step, step * b)
    step += 1
  jax.block_until_ready(state)

  # Start the timed window at a multiple of the R1 interval so regularizers
  # appear at their true frequency.
  interval = int(np.lcm(config.loss.r1_interval, config.loss.pl_interval))
  while step % interval:
    state, _ = tr.train_step(state, real, step, step * b)
    step += 1
  jax.block_until_ready(state)
  t0 = time.time()
  for _ in range(_ITERS.value):
    state, metrics = tr.train_step(state, real, step, step * b)
    step += 1
  jax.block_until_ready((state, metrics))
  dt = time.time() - t0

  img_s = _ITERS.value * b / dt
  flops = tr.flops_per_iteration(state, real)
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": n_dev,
      "resolution": r, "batch": b, "compute_dtype": config.compute_dtype,
      "channel_base": config.model.channel_base,
      "img_per_sec": img_s, "sec_per_kimg": 1000.0 / img_s,
      "tflops_per_device": (flops * (img_s / b) / n_dev / 1e12
                            if flops else None),
      "compile_sec": compile_s, "iterations": _ITERS.value,
  }
  result.update(monitor.device_memory())
  print(f"{result['device']} x{n_dev}: {r}x{r}, batch {b}, "
        f"{config.compute_dtype}: {img_s:.1f} img/s, "
        f"{result['sec_per_kimg']:.1f} sec/kimg"
        + (f", {result['tflops_per_device']:.2f} TFLOP/s per device"
           if result["tflops_per_device"] else "")
        + (f", peak {result['mem/peak_gib']:.2f} GiB"
           if "mem/peak_gib" in result else "")
        + f" (compile {compile_s:.0f} s)")
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
