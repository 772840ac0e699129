r"""Per-phase profile of training: compile time and run time of each jitted
phase (G main, G reg, D main, D reg), optionally against another version of
the layers or other XLA compiler options in the same process, in alternating
rounds.

  python tools/bench_phases.py --config configs/demo.py

Compilation is split into Python tracing (`jit(f).trace`), lowering to
StableHLO (`.lower()`) and XLA compilation (`.compile()`: HLO passes and
code generation), each in wall and in CPU seconds of this process (the
phases compile one after another here). Against XLA's default options on
CPU (A/B of `steps.CPU_COMPILER_OPTIONS`, in one run):

  python tools/bench_phases.py --config configs/demo.py \
      --baseline_compiler_options '{}'

Before/after a change to gandl_jax/model/layers.py (A/B in one run):

  git show <commit>:gandl_jax/model/layers.py > /tmp/layers_before.py
  python tools/bench_phases.py --config configs/demo.py \
      --baseline_layers /tmp/layers_before.py

The amortized iteration is g_main + d_main + g_reg / pl_interval +
d_reg / r1_interval (what tools/bench_train.py measures end to end).
Prints one line per version and one JSON line. On a machine shared with
other jobs compare the CPU milliseconds (all of the process's threads; wall
time there measures the contention as much as the code).
"""
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gandl_jax import sharding
from gandl_jax.model import layers, networks
from gandl_jax.train.steps import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BASELINE = flags.DEFINE_string(
    "baseline_layers", None, "A layers.py (e.g. from an earlier commit) to "
    "time against the installed one.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (each runs every phase "
                               "twice per version).")
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
  """Compiles the four phases with `layers_module` behind the networks."""
  networks.layers = layers_module
  try:
    tr = Trainer(config, mesh, compiler_options=compiler_options)
    state = tr.init_state(config.seed)
    b, r, c = tr.batch, config.model.resolution, config.model.img_channels
    real = jax.device_put(
        jax.random.uniform(jax.random.PRNGKey(1), (b, r, r, c), jnp.float32,
                           -1, 1), sharding.data_sharded(mesh))
    beta = jax.device_put(jnp.float32(0.5), sharding.replicated(mesh))
    args = {"g_main": (), "g_reg": (), "d_main": (real, beta),
            "d_reg": (real,)}
    fns, compile_s, lower_s = {}, {}, {}
    stages = {}   # phase -> {trace, lower, xla} -> (wall s, CPU s)
    for ph in PHASES:
      t0, c0 = time.time(), time.process_time()
      traced = tr.compiled(ph, state).trace(state, *args[ph])
      t1, c1 = time.time(), time.process_time()
      lowered = traced.lower()
      t2, c2 = time.time(), time.process_time()
      fns[ph] = lowered.compile()
      t3, c3 = time.time(), time.process_time()
      lower_s[ph] = t2 - t0     # tracing in Python, then StableHLO
      compile_s[ph] = t3 - t0   # lowering + XLA compilation
      stages[ph] = {"trace": (t1 - t0, c1 - c0), "lower": (t2 - t1, c2 - c1),
                    "xla": (t3 - t2, c3 - c2)}
      state, _ = fns[ph](state, *args[ph])
      jax.block_until_ready(state)
  finally:
    networks.layers = layers
  return {"fns": fns, "args": args, "state": state, "compile_s": compile_s,
          "lower_s": lower_s, "stages": stages,
          "compiler_options": tr.compiler_options,
          "ms": {ph: [] for ph in PHASES},
          "cpu_ms": {ph: [] for ph in PHASES}}


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
  for _ in range(_ROUNDS.value):
    for v in versions.values():
      for ph in PHASES:
        for _ in range(2):
          t0, cpu0 = time.time(), time.process_time()
          v["state"], _ = v["fns"][ph](v["state"], *v["args"][ph])
          jax.block_until_ready(v["state"])
          v["ms"][ph].append((time.time() - t0) * 1e3)
          v["cpu_ms"][ph].append((time.process_time() - cpu0) * 1e3)
  l = config.loss
  result = {"device": jax.devices()[0].device_kind,
            "resolution": config.model.resolution,
            "batch": int(config.batch_size),
            "load_average": os.getloadavg()}
  amortized = lambda m: (m["g_main"] + m["d_main"] + m["g_reg"] /
                         l.pl_interval + m["d_reg"] / l.r1_interval)
  for name, v in versions.items():
    med = {ph: float(np.median(v["ms"][ph])) for ph in PHASES}
    cpu = {ph: float(np.median(v["cpu_ms"][ph])) for ph in PHASES}
    it = amortized(med)
    img_s = config.batch_size * 1e3 / it
    print(f"{name}: " + ", ".join(
        f"{ph} {med[ph]:.0f} ms (compile {v['compile_s'][ph]:.1f} s)"
        for ph in PHASES) + f"; amortized iteration {it:.0f} ms = "
          f"{img_s:.1f} img/s; compile {sum(v['compile_s'].values()):.1f} s "
          f"(of which lowering {sum(v['lower_s'].values()):.1f} s); CPU "
          f"(all threads) per amortized iteration {amortized(cpu):.0f} ms: "
          + ", ".join(f"{ph} {cpu[ph]:.0f}" for ph in PHASES))
    total = {k: [sum(st[k][i] for st in v["stages"].values())
                 for i in (0, 1)] for k in ("trace", "lower", "xla")}
    print(f"  {name} compiler options {v['compiler_options']}: " + "; ".join(
        f"{k} {w:.1f} s wall / {c:.1f} s CPU" for k, (w, c) in total.items()))
    result[name] = {"median_ms": med, "median_cpu_ms": cpu,
                    "iteration_cpu_ms": amortized(cpu),
                    "compile_s": v["compile_s"],
                    "lower_s": v["lower_s"], "stages": v["stages"],
                    "compile_stages_total": total,
                    "compiler_options": v["compiler_options"],
                    "iteration_ms": it, "img_per_sec": img_s}
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
