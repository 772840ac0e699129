r"""Per-phase profile of training: compile and run time of each jitted phase
(G main, G reg, D main, D reg), optionally against another version of the
layers or other XLA compiler options in the same process, in alternating
rounds.

  python -m tools.bench.phases --config configs/demo.py

Compilation is split into Python tracing (`jit(f).trace`), lowering to
StableHLO (`.lower()`) and XLA compilation (`.compile()`), each in wall and
CPU seconds (the phases compile one after another here). Against XLA's
default options on CPU (`steps.CPU_COMPILER_OPTIONS` A/B, in one run):

  python -m tools.bench.phases --config configs/demo.py \
      --baseline_compiler_options '{}'

Before/after a change to gandl_jax/model/layers.py (A/B in one run):

  git show <commit>:gandl_jax/model/layers.py > /tmp/layers_before.py
  python -m tools.bench.phases --config configs/demo.py \
      --baseline_layers /tmp/layers_before.py

The amortized iteration is g_main + d_main + g_reg / pl_interval +
d_reg / r1_interval (what tools.bench.train measures end to end). On a
machine shared with other jobs compare the CPU milliseconds.
"""
import importlib.util
import json
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from gandl_jax import sharding
from gandl_jax.model import layers, networks
from gandl_jax.train.steps import Trainer
from tools.bench import harness

harness.define_flags(rounds=6, warmup=0)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BASELINE = flags.DEFINE_string(
    "baseline_layers", None, "A layers.py (e.g. from an earlier commit) to "
    "time against the installed one.")
_BASELINE_OPTIONS = flags.DEFINE_string(
    "baseline_compiler_options", None, "JSON dict of XLA compiler options "
    "('{}': XLA's defaults) to time against the Trainer's default ones.")
flags.mark_flags_as_required(["config"])
PHASES = ("g_main", "g_reg", "d_main", "d_reg")


def _load_module(path):
  spec = importlib.util.spec_from_file_location("layers_baseline", path)
  module = importlib.util.module_from_spec(spec)
  # Registered first: dataclasses (Flax modules) look their module up there.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _setup(config, mesh, layers_module, compiler_options=None):
  """The four phases compiled with `layers_module` behind the networks:
  {"run": {phase: callable running it once}, "stages": {phase: {trace,
  lower, xla: (wall s, CPU s)}}, "compiler_options": ...}."""
  networks.layers = layers_module
  try:
    tr = Trainer(config, mesh, compiler_options=compiler_options)
    v = {"state": tr.init_state(config.seed), "stages": {}, "run": {},
         "compiler_options": tr.compiler_options}
    b, r, c = tr.batch, config.model.resolution, config.model.img_channels
    real = jax.device_put(
        jax.random.uniform(jax.random.PRNGKey(1), (b, r, r, c), jnp.float32,
                           -1, 1), sharding.data_sharded(mesh))
    beta = jax.device_put(jnp.float32(0.5), sharding.replicated(mesh))
    args = {"g_main": (), "g_reg": (), "d_main": (real, beta),
            "d_reg": (real,)}
    for ph in PHASES:
      clock = lambda: (time.perf_counter(), time.process_time())
      t0 = clock()
      traced = tr.compiled(ph, v["state"]).trace(v["state"], *args[ph])
      t1 = clock()
      lowered = traced.lower()
      t2 = clock()
      fn = lowered.compile()
      t3 = clock()
      v["stages"][ph] = {k: (end[0] - start[0], end[1] - start[1])
                         for k, start, end in (("trace", t0, t1),
                                               ("lower", t1, t2),
                                               ("xla", t2, t3))}

      def once(fn=fn, a=args[ph]):
        v["state"], _ = fn(v["state"], *a)
        jax.block_until_ready(v["state"])
      once()
      v["run"][ph] = once
  finally:
    networks.layers = layers
  return v


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  versions = {}
  if _BASELINE.value:
    versions["baseline"] = _setup(config, mesh, _load_module(_BASELINE.value))
  if _BASELINE_OPTIONS.value is not None:
    versions["baseline_options"] = _setup(
        config, mesh, layers, json.loads(_BASELINE_OPTIONS.value))
  versions["current"] = _setup(config, mesh, layers)
  times = harness.alternate(
      {(name, ph): v["run"][ph] for name, v in versions.items()
       for ph in PHASES}, flags.FLAGS.rounds, flags.FLAGS.warmup)
  l = config.loss
  amortized = lambda m: (m["g_main"] + m["d_main"] + m["g_reg"] /
                         l.pl_interval + m["d_reg"] / l.r1_interval)
  for name, v in versions.items():
    cfg = {"config": harness.config_source(), "version": name,
           "resolution": config.model.resolution,
           "batch": int(config.batch_size),
           "compiler_options": v["compiler_options"],
           "baseline_layers": _BASELINE.value if name == "baseline" else None}
    ms = {ph: 1e3 * times[(name, ph)].median for ph in PHASES}
    cpu_ms = {ph: 1e3 * times[(name, ph)].cpu_median for ph in PHASES}
    for ph in PHASES:
      harness.emit(f"{ph}/ms", ms[ph], "ms", cfg, timing=times[(name, ph)])
      harness.emit(f"{ph}/cpu_ms", cpu_ms[ph], "CPU ms", cfg,
                   timing=times[(name, ph)])
      for stage, (wall, cpu) in v["stages"][ph].items():
        harness.emit(f"{ph}/compile/{stage}", wall, "s", cfg)
        harness.emit(f"{ph}/compile/{stage}_cpu", cpu, "CPU s", cfg)
    it = amortized(ms)
    harness.emit("iteration_ms", it, "ms", cfg)
    harness.emit("iteration_cpu_ms", amortized(cpu_ms), "CPU ms", cfg)
    harness.emit("img_per_sec", config.batch_size * 1e3 / it, "images/s", cfg)
    harness.say(f"{name}: " + ", ".join(f"{ph} {ms[ph]:.0f} ms"
                                        for ph in PHASES)
                + f"; amortized iteration {it:.0f} ms, CPU "
                f"{amortized(cpu_ms):.0f} ms; compile "
                f"{sum(s['xla'][0] for s in v['stages'].values()):.1f} s XLA")


if __name__ == "__main__":
  harness.run(main, "phases")
