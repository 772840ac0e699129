r"""The ConvAE baseline: training step and bottleneck export.

Times the real jitted training step and the data-parallel encoder of the
export (`data_parallel_bottleneck`) on device-resident random images (no
input pipeline); records images/s, sec/kimg, XLA's FLOPs per image and the
parameter count.

  python -m tools.bench.convae --config configs/convae_rxrx19a.py:demo
  python -m tools.bench.convae --config configs/convae_rxrx19a.py:256 \
      --config.batch_size=8 --config.compute_dtype=float32 --iterations 4
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.baselines.convae import inference as embed_lib
from gandl_jax.model import networks
from gandl_jax.baselines.convae import train as convae_train
from gandl_jax.train import monitor
from tools.bench import harness

harness.define_flags(rounds=1, warmup=1)
_CONFIG = config_flags.DEFINE_config_file("config", None, "ConvAE config.")
_ITERS = flags.DEFINE_integer("iterations", 16, "Training steps per round.")
_EXPORT_BATCHES = flags.DEFINE_integer("export_batches", 8, "Export batches "
                                       "(of config.batch_size) per round.")
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
  run = {"state": tr.init_state(0), "step": 0}
  flops = tr.flops_per_iteration(run["state"], real)

  def steps(n):
    for _ in range(n):
      run["state"], run["m"] = tr.train_step(run["state"], real, run["step"],
                                             0)
      run["step"] += 1
    jax.block_until_ready(run["m"])

  compile_t = harness.time_rounds(lambda: steps(1), 1)
  train_t = harness.time_rounds(lambda: steps(_ITERS.value),
                                flags.FLAGS.rounds, flags.FLAGS.warmup)
  embed = embed_lib.data_parallel_bottleneck(tr.ae, mesh)
  variables = {"params": run["state"].params}
  u8 = jax.device_put(jnp.zeros((b, r, r, c), jnp.uint8),
                      sharding.data_sharded(mesh))

  def export():
    for _ in range(_EXPORT_BATCHES.value):
      out = embed(variables, u8)
    jax.block_until_ready(out)
  export_t = harness.time_rounds(export, flags.FLAGS.rounds,
                                 max(flags.FLAGS.warmup, 1))

  cfg = {"config": harness.config_source(), "resolution": r, "batch": b,
         "bottleneck_dim": int(config.model.bottleneck_dim),
         "compute_dtype": config.compute_dtype,
         "params": networks.count_params(run["state"].params),
         "num_devices": int(mesh.devices.size)}
  img_s = _ITERS.value * b / train_t.median
  harness.emit("train_img_per_s", img_s, "images/s", cfg, timing=train_t)
  harness.emit("sec_per_kimg", 1000.0 / img_s, "s/kimg", cfg, timing=train_t)
  harness.emit("compile_s", compile_t.median, "s", cfg)
  if flops:
    harness.emit("train_gflop_per_img", flops / b / 1e9, "GFLOP", cfg)
  harness.emit("export_img_per_s", _EXPORT_BATCHES.value * b /
               export_t.median, "images/s", cfg, timing=export_t)
  harness.emit("final_l2", float(np.asarray(run["m"]["AE/l2"])), "", cfg)
  for k, v in monitor.device_memory().items():
    harness.emit(k, v, "GiB", cfg)


if __name__ == "__main__":
  harness.run(main, "convae")
