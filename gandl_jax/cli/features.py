r"""gandl-features: non-GAN embeddings (e.g. classical image features) per site.

  gandl-features --method classical --data shards/rxrx19a-64 \
      --output classical.parquet [--filter "treatment == ''"] [--workers 2]
  gandl-features --method densenet_concat --data shards/rxrx19a-256 \
      --output densenet_concat.parquet --weights imagenet   # or FILE.h5, none

Reads every site of shards written by gandl-convert exactly once and writes
the embeddings layout of gandl-export (`site_id`, metadata columns, `f0000`,
...; Parquet metadata `gandl.layer` = the method, `gandl.feature_names`), so
`gandl-evaluate --embeddings classical.parquet` evaluates it as one more set.
Methods: gandl_jax/baselines/__init__.py (METHODS: numpy functions run in
worker processes) and JAX_METHODS below (run data-parallel on the JAX devices
with their own exporter); docs/baselines.md.
"""
from __future__ import annotations

import json

from typing import Callable, Dict, NamedTuple

from absl import flags

from gandl_jax import cli
from gandl_jax.baselines import METHODS


def _densenet_concat() -> Dict:
  # pylint: disable=import-outside-toplevel
  from gandl_jax import sharding
  from gandl_jax.baselines import densenet
  sharding.maybe_initialize_distributed()
  return densenet.export_concat(
      FLAGS.data, FLAGS.output, weights=FLAGS.weights, seed=FLAGS.seed,
      batch=FLAGS.batch or densenet.DEFAULT_BATCH, fmt=FLAGS.format,
      filter=FLAGS.filter, image_size=FLAGS.image_size,
      compute_dtype=FLAGS.compute_dtype,
      progress_every_s=FLAGS.progress_every, overwrite=FLAGS.overwrite)


class JaxMethod(NamedTuple):
  description: str
  run: Callable[[], Dict]     # reads FLAGS, returns the summary


# Methods that run on the JAX devices (every device and host, like
# gandl-export) rather than in CPU worker processes.
JAX_METHODS: Dict[str, JaxMethod] = {
    "densenet_concat": JaxMethod(
        "ImageNet DenseNet-121 on each channel, global average pooled, "
        "concatenated (5 x 1024)", _densenet_concat),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "classical", sorted(METHODS) + sorted(JAX_METHODS),
                  "Feature method (gandl_jax.baselines.METHODS, JAX_METHODS).")
flags.DEFINE_string("data", None, "Shards written by gandl-convert (directory "
                    "or glob; local or gs://).")
flags.DEFINE_string("output", None, "Embeddings file (.parquet or .csv).")
flags.DEFINE_string("filter", None, "Metadata filter: a pandas DataFrame.query "
                    "condition over the sites.csv columns, e.g. \"treatment == ''\" "
                    "(see gandl_jax/data/pipeline.py).")
flags.DEFINE_enum("format", None, ["parquet", "csv"], "Output format (default "
                  "from the file name: .csv -> csv, else parquet).")
flags.DEFINE_integer("batch", None, "Sites per batch handed to a worker "
                     "(default 64); densenet_*: the global batch over all "
                     "devices and hosts (default 32).")
flags.DEFINE_integer("workers", None, "Processes computing features (default: "
                     "all cores); the output does not depend on it.")
flags.DEFINE_float("progress_every", 30.0, "Seconds between progress lines.")
# densenet_concat
flags.DEFINE_string("weights", "imagenet", "densenet_*: 'imagenet' (Keras "
                    "downloads them once), a weights file (.weights.h5, "
                    ".keras, .h5) or 'none' (random init, labelled random).")
flags.DEFINE_integer("image_size", None, "densenet_*: resize sites to this "
                     "size before the network (default: the shards' "
                     "resolution).")
flags.DEFINE_integer("seed", 0, "densenet_*: seed of random weights.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "densenet_*: compute dtype (features are float32).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output "
                  "(refused otherwise).")


def features_command() -> int:
  cli.stop_on_sigterm()    # the temporary output file is removed
  if FLAGS.method in JAX_METHODS:
    print(json.dumps(JAX_METHODS[FLAGS.method].run()))
    return cli.EXIT_OK
  from gandl_jax.baselines import run as run_lib  # pylint: disable=import-outside-toplevel
  summary = run_lib.compute_embeddings(
      FLAGS.method, FLAGS.data, FLAGS.output, filter=FLAGS.filter,
      batch=FLAGS.batch or 64, fmt=FLAGS.format, workers=FLAGS.workers,
      progress_every_s=FLAGS.progress_every, overwrite=FLAGS.overwrite)
  print(json.dumps(summary.as_dict()))
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  for name in ("data", "output"):
    if not FLAGS[name].value:
      raise cli.usage(f"--{name} is required")
  cli.run("gandl-features", features_command)


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
