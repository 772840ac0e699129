r"""Does D keep the biology it learns? Off / ADA / contrastive D, side by side.

For every variant (`--variants`: off, ada, contrastive, both) and training
seed, one run of the demo-sized GAN on one synthetic design with a checkpoint
every `--eval_every_kimg` (all kept) and the representation probe every
`--probe_every_kimg`; every checkpoint's D (and D at initialization, once per
seed) is exported at each of `--layers` and scored by the gandl-evaluate
protocol of `training_benefit.py` (sets other than `fc` are named
'off [b8]'), and the probe's curve is read from each run's metrics.jsonl.
Writes

  WORKDIR/results.jsonl   one line per (variant, seed, kimg, source):
                          source 'evaluate' (training_benefit's metrics) or
                          'probe' (the probe/* metrics logged at that kimg)
  WORKDIR/summary.md      the tables (means over seeds and differences
                          paired by seed, with 95% t intervals; the probe's
                          best and last value per run), with the command,
                          machine, load and compute time

The variants are config overrides (`VARIANTS`); `--set KEY=VALUE` adds more
to every variant. Every stage is resumable (WORKDIR/stages/*.done; a
training interrupted mid-way resumes from its last checkpoint): rerun the
same command.

  python -m tools.experiments.forgetting --workdir runs/forget-hard \
      --difficulty hard --seeds 0,1,2 --total_kimg 60
"""
from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List

from absl import app, flags, logging

from tools.experiments import protocol

# Config overrides of each variant (docs/training.md: ADA, contrastive D).
VARIANTS = {
    "off": {},
    "ada": {"augment": "ada"},
    "contrastive": {"contrastive": True},
    "both": {"augment": "ada", "contrastive": True},
}

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage writes.",
                               required=True)
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS),
                              f"Variants to run, of {list(VARIANTS)}.")
_DIFFICULTY = flags.DEFINE_string("difficulty", "hard", "Synthetic design "
                                  "(gandl-synth --difficulty).")
_SIZE = flags.DEFINE_integer("size", 64, "Edge of the synthetic site images.")
_RESOLUTION = flags.DEFINE_integer("resolution", 32, "Training resolution.")
_DATA_SEED = flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic data.")
_PLATES = flags.DEFINE_integer("plates", None, "Plates per experiment "
                               "(default: gandl-synth's).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_TOTAL_KIMG = flags.DEFINE_float("total_kimg", 60.0, "Training length.")
_EVAL_EVERY = flags.DEFINE_float("eval_every_kimg", 10.0, "A checkpoint "
                                 "exported and evaluated every this many kimg.")
_PROBE_EVERY = flags.DEFINE_float("probe_every_kimg", 5.0, "The probe every "
                                  "this many kimg (0: off).")
_LAYERS = flags.DEFINE_list("layers", ["fc"], "D layers exported and "
                            "scored at every checkpoint: fc, conv or b<res> "
                            "(the probe scores every layer anyway).")
_BASELINES = flags.DEFINE_bool("baselines", True, "Evaluate the classical "
                               "features, random DenseNet-121 and ConvAE too.")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config overrides KEY=VALUE for every variant.")


def run_config(variant: str, seed: int, data: str):
  """The demo config with the variant's and --set's overrides."""
  # pylint: disable=import-outside-toplevel
  from gandl_jax.cli import demo
  config = demo.demo_config()
  config.seed = seed
  config.model.resolution = _RESOLUTION.value
  config.total_kimg = _TOTAL_KIMG.value
  config.checkpoint_every_kimg = _EVAL_EVERY.value
  config.keep_checkpoints = 1000
  config.image_grid_every_kimg = _TOTAL_KIMG.value
  config.probe_every_kimg = _PROBE_EVERY.value
  config.data.path = data
  items = [f"{k}={v}" for k, v in VARIANTS[variant].items()]
  for item in items + list(_OVERRIDES.value):
    key, _, value = item.partition("=")
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = protocol.parse_value(value)
  return config


def probe_rows(train_dir: str, variant: str, seed: int
               ) -> List[Dict[str, Any]]:
  """The run's probe curve (`train.probe.read_curve`) as result rows."""
  from gandl_jax.train import probe  # pylint: disable=import-outside-toplevel
  return [dict(r, set=variant, seed=seed, source="probe")
          for r in probe.read_curve(train_dir)]


def main(argv):
  del argv
  # pylint: disable=import-outside-toplevel
  from gandl_jax import checkpoint, sharding
  from gandl_jax import io as gio
  from gandl_jax.cli import demo
  from gandl_jax.evaluate import pipeline as evaluate_lib
  from gandl_jax.inference import api, export
  from gandl_jax.model import networks

  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; expected some of "
                         f"{list(VARIANTS)}")
  layers = _LAYERS.value
  for layer in layers:
    try:
      networks.check_embedding_layer(layer, _RESOLUTION.value)
    except ValueError as e:
      raise app.UsageError(f"--layers: {e}") from None
  logging.set_verbosity(logging.INFO)
  t0 = time.time()
  workdir = os.path.abspath(_WORKDIR.value)
  stages = demo.Stages(workdir, logging.info)
  mesh = sharding.make_mesh()
  seeds = [int(s) for s in _SEEDS.value]
  emb_dir = os.path.join(workdir, "embeddings")
  roots, shards, data, metadata, truth = protocol.prepare_data(
      stages, workdir, _SIZE.value, _DATA_SEED.value, _PLATES.value,
      _DIFFICULTY.value, _RESOLUTION.value)

  def evaluate_set(name: str, tag: str) -> Dict[str, Any]:
    metrics = evaluate_lib.evaluate(
        [evaluate_lib.EmbeddingSet(
            name, os.path.join(emb_dir, f"{tag}_rxrx19a.parquet"),
            os.path.join(emb_dir, f"{tag}_rxrx1.parquet"),
            metadata=metadata["rxrx19a"], rxrx1_metadata=metadata["rxrx1"])],
        os.path.join(workdir, "eval", tag), truth=truth,
        compounds=protocol.NAMED_COMPOUNDS, log=logging.info)
    return protocol.metric_row(metrics, name)

  def evaluate_layers(ckpt, step, tag, name, **row):
    """The stages exporting and scoring `ckpt` at each of --layers: result
    rows (set 'NAME' for fc, 'NAME [LAYER]' for the others)."""
    out = []
    model = functools.cache(lambda: api.load(ckpt, step))  # once, if needed
    for layer in layers:
      ltag = tag if layer == "fc" else f"{tag}-{layer}"
      lname = protocol.layer_set(name, layer)

      def run(ltag=ltag, lname=lname, layer=layer):
        for d in data:
          export.export_model(model(), data[d],
                              os.path.join(emb_dir, f"{ltag}_{d}.parquet"),
                              layer=layer, batch=64, checkpoint=ckpt,
                              mesh=mesh)
        return dict(evaluate_set(lname, ltag), step=model().step, set=lname,
                    layer=layer, source="evaluate", **row)
      out.append(stages.run(f"eval-{ltag}", run))
    return out

  rows: List[Dict[str, Any]] = []
  if _BASELINES.value:
    for name, tag in demo.baseline_sets(
        stages, data, emb_dir, mesh=mesh,
        convae_kimg=min(_TOTAL_KIMG.value, 10.0)):
      rows.append(stages.run(f"eval-{tag}", lambda name=name, tag=tag: dict(
          evaluate_set(name, tag), set=name, seed=-1, kimg=0.0,
          source="evaluate")))

  for seed in seeds:
    init_dir = os.path.join(workdir, f"init-seed{seed}")
    config = run_config("off", seed, data["rxrx19a"])
    stages.run(f"init-seed{seed}", lambda config=config: {
        "checkpoint": demo.save_initial_model(config, mesh, init_dir)})
    rows += evaluate_layers(init_dir, None, f"init-seed{seed}", "untrained D",
                            seed=seed, kimg=0.0)
    for variant in _VARIANTS.value:
      config = run_config(variant, seed, data["rxrx19a"])
      train_dir = os.path.join(workdir, f"train-{variant}-seed{seed}")
      # A killed training resumes from its checkpoint on the next call.
      protocol.train_stage(stages, f"train-{variant}-seed{seed}", config,
                           train_dir, mesh)
      rows += probe_rows(train_dir, variant, seed)
      # The checkpoints every --eval_every_kimg and the last; not the ones
      # the probe kept for a new best score (their steps differ by seed).
      every = max(1, round(_EVAL_EVERY.value * 1000 / config.batch_size))
      steps = checkpoint.list_steps(train_dir)
      for step in [s for s in steps if s % every == 0 or s == max(steps)]:
        kimg = step * config.batch_size / 1000.0
        rows += evaluate_layers(train_dir, step,
                                f"{variant}-seed{seed}-kimg{kimg:g}",
                                variant, seed=seed, kimg=kimg)

  gio.write_text(os.path.join(workdir, "results.jsonl"),
                 "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
  elapsed = protocol.stage_seconds(workdir)
  text = "\n".join([
      f"# D forgetting: {_DIFFICULTY.value} synthetic design",
      "",
      "Command: `python -m tools.experiments.forgetting "
      + " ".join(sys.argv[1:]) + "`",
      f"Variants {_VARIANTS.value} ({VARIANTS}); seeds {seeds}, data "
      f"{_DATA_SEED.value}; {_TOTAL_KIMG.value:g} kimg, evaluated every "
      f"{_EVAL_EVERY.value:g}, probed every {_PROBE_EVERY.value:g}; compute "
      f"{elapsed / 60:.1f} min summed over the stages (this call "
      f"{(time.time() - t0) / 60:.1f} min); machine: {platform.machine()} "
      f"{os.cpu_count()} CPU(s), {platform.platform()}; load average at the "
      f"end {os.getloadavg()[0]:.1f}.",
      "",
      protocol.forgetting_sections(rows, workdir)])
  gio.write_text(os.path.join(workdir, "summary.md"), text)
  print(text)


if __name__ == "__main__":
  app.run(main)
