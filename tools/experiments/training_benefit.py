r"""Does training the GAN give better embeddings than not training it?

Runs the "what training buys" experiment on the synthetic data:
for every training seed, one run of the demo-sized GAN with a checkpoint at
each budget; every checkpoint's discriminator, the same discriminator at
initialization, the classical (CellProfiler-style) features and the
concatenated DenseNet-121 (random init unless --densenet_weights) are exported
and evaluated with the same protocol (control and cell type on the random
and plate splits, dose-response EC50 rank correlation with the planted
EC50s, hits recovered, RxRx1 zero-shot). Writes

  WORKDIR/results.jsonl      one line per (set, seed, kimg) with every metric
  WORKDIR/summary.md         the table (mean and std over seeds)
  WORKDIR/<metric>.png       metric against kimg, one line per set

Every stage is resumable (WORKDIR/stages/*.done); rerun the same command.

  python -m tools.experiments.training_benefit --workdir runs/exp-hard \
      --difficulty hard --budgets 1,2,4,8 --seeds 0,1,2
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Dict, List

from absl import app, flags, logging

# The evaluation protocol's metrics, shared with forgetting.py.
from tools.experiments import protocol
from tools.experiments.protocol import (
    METRICS, NAMED_COMPOUNDS, metric_row, parse_value as _parse_value)

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage writes.",
                               required=True)
_DIFFICULTY = flags.DEFINE_string("difficulty", "hard", "Synthetic mode "
                                  "(gandl-synth --difficulty).")
_SIZE = flags.DEFINE_integer("size", 64, "Edge of the synthetic site images.")
_RESOLUTION = flags.DEFINE_integer("resolution", 32, "Training resolution.")
_DATA_SEED = flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic data.")
_PLATES = flags.DEFINE_integer("plates", None, "Plates per experiment "
                               "(default: gandl-synth's).")
_BUDGETS = flags.DEFINE_list("budgets", ["1", "2", "4", "8"],
                             "Training budgets in kimg (checkpoints kept).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_LAYER = flags.DEFINE_string("layer", "fc", "D feature layer to evaluate.")
_CLASSICAL = flags.DEFINE_bool("classical", True, "Evaluate the classical "
                               "features too.")
_DENSENET = flags.DEFINE_bool("densenet", True, "Evaluate the concatenated "
                              "DenseNet-121 baseline too.")
_DENSENET_WEIGHTS = flags.DEFINE_string(
    "densenet_weights", "none", "DenseNet-121 weights: none (random init, "
    "named so), imagenet or a Keras weights file.")
_CONVAE = flags.DEFINE_bool("convae", True, "Train the demo-sized ConvAE "
                            "for the largest budget and evaluate it too.")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config overrides KEY=VALUE (e.g. loss.r1_gamma=1.0).")

def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  return protocol.summarize(rows, [label for label, _ in METRICS])


def markdown_table(summary: List[Dict[str, Any]]) -> str:
  return protocol.table(summary, [label for label, _ in METRICS])


def main(argv):
  del argv
  # pylint: disable=import-outside-toplevel
  from gandl_jax import checkpoint, sharding
  from gandl_jax.cli import demo
  from gandl_jax.evaluate import pipeline as evaluate_lib
  from gandl_jax.inference import api, export

  logging.set_verbosity(logging.INFO)
  t0 = time.time()
  workdir = os.path.abspath(_WORKDIR.value)
  stages = demo.Stages(workdir, logging.info)
  mesh = sharding.make_mesh()
  budgets = sorted(float(b) for b in _BUDGETS.value)
  seeds = [int(s) for s in _SEEDS.value]
  res = _RESOLUTION.value
  emb_dir = os.path.join(workdir, "embeddings")
  roots, shards, data, metadata, truth = protocol.prepare_data(
      stages, workdir, _SIZE.value, _DATA_SEED.value, _PLATES.value,
      _DIFFICULTY.value, res)

  def evaluate_set(name: str, tag: str) -> Dict[str, Any]:
    out = os.path.join(workdir, "eval", tag)
    metrics = evaluate_lib.evaluate(
        [evaluate_lib.EmbeddingSet(
            name, os.path.join(emb_dir, f"{tag}_rxrx19a.parquet"),
            os.path.join(emb_dir, f"{tag}_rxrx1.parquet"),
            metadata=metadata["rxrx19a"], rxrx1_metadata=metadata["rxrx1"])],
        out, truth=truth, compounds=NAMED_COMPOUNDS, log=logging.info)
    return metric_row(metrics, name)

  rows: List[Dict[str, Any]] = []
  layer = _LAYER.value
  layer_suffix = "" if layer == "fc" else f"-{layer}"
  layer_name = "" if layer == "fc" else f" [{layer}]"
  # Non-GAN sets: the same helper and names as gandl-demo.
  for name, tag in demo.baseline_sets(
      stages, data, emb_dir, classical=_CLASSICAL.value,
      densenet=_DENSENET.value, densenet_weights=_DENSENET_WEIGHTS.value,
      convae=_CONVAE.value, convae_kimg=max(budgets), mesh=mesh):
    rows.append(stages.run(f"eval-{tag}", lambda name=name, tag=tag: dict(
        evaluate_set(name, tag), set=name, seed=-1, kimg=0.0)))

  for seed in seeds:
    config = demo.demo_config()
    config.seed = seed
    config.total_kimg = max(budgets)
    config.checkpoint_every_kimg = min(budgets)
    config.keep_checkpoints = 1000
    config.image_grid_every_kimg = max(budgets)
    config.data.path = data["rxrx19a"]
    for item in _OVERRIDES.value:
      key, _, value = item.partition("=")
      node = config
      *parents, last = key.split(".")
      for p in parents:
        node = node[p]
      node[last] = _parse_value(value)
    train_dir = os.path.join(workdir, f"train-seed{seed}")
    protocol.train_stage(stages, f"train-seed{seed}", config, train_dir,
                         mesh)
    init_dir = os.path.join(workdir, f"init-seed{seed}")
    stages.run(f"init-seed{seed}", lambda config=config, init_dir=init_dir: {
        "checkpoint": demo.save_initial_model(config, mesh, init_dir)})
    # The saved step nearest each budget (checkpoints fall on whole steps).
    saved = checkpoint.list_steps(train_dir)
    points = [(0.0, init_dir, None)] + [
        (b, train_dir, min(saved, key=lambda s, b=b: abs(
            s * config.batch_size - b * 1000))) for b in budgets]
    for kimg, ckpt, step in points:
      # fc keeps the original tags; another layer evaluates the same
      # checkpoints again under its own tags (and summary-<layer>.md).
      tag = f"seed{seed}-kimg{kimg:g}" + layer_suffix
      name = ("untrained D" if step is None else "trained D") + layer_name

      def one(ckpt=ckpt, step=step, tag=tag, name=name, kimg=kimg,
              seed=seed):
        model = api.load(ckpt, step)
        for d in data:
          export.export_model(model, data[d],
                              os.path.join(emb_dir, f"{tag}_{d}.parquet"),
                              layer=_LAYER.value, batch=64, checkpoint=ckpt,
                              mesh=mesh)
        return dict(evaluate_set(name, tag), set=name, seed=seed, kimg=kimg,
                    step=model.step)
      rows.append(stages.run(f"eval-{tag}", one))

  from gandl_jax import io as gio
  gio.write_text(os.path.join(workdir, f"results{layer_suffix}.jsonl"),
                 "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
  summary = summarize(rows)
  figures = protocol.plot(summary, [label for label, _ in METRICS], workdir,
                          layer_suffix)
  elapsed = protocol.stage_seconds(workdir)
  text = "\n".join([
      f"# Training benefit: {_DIFFICULTY.value} synthetic data",
      "",
      "Command: `python -m tools.experiments.training_benefit "
      + " ".join(sys.argv[1:]) + "`",
      f"Seeds: training {seeds}, data {_DATA_SEED.value}; layer "
      f"{_LAYER.value}; budgets {budgets} kimg; compute {elapsed / 60:.1f} "
      f"min summed over the stages (stages/*.done; this call "
      f"{(time.time() - t0) / 60:.1f} min); "
      f"machine: {platform.machine()} {os.cpu_count()} CPU(s), "
      f"{platform.platform()}.",
      "",
      markdown_table(summary),
      "",
      "Figures: " + ", ".join(os.path.basename(p) for p in figures),
      ""])
  gio.write_text(os.path.join(workdir, f"summary{layer_suffix}.md"), text)
  print(text)


if __name__ == "__main__":
  app.run(main)
