r"""Benchmark of the full GAN-DL training iteration (no input pipeline).

Measures images/s, sec/kimg, TFLOP/s per device (XLA cost analysis) and peak
device memory of the real jitted phases (G main, D main, and the lazy
regularizers amortized at their intervals) on device-resident random images,
so it also runs where TensorFlow is not installed (e.g. a bare GPU machine).

  python tools/bench_train.py --config configs/demo.py
  python tools/bench_train.py --config configs/gandl_rxrx19a.py:256 \
      --config.batch_size=32 --config.compute_dtype=bfloat16 --iterations 32

Side by side with stylegan2-ada-pytorch (a checkout of
https://github.com/NVlabs/stylegan2-ada-pytorch and torch, `pip install -e
'.[import]'`): its own networks, StyleGAN2Loss and phase schedule at the same
configuration run in a subprocess (tools/sg2ada_reference.py); timed rounds of
--iterations alternate ours / reference (--rounds each), so background load
hits both sides alike:

  python tools/bench_train.py --config configs/demo.py \
      --reference /path/to/stylegan2-ada-pytorch --rounds 2

Prints one human-readable summary and one JSON line (for tables).
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.train import loop, monitor
from gandl_jax.train.steps import Trainer

import sg2ada_reference  # tools/, next to this script

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_ITERS = flags.DEFINE_integer(
    "iterations", 32, "Timed iterations (a multiple of the R1 interval "
    "amortizes every phase exactly).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed iterations after the "
                               "compiling one.")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Checkout of stylegan2-ada-pytorch: also time it at "
    "the same configuration, in alternating rounds.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per side with "
                               "--reference (each of --iterations).")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None, "Use JAX's persistent compilation cache "
    "here (as gandl-train does by default); off by default, so that "
    "compile_sec is a cold compilation. Run twice with the same directory "
    "for the first- and second-run compile times.")
_OPTIONS = flags.DEFINE_string(
    "compiler_options", None, "JSON dict of XLA compiler options for the "
    "phases ('{}': XLA's defaults); default: the Trainer's "
    "(steps.default_compiler_options).")
flags.mark_flags_as_required(["config"])


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def main(argv):
  del argv
  config = _CONFIG.value
  cache_dir = loop.use_compilation_cache(_CACHE.value)
  mesh = sharding.make_mesh()
  n_dev = mesh.devices.size
  config_lib.validate(config, n_dev, jax.process_count())
  tr = Trainer(config, mesh, compiler_options=(
      None if _OPTIONS.value is None else json.loads(_OPTIONS.value)))
  b, r, c = tr.batch, config.model.resolution, config.model.img_channels
  t0 = time.time()
  state = jax.block_until_ready(tr.init_state(config.seed))
  init_s = time.time() - t0   # G and D init (jitted: compiled too)
  real = jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(1), (b, r, r, c), jnp.float32,
                         -1, 1), sharding.data_sharded(mesh))

  # compile_sec: precompile (all phases, concurrently, as gandl-train) and
  # the first iteration; compile_cpu_sec: the CPU seconds this process spent
  # on them (the steadier figure on a shared machine).
  t0, c0 = time.time(), _cpu_seconds()
  tr.precompile(state, real)
  state, _ = tr.train_step(state, real, 0, 0)
  jax.block_until_ready(state)
  compile_s, compile_cpu_s = time.time() - t0, _cpu_seconds() - c0
  step = 1
  for _ in range(_WARMUP.value):
    state, _ = tr.train_step(state, real, step, step * b)
    step += 1
  jax.block_until_ready(state)

  # Start the timed window at a multiple of the R1 interval so regularizers
  # appear at their true frequency (rounds of a multiple of it stay aligned).
  interval = int(np.lcm(config.loss.r1_interval, config.loss.pl_interval))
  while step % interval:
    state, _ = tr.train_step(state, real, step, step * b)
    step += 1
  jax.block_until_ready(state)

  def our_round(state, step):
    t0, cpu0 = time.time(), time.process_time()
    for _ in range(_ITERS.value):
      state, metrics = tr.train_step(state, real, step, step * b)
      step += 1
    jax.block_until_ready((state, metrics))
    return state, step, time.time() - t0, time.process_time() - cpu0

  ref, ours_s, ref_s, ours_cpu, ref_cpu = None, [], [], [], []
  if _REFERENCE.value:
    ref = sg2ada_reference.Worker(
        _REFERENCE.value, sg2ada_reference.spec_from_config(config, "train"))
  try:
    for _ in range(_ROUNDS.value if ref else 1):
      state, step, dt, cpu = our_round(state, step)
      ours_s.append(dt)
      ours_cpu.append(cpu)
      if ref:
        seconds, _, cpu = ref.run("train", _ITERS.value)
        ref_s.append(seconds)
        ref_cpu.append(cpu)
  finally:
    if ref:
      ref.close()
  dt = sum(ours_s) / len(ours_s)
  # CPU seconds per 1,000 images (all threads of the process): on a machine
  # shared with other jobs, wall time measures the contention as much as the
  # code; CPU time is the figure to compare there (on a quiet machine, wall).
  cpu_per_kimg = lambda cpus: 1000.0 * sum(cpus) / (_ITERS.value * b *
                                                     len(cpus))

  img_s = _ITERS.value * b / dt
  flops = tr.flops_per_iteration(state, real)
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": n_dev,
      "resolution": r, "batch": b, "compute_dtype": config.compute_dtype,
      "channel_base": config.model.channel_base,
      "img_per_sec": img_s, "sec_per_kimg": 1000.0 / img_s,
      "tflops_per_device": (flops * (img_s / b) / n_dev / 1e12
                            if flops else None),
      "compile_sec": compile_s, "compile_cpu_sec": compile_cpu_s,
      "init_sec": init_s,
      "compile_phases": tr.compile_stats,
      "compiler_options": tr.compiler_options, "compilation_cache": cache_dir,
      "load_average": os.getloadavg(), "iterations": _ITERS.value,
      "cpu_sec_per_kimg": cpu_per_kimg(ours_cpu),
  }
  if ref:
    ref_img_s = _ITERS.value * b * len(ref_s) / sum(ref_s)
    result.update({
        "rounds": len(ours_s),
        "img_per_sec_rounds": [_ITERS.value * b / t for t in ours_s],
        "reference_img_per_sec": ref_img_s,
        "reference_img_per_sec_rounds": [_ITERS.value * b / t for t in ref_s],
        "speedup_vs_reference": img_s / ref_img_s,
        "reference_cpu_sec_per_kimg": cpu_per_kimg(ref_cpu),
        "cpu_speedup_vs_reference": cpu_per_kimg(ref_cpu) /
                                    cpu_per_kimg(ours_cpu),
        "reference": ref.info})
  result.update(monitor.device_memory())
  print(f"{result['device']} x{n_dev}: {r}x{r}, batch {b}, "
        f"{config.compute_dtype}: {img_s:.1f} img/s, "
        f"{result['sec_per_kimg']:.1f} sec/kimg"
        + (f", {result['tflops_per_device']:.2f} TFLOP/s per device"
           if result["tflops_per_device"] else "")
        + (f", peak {result['mem/peak_gib']:.2f} GiB"
           if "mem/peak_gib" in result else "")
        + f" (compile {compile_s:.1f} s, {compile_cpu_s:.1f} CPU s; "
        + ", ".join(f"{k}: lower {v['lower_s']:.1f} s, XLA {v['xla_s']:.1f} s"
                    for k, v in tr.compile_stats.items())
        + f"; before it, init_state {init_s:.1f} s"
        + f"; load average {os.getloadavg()[0]:.1f})")
  if ref:
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
    print(f"stylegan2-ada-pytorch (torch {ref.info['torch']}, "
          f"{ref.info['device']}, {ref.info['threads']} threads, custom ops "
          f"{ref.info['custom_ops']}): {ref_img_s:.1f} img/s; rounds "
          f"alternating ours [{fmt(result['img_per_sec_rounds'])}] / reference "
          f"[{fmt(result['reference_img_per_sec_rounds'])}] img/s; "
          f"ours / reference = {result['speedup_vs_reference']:.2f}x; CPU "
          f"seconds per kimg ours {result['cpu_sec_per_kimg']:.0f}, "
          f"reference {result['reference_cpu_sec_per_kimg']:.0f} "
          f"({result['cpu_speedup_vs_reference']:.2f}x; load average "
          f"{result['load_average'][0]:.1f})")
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
