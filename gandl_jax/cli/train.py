r"""gandl-train: train GAN-DL (StyleGAN2) on TFRecord shards.

  gandl-train --config configs/gandl_rxrx19a.py:256 --workdir DIR \
      --config.data.path 'SHARDS/*.tfrecord' [--config.batch_size=64 ...]

Re-running the same command resumes from DIR's latest checkpoint. A config
that differs from the checkpoint's is refused with the diff, before anything
is changed; name the keys you mean to change to allow them, e.g.
`--allow_config_change=total_kimg,checkpoint_every_kimg` (docs/training.md,
"Resuming").
"""
from absl import flags
from ml_collections import config_flags

from gandl_jax import cli
from gandl_jax.train import loop as train_loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (get_config); override keys with "
    "--config.key=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics and samples go here (local or gs://).")
_MAX_STEPS = flags.DEFINE_integer(
    "max_steps", None, "Stop after this many iterations of this run (debugging).")
_ALLOW = flags.DEFINE_list(
    "allow_config_change", [], "Config keys (or sections, e.g. optim) allowed "
    "to differ from the resumed checkpoint's config, comma-separated. Keys "
    "that change parameter shapes (model.resolution, model.channel_base, ...) "
    "can never change; batch_size keeps the images seen and the data "
    "position.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", train_loop.DEFAULT_COMPILATION_CACHE_DIR,
    "JAX's persistent compilation cache: a second run of the same "
    "configuration loads its compiled phases from here instead of compiling "
    "them again. Empty (--compilation_cache_dir=) turns it off.")
flags.mark_flags_as_required(["config", "workdir"])


def train_command() -> int:
  summary = train_loop.train(_CONFIG.value, _WORKDIR.value,
                             max_steps=_MAX_STEPS.value,
                             allow_config_change=_ALLOW.value,
                             compilation_cache_dir=_CACHE.value)
  print(f"Training {summary['reason']} at step {summary['step']} "
        f"({summary['kimg']:.3f} kimg); workdir {summary['workdir']}")
  if summary["reason"] == "preempted":
    # Not finished: a distinct status lets launchers restart (128 + SIGTERM).
    return cli.EXIT_PREEMPTED
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  cli.run("gandl-train", train_command)


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
