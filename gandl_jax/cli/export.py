"""gandl-export: discriminator embeddings for every site of a set of shards.

  gandl-export --workdir runs/rxrx19a-256 --data shards/rxrx19a-256 \
      --output embeddings.parquet
  gandl-export --checkpoint runs/rxrx19a-256/checkpoints/120000 \
      --data 'gs://b/shards/*.tfrecord' --output gs://b/export/emb.parquet \
      --layer fc --batch 256
  gandl-export --workdir W --data S --output embeddings.csv --format csv
  gandl-export --workdir W --step best --data S --output best.parquet
  gandl-export --workdir W --step best --layer b16 --data S --output b16.parquet
  gandl-export --workdir CONVAE_WORKDIR --data S --output convae.parquet

A ConvAE baseline's workdir (configs/convae_rxrx19a.py) exports its
bottleneck (layer 'bottleneck') the same way; docs/baselines.md.

One row per site: `site_id`, the metadata columns and the features (`f0000`,
...); `--format csv` writes Recursion's layout (`site_id` + features). Runs on
every device (and every host of a pod: start it on all workers; OUTPUT must
then be on shared storage). See docs/export.md.
"""
from __future__ import annotations

import json

from absl import flags

from gandl_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint "
                    "unless --step).")
flags.DEFINE_string("checkpoint", None, "Instead of --workdir: a workdir, its "
                    "checkpoints/ dir or a step dir.")
flags.DEFINE_string("step", None, "Checkpoint step (default: latest), or "
                    "'best': the step with the best representation-probe "
                    "score of --layer recorded during training (default "
                    "layer: the run's config.probe_layer); the file then "
                    "lists the probe's plates, which gandl-evaluate leaves "
                    "out of the control task.")
flags.DEFINE_string("data", None, "Shards written by gandl-convert (directory "
                    "or glob; local or gs://).")
flags.DEFINE_string("output", None, "Embeddings file (.parquet or .csv).")
flags.DEFINE_string("layer", None, "Feature layer. GAN: D's layer, default "
                    "'fc' (GAN-DL's embedding; 'conv', 'logit', 'b{res}' "
                    "also exist). ConvAE baseline: 'bottleneck' (the "
                    "default). With --step best: also the layer the step is "
                    "selected on.")
flags.DEFINE_integer("batch", 64, "Global batch over all devices and hosts; "
                     "fixes the minibatch-stddev groups (recorded in the file).")
flags.DEFINE_enum("format", None, ["parquet", "csv"], "Output format (default "
                  "from the file name: .csv -> csv, else parquet).")
flags.DEFINE_string("filter", None, "Metadata filter: a pandas DataFrame.query "
                    "condition over the sites.csv columns, e.g. \"treatment == ''\" "
                    "(see gandl_jax/data/pipeline.py).")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype of D.")
flags.DEFINE_float("progress_every", 30.0, "Seconds between progress lines.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output (refused "
                  "otherwise).")
flags.DEFINE_bool("allow_fallback", False, "If the latest checkpoint is "
                  "unreadable, use the newest readable older one (refused "
                  "otherwise; the step used is in the summary and the file "
                  "metadata). --step picks one explicitly.")


def export_command() -> int:
  cli.stop_on_sigterm()    # the temporary output file is removed
  # pylint: disable=import-outside-toplevel
  from gandl_jax.inference import export
  from gandl_jax import sharding
  sharding.maybe_initialize_distributed()
  summary = export.export_embeddings(
      FLAGS.workdir or FLAGS.checkpoint, FLAGS.data, FLAGS.output,
      layer=FLAGS.layer, batch=FLAGS.batch, fmt=FLAGS.format,
      step=FLAGS.step, filter=FLAGS.filter,
      compute_dtype=FLAGS.compute_dtype,
      progress_every_s=FLAGS.progress_every, overwrite=FLAGS.overwrite,
      allow_fallback=FLAGS.allow_fallback)
  print(json.dumps(summary.as_dict()))
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise cli.usage("give exactly one of --workdir or --checkpoint")
  step = FLAGS.step
  if step is not None and not (step.isdigit() or step == "best"):
    raise cli.usage(f"--step must be a step number or 'best', got {step!r}")
  for name in ("data", "output"):
    if not FLAGS[name].value:
      raise cli.usage(f"--{name} is required")
  cli.run("gandl-export", export_command)


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
