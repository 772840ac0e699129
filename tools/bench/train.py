r"""The full GAN-DL training iteration (no input pipeline).

Times the real jitted phases (G main, D main, the lazy regularizers at their
intervals) on device-resident random images, so it also runs where
TensorFlow is not installed. Records images/s, sec/kimg, CPU seconds per
kimg, TFLOP/s per device (XLA cost analysis), compile and init seconds and
peak device memory.

  python -m tools.bench.train --config configs/demo.py
  python -m tools.bench.train --config configs/gandl_rxrx19a.py:256 \
      --config.batch_size=32 --iterations 32

With --reference (a checkout of stylegan2-ada-pytorch and torch, `pip
install -e '.[import]'`) the reference's own networks, StyleGAN2Loss and
phase schedule run at the same configuration in a subprocess
(sg2ada_reference.py). Our figures are emitted first; then rounds of
--iterations alternate ours / reference and the ratio is taken from those
rounds. The reference runs with torch's defaults (--reference_omp_wait_policy
to change; recorded with the ratio) and TF32 off, and its records name the
implementation its custom ops really took ('cuda', or 'ref' if a build
failed); --reference_timeout stops a hung reference:

  python -m tools.bench.train --config configs/demo.py \
      --reference /path/to/stylegan2-ada-pytorch --rounds 2
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.train import loop, monitor
from gandl_jax.train.steps import Trainer
from tools.bench import harness, sg2ada_reference

harness.define_flags(rounds=2, warmup=1)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_ITERS = flags.DEFINE_integer(
    "iterations", 32, "Iterations per round (a multiple of the R1 interval "
    "amortizes every phase exactly).")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Checkout of stylegan2-ada-pytorch: also time it at "
    "the same configuration, in alternating rounds.")
sg2ada_reference.define_flags()
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None, "Use JAX's persistent compilation cache "
    "here (as gandl-train does by default); off by default, so that the "
    "compile time is a cold compilation.")
_OPTIONS = flags.DEFINE_string(
    "compiler_options", None, "JSON dict of XLA compiler options for the "
    "phases ('{}': XLA's defaults); default: the Trainer's.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  loop.use_compilation_cache(_CACHE.value)
  mesh = sharding.make_mesh()
  n_dev = mesh.devices.size
  config_lib.validate(config, n_dev, jax.process_count())
  tr = Trainer(config, mesh, compiler_options=(
      None if _OPTIONS.value is None else json.loads(_OPTIONS.value)))
  b, r, c = tr.batch, config.model.resolution, config.model.img_channels
  run = {"step": 0}
  init = harness.time_rounds(   # G and D init (jitted: compiled too)
      lambda: run.update(state=jax.block_until_ready(
          tr.init_state(config.seed))), 1)
  real = jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(1), (b, r, r, c), jnp.float32,
                         -1, 1), sharding.data_sharded(mesh))

  def steps(n):
    if n <= 0:
      return
    for _ in range(n):
      run["state"], metrics = tr.train_step(run["state"], real, run["step"],
                                            run["step"] * b)
      run["step"] += 1
    jax.block_until_ready((run["state"], metrics))

  # Compilation: every phase (as gandl-train: concurrently), then the first
  # iteration.
  compile_t = harness.time_rounds(
      lambda: (tr.precompile(run["state"], real), steps(1)), 1)
  # Timed rounds start at a multiple of both regularization intervals.
  interval = int(np.lcm(config.loss.r1_interval, config.loss.pl_interval))
  steps(-run["step"] % interval)

  ours_round = lambda: steps(_ITERS.value)
  times = harness.alternate({"ours": ours_round}, flags.FLAGS.rounds,
                            flags.FLAGS.warmup)
  images = _ITERS.value * b
  cfg = {"config": harness.config_source(), "resolution": r, "batch": b,
         "num_bf16_res": config.num_bf16_res,
         "channel_base": config.model.channel_base, "num_devices": n_dev,
         "iterations": _ITERS.value, "compiler_options": tr.compiler_options}
  # Our figures first: a reference that fails later cannot lose them.
  ours = times["ours"]
  img_s = images / ours.median
  harness.emit("img_per_sec", img_s, "images/s", cfg, timing=ours)
  harness.emit("sec_per_kimg", 1000.0 / img_s, "s/kimg", cfg, timing=ours)
  harness.emit("cpu_sec_per_kimg", 1000.0 * ours.cpu_median / images,
               "CPU s/kimg", cfg, timing=ours)
  flops = tr.flops_per_iteration(run["state"], real)
  if flops:
    harness.emit("tflops_per_device", flops * (img_s / b) / n_dev / 1e12,
                 "TFLOP/s", cfg, timing=ours)
  harness.emit("compile_sec", compile_t.median, "s", cfg)
  harness.emit("compile_cpu_sec", compile_t.cpu_median, "CPU s", cfg)
  for phase, st in tr.compile_stats.items():
    for stage, seconds in st.items():   # lower_s, xla_s
      harness.emit(f"compile/{phase}/{stage}", seconds, "s", cfg)
  harness.emit("init_sec", init.median, "s", cfg)
  for k, v in monitor.device_memory().items():
    harness.emit(k, v, "GiB", cfg)
  harness.say(f"{r}x{r}, batch {b}, num_bf16_res {config.num_bf16_res} on {n_dev} "
              f"device(s): {img_s:.1f} img/s (rounds "
              f"{[round(images / t, 1) for t in ours.seconds]}), compile "
              f"{compile_t.median:.1f} s")
  if _REFERENCE.value:
    _side_by_side(config, cfg, ours_round, images)


def _side_by_side(config, cfg, ours_round, images):
  """The reference at the same configuration, in rounds alternating with
  ours (the ratio uses these rounds of ours, under the same load)."""
  ref = sg2ada_reference.from_flags(
      _REFERENCE.value, sg2ada_reference.spec_from_config(config, "train"))
  try:
    times = harness.alternate(
        {"ours": ours_round,
         "reference": harness.worker_side(ref, "train", _ITERS.value)},
        flags.FLAGS.rounds, flags.FLAGS.warmup)
  finally:
    ref.close()
  ours, rt = times["ours"], times["reference"]
  img_s, ref_img_s = images / ours.median, images / rt.median
  rcfg = dict(cfg, reference=ref.info)
  harness.emit("reference_img_per_sec", ref_img_s, "images/s", rcfg,
               timing=rt)
  harness.emit("reference_cpu_sec_per_kimg",
               1000.0 * rt.cpu_median / images, "CPU s/kimg", rcfg,
               timing=rt)
  harness.emit("speedup_vs_reference", img_s / ref_img_s, "x",
               dict(rcfg, ours_img_per_sec=img_s), timing=ours)
  harness.say(f"stylegan2-ada-pytorch ({ref.info.get('device')}, custom ops "
              f"{ref.info.get('custom_ops')}, OMP_WAIT_POLICY "
              f"{ref.info.get('omp_wait_policy')}): {ref_img_s:.1f} img/s; "
              f"ours alongside {img_s:.1f}; ours / reference = "
              f"{img_s / ref_img_s:.2f}x")


if __name__ == "__main__":
  harness.run(main, "train")
