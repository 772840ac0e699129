r"""gandl-features: non-GAN embeddings (e.g. classical image features) per site.

  gandl-features --method classical --data shards/rxrx19a-64 \
      --output classical.parquet [--filter "treatment == ''"] [--workers 2]

Reads every site of shards written by gandl-convert exactly once and writes
the embeddings layout of gandl-export (`site_id`, metadata columns, `f0000`,
...; Parquet metadata `gandl.layer` = the method, `gandl.feature_names`), so
`gandl-evaluate --embeddings classical.parquet` evaluates it as one more set.
Methods: see gandl_jax/baselines/__init__.py (METHODS) and docs/evaluation.md.
"""
from __future__ import annotations

import json

from absl import app, flags

from gandl_jax import cli
from gandl_jax.baselines import METHODS

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "classical", sorted(METHODS),
                  "Feature method (gandl_jax.baselines.METHODS).")
flags.DEFINE_string("data", None, "Shards written by gandl-convert (directory "
                    "or glob; local or gs://).")
flags.DEFINE_string("output", None, "Embeddings file (.parquet or .csv).")
flags.DEFINE_string("filter", None, "Metadata filter, e.g. \"treatment == ''\" "
                    "(see docs/data.md).")
flags.DEFINE_enum("format", None, ["parquet", "csv"], "Output format (default "
                  "from the file name: .csv -> csv, else parquet).")
flags.DEFINE_integer("batch", 64, "Sites per batch handed to a worker.")
flags.DEFINE_integer("workers", None, "Processes computing features (default: "
                     "all cores); the output does not depend on it.")
flags.DEFINE_float("progress_every", 30.0, "Seconds between progress lines.")


def features_command() -> int:
  from gandl_jax.baselines import run as run_lib  # pylint: disable=import-outside-toplevel
  summary = run_lib.compute_embeddings(
      FLAGS.method, FLAGS.data, FLAGS.output, filter=FLAGS.filter,
      batch=FLAGS.batch, fmt=FLAGS.format, workers=FLAGS.workers,
      progress_every_s=FLAGS.progress_every)
  print(json.dumps(summary.as_dict()))
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  for name in ("data", "output"):
    if not FLAGS[name].value:
      raise cli.usage(f"--{name} is required")
  cli.run("gandl-features", features_command)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
