r"""The representation probe's cost relative to training.

Measures, for one config on this machine:
  * training: sec/kimg of the real jitted iteration (device-resident random
    images, regularizers at their intervals; as tools.bench.train);
  * the probe (gandl_jax/train/probe.py) on real shards: the seconds of one
    probe (embedding the probe set with the current D + the two linear SVMs),
    the first call (reading the images, compiling) reported apart;
  * FLOPs (XLA cost analysis): D's forward per probe site against one training
    image, i.e. the embedding part of the overhead on any accelerator;
  * the overhead at `config.probe_every_kimg`: probe seconds /
    (probe_every_kimg x sec/kimg).

  python -m tools.bench.probe --config configs/demo.py \
      --config.data.path '/tmp/gandl-demo/shards/rxrx19a/*.tfrecord'
  python -m tools.bench.probe --config configs/gandl_rxrx19a.py:256 \
      --flops_only --svm_rows 2000 --svm_dim 512

`--flops_only` skips the timings (no data needed) and reports the FLOP
ratio and the SVM fit time on synthetic features of the given size (the fit
runs on the host CPU whatever the accelerator).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from absl import flags
from ml_collections import config_flags

from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.model import embed as embed_lib
from gandl_jax.train import probe
from gandl_jax.train.steps import Trainer
from tools.bench import harness

harness.define_flags(rounds=2, warmup=0)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_ITERS = flags.DEFINE_integer("iterations", 16, "Timed training iterations.")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "Only the FLOP ratio "
                                "and the SVM fit on synthetic features.")
_SVM_ROWS = flags.DEFINE_integer("svm_rows", 0, "Synthetic SVM fit: rows "
                                 "(default config.probe_sites).")
_SVM_DIM = flags.DEFINE_integer("svm_dim", 0, "Synthetic SVM fit: feature "
                                "dimension (default: the probe layer's).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_probe", "Where the "
                               "probe set is recorded.")
flags.mark_flags_as_required(["config"])


def _train_sec_per_kimg(tr, state, real, iters):
  b = tr.batch
  run = {"state": state, "step": 0}

  def steps(n):
    if n <= 0:
      return
    for _ in range(n):
      run["state"], metrics = tr.train_step(run["state"], real, run["step"],
                                            run["step"] * b)
      run["step"] += 1
    jax.block_until_ready((run["state"], metrics))
  steps(1)                                       # compiles every phase
  interval = int(np.lcm(tr.config.loss.r1_interval, tr.config.loss.pl_interval))
  steps(-run["step"] % interval)
  t = harness.time_rounds(lambda: steps(iters), 1)
  return t.median / (iters * b) * 1000.0, run["state"]


def _embed_flops(tr, mesh, layer, batch, r, c, d_params):
  fn = embed_lib.data_parallel_features(tr.D, mesh, layer)
  x = jax.ShapeDtypeStruct((batch, r, r, c), jnp.uint8,
                           sharding=sharding.data_sharded(mesh))
  params = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      {"params": d_params})
  return harness.flops(fn.lower(params, x).compile())


def _synthetic_svm_seconds(rows, dim, seed=0):
  """Both probes on `rows` synthetic sites (8 plates, 2 cell types, Mock /
  Active, a weak class signal in Gaussian features)."""
  rng = np.random.default_rng(seed)
  plate = np.arange(rows) % 8
  meta = pd.DataFrame({
      "experiment": np.where(plate < 4, "HRCE-1", "VERO-1"), "plate": plate,
      "cell_type": np.where(plate < 4, "HRCE", "VERO"),
      "disease_condition": np.where(rng.random(rows) < 0.5, "Mock",
                                    "Active SARS-CoV-2")})
  X = rng.normal(size=(rows, dim)).astype(np.float32)
  X[:, 0] += 0.8 * (meta["disease_condition"] == "Mock").to_numpy()
  X[:, 1] += 0.8 * (meta["cell_type"] == "VERO").to_numpy()
  out = {}
  t = harness.time_rounds(lambda: out.update(s=probe.scores(X, meta)), 1)
  return t.median, out["s"]


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.devices.size, jax.process_count())
  tr = Trainer(config, mesh)
  b, r, c = tr.batch, config.model.resolution, config.model.img_channels
  state = tr.init_state(config.seed)
  real = jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(1), (b, r, r, c), jnp.float32,
                         -1, 1), sharding.data_sharded(mesh))
  layer = config.probe_layer
  emb_flops = _embed_flops(tr, mesh, layer, b, r, c, state.d_params)
  train_flops = tr.flops_per_iteration(state, real)
  ratio = (emb_flops / b) / (train_flops / b) if emb_flops and train_flops \
      else None
  cfg = {"config": harness.config_source(),
         "num_devices": int(mesh.devices.size), "resolution": r,
         "batch": b, "layer": layer,
         "probe_every_kimg": float(config.probe_every_kimg),
         "probe_sites": int(config.probe_sites)}
  result = {"flops_embed_per_site_over_train_per_image": ratio}
  if ratio:
    # Embedding overhead at the interval, FLOPs only (probe_sites sites).
    result["embed_overhead_flops_pct"] = 100.0 * ratio * int(
        config.probe_sites) / (config.probe_every_kimg * 1000.0)
  if _FLOPS_ONLY.value:
    dim = _SVM_DIM.value or int(np.prod(jax.eval_shape(
        lambda: embed_lib.data_parallel_features(tr.D, mesh, layer)(
            {"params": state.d_params},
            jnp.zeros((b, r, r, c), jnp.uint8))).shape[1:]))
    rows = _SVM_ROWS.value or int(config.probe_sites)
    secs, s = _synthetic_svm_seconds(rows, dim)
    result.update({"svm_rows": rows, "svm_dim": dim, "svm_seconds": secs,
                   "svm_scores": {k: s[k] for k in (probe.CONTROL,
                                                    probe.CELL_TYPE)}})
  else:
    spk, state = _train_sec_per_kimg(tr, state, real, _ITERS.value)
    tracker = probe.Tracker(config, _WORKDIR.value, mesh, tr.D, every=1)
    if not tracker.enabled:
      raise SystemExit("the probe is off for this data (see the warning)")
    out = {}
    first_s = harness.time_rounds(
        lambda: out.update(first=tracker.run(state.d_params, 0)), 1).median
    first = out["first"]
    runs = []
    harness.time_rounds(lambda: runs.append(tracker.run(state.d_params, 0)),
                        flags.FLAGS.rounds)
    probe_s = float(np.median([m[probe.SECONDS] for m in runs]))
    embed_s = float(np.median([m[probe.EMBED_SECONDS] for m in runs]))
    interval_s = config.probe_every_kimg * spk
    result.update({
        "sec_per_kimg": spk, "probe_sites_used": int(first[probe.SITES]),
        "probe_first_seconds": first_s, "probe_seconds": probe_s,
        "probe_embed_seconds": embed_s, "probe_fit_seconds": probe_s - embed_s,
        "overhead_pct": 100.0 * probe_s / interval_s,
        "break_even_kimg_at_5pct": probe_s / (0.05 * spk),
        "embed_overhead_flops_pct": (100.0 * ratio * int(first[probe.SITES])
                                     / (config.probe_every_kimg * 1000.0)
                                     if ratio else None),
        "scores": {k: first[k] for k in (probe.CONTROL, probe.CELL_TYPE)}})
  for k, v in result.items():
    harness.emit(k, v, _UNITS.get(k, ""), cfg)


_UNITS = {"flops_embed_per_site_over_train_per_image": "ratio",
          "embed_overhead_flops_pct": "%", "svm_seconds": "s",
          "sec_per_kimg": "s/kimg", "probe_first_seconds": "s",
          "probe_seconds": "s", "probe_embed_seconds": "s",
          "probe_fit_seconds": "s", "overhead_pct": "%",
          "break_even_kimg_at_5pct": "kimg"}


if __name__ == "__main__":
  harness.run(main, "probe")
