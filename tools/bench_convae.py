r"""Benchmark of the ConvAE baseline: training step and bottleneck export.

Times the real jitted training step (baselines/convae/train.py) and the
data-parallel encoder of the export (baselines/convae/inference.py
`data_parallel_bottleneck`) on
device-resident random images (no input pipeline), and reports images/s,
sec/kimg, XLA's FLOP count per image and the parameter count:

  python tools/bench_convae.py --config configs/convae_rxrx19a.py:demo
  python tools/bench_convae.py --config configs/convae_rxrx19a.py:256 \
      --config.batch_size=8 --config.compute_dtype=float32 --iterations 4

Prints one human-readable summary and one JSON line (for tables).
"""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.baselines.convae import inference as embed_lib
from gandl_jax.baselines.convae import train as convae_train
from gandl_jax.model import networks
from gandl_jax.train import monitor

_CONFIG = config_flags.DEFINE_config_file("config", None, "ConvAE config.")
_ITERS = flags.DEFINE_integer("iterations", 16, "Timed training steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the "
                               "compiling one.")
_EXPORT_BATCHES = flags.DEFINE_integer("export_batches", 8, "Timed export "
                                       "batches (of config.batch_size).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.devices.size, jax.process_count())
  tr = convae_train.ConvAETrainer(config, mesh)
  b, r, c = tr.batch, int(config.model.resolution), int(
      config.model.img_channels)
  real = jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(0), (b, r, r, c), minval=-1,
                         maxval=1), sharding.data_sharded(mesh))
  state = tr.init_state(0)
  params = networks.count_params(state.params)
  flops = tr.flops_per_iteration(state, real)
  t0 = time.perf_counter()
  state, m = tr.train_step(state, real, 0, 0)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for i in range(_WARMUP.value):
    state, m = tr.train_step(state, real, i + 1, 0)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(_ITERS.value):
    state, m = tr.train_step(state, real, i, 0)
  jax.block_until_ready(m)
  train_s = time.perf_counter() - t0
  img_s = _ITERS.value * b / train_s

  embed = embed_lib.data_parallel_bottleneck(tr.ae, mesh)
  variables = {"params": state.params}
  u8 = jax.device_put(jnp.zeros((b, r, r, c), jnp.uint8),
                      sharding.data_sharded(mesh))
  jax.block_until_ready(embed(variables, u8))
  t0 = time.perf_counter()
  for _ in range(_EXPORT_BATCHES.value):
    out = embed(variables, u8)
  jax.block_until_ready(out)
  export_s = time.perf_counter() - t0
  export_img_s = _EXPORT_BATCHES.value * b / export_s

  result = {
      "resolution": r, "batch": b, "bottleneck_dim":
      int(config.model.bottleneck_dim), "compute_dtype": config.compute_dtype,
      "params": params, "devices": int(mesh.devices.size),
      "device_kind": jax.devices()[0].device_kind,
      "compile_s": round(compile_s, 1), "train_img_per_s": round(img_s, 2),
      "sec_per_kimg": round(1000.0 / img_s, 1),
      "train_gflop_per_img": round(flops / b / 1e9, 3) if flops else None,
      "export_img_per_s": round(export_img_s, 2),
      "final_l2": float(np.asarray(m["AE/l2"])),
      **monitor.device_memory()}
  print(f"ConvAE {r}x{r}x{c}, bottleneck {result['bottleneck_dim']}, "
        f"{params:,} parameters, batch {b} on {result['devices']} "
        f"{result['device_kind']}: training {img_s:.2f} img/s "
        f"({1000.0 / img_s:.1f} s/kimg, compile {compile_s:.1f} s, "
        f"{result['train_gflop_per_img']} GFLOP/img); export "
        f"{export_img_s:.2f} img/s")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
