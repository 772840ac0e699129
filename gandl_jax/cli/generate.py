"""gandl-generate: images from a checkpoint (PNG grids, composites, .npz).

  gandl-generate --checkpoint /tmp/gandl --seeds 0-15 --out grid.png
  gandl-generate --checkpoint gs://b/run --step 120000 --seeds 0-63 \
      --truncation_psi 0.7 --view rxrx --out samples.png
  gandl-generate --checkpoint /tmp/imported --seeds 0,1,2 --view raw \
      --out channels.png
  gandl-generate --checkpoint /tmp/gandl --seeds 0-999 --out samples.npz

Seeds follow the reference's convention (RandomState(seed).randn(1, z_dim)),
the generator is G_ema. Views: 'bgr' (Hoechst blue, ConA/Syto14 green,
Phalloidin/WGA red), 'rxrx' (rxrx1-utils colouring), 'raw' (the channels side
by side in greyscale). `.npz` keeps the raw uint8 channels.
"""
from __future__ import annotations

import json
from typing import List

from absl import flags

from gandl_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Workdir, its checkpoints/ dir, or a "
                    "step dir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("allow_fallback", False, "If the latest checkpoint is "
                  "unreadable, use the newest readable older one (refused "
                  "otherwise).")
flags.DEFINE_string("seeds", "0-7", "Seeds: comma-separated ints and ranges "
                    "(e.g. '0-7,42').")
flags.DEFINE_float("truncation_psi", 1.0, "Truncation psi.")
flags.DEFINE_enum("noise_mode", "const", ["const", "random", "none"],
                  "Noise inputs.")
flags.DEFINE_integer("noise_seed", 0, "Seed of --noise_mode=random.")
flags.DEFINE_enum("view", "bgr", ["bgr", "rxrx", "raw"], "PNG view.")
flags.DEFINE_integer("cols", 0, "Grid columns (0: near-square; 'raw': 1).")
flags.DEFINE_string("out", None, "Output file, .png or .npz.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype.")
flags.DEFINE_integer("batch_size", 32, "Images per generator call.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out (refused "
                  "otherwise).")


def generate_command(seeds: List[int]) -> int:
  # pylint: disable=import-outside-toplevel
  from gandl_jax import io as gio
  from gandl_jax.inference import api, samples
  if not FLAGS.overwrite and gio.exists(FLAGS.out):
    raise FileExistsError(f"{FLAGS.out} already exists; pass --overwrite to "
                          f"replace it")
  model = api.load(FLAGS.checkpoint, FLAGS.step,
                   compute_dtype=FLAGS.compute_dtype,
                   batch_size=FLAGS.batch_size,
                   allow_fallback=FLAGS.allow_fallback)
  summary = samples.save_samples(
      model, FLAGS.out, seeds, truncation_psi=FLAGS.truncation_psi,
      noise_mode=FLAGS.noise_mode, noise_seed=FLAGS.noise_seed,
      view=FLAGS.view, cols=FLAGS.cols)
  print(json.dumps(summary))
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  if not FLAGS.checkpoint:
    raise cli.usage("--checkpoint is required")
  if not FLAGS.out:
    raise cli.usage("--out is required (.png or .npz)")
  try:
    seeds = cli.parse_seeds(FLAGS.seeds)
  except ValueError as e:
    raise cli.usage(str(e)) from e
  cli.run("gandl-generate", lambda: generate_command(seeds))


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
