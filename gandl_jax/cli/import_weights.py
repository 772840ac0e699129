r"""gandl-import: stylegan2-ada-pytorch networks -> a gandl-jax checkpoint.

  pip install -e ".[import]"          # PyTorch >= 2.6, only needed here
  gandl-import --state_dicts nets.pt --workdir /tmp/imported --conv_clamp 256
  # Pickles run code from the file when loaded: only files you trust.
  PYTHONPATH=/path/to/stylegan2-ada-pytorch gandl-import \
      --pkl network-snapshot-005000.pkl --trust_pickle --workdir /tmp/imported

See gandl_jax/interop/stylegan2_ada.py and docs/models.md.
"""
import json
import os

from absl import flags

from gandl_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("pkl", None, "stylegan2-ada-pytorch network pickle; "
                    "loading it runs code from the file, so it needs "
                    "--trust_pickle.")
flags.DEFINE_bool("trust_pickle", False, "Allow --pkl: you made the pickle "
                  "or fully trust its source (unpickling runs arbitrary "
                  "code). Files of unknown origin: use --state_dicts.")
flags.DEFINE_string("state_dicts", None,
                    "The safe input: .npz, or torch.save'd {'G','D','G_ema'} "
                    "state_dicts (read with torch.load(weights_only=True), "
                    "torch >= 2.6).")
flags.DEFINE_string("workdir", None, "Output workdir (checkpoints/ inside).")
flags.DEFINE_integer("step", 0, "Checkpoint step number to write.")
flags.DEFINE_bool("overwrite", False, "Replace an existing step --step in "
                  "--workdir (refused otherwise).")
flags.DEFINE_integer("mbstd_group_size", 4,
                     "--state_dicts only: D minibatch-stddev group size.")
flags.DEFINE_float("mapping_lr_multiplier", 0.01,
                   "--state_dicts only: mapping lr multiplier.")
flags.DEFINE_float("w_avg_beta", 0.995, "--state_dicts only: w_avg decay.")
flags.DEFINE_float("conv_clamp", None,
                   "--state_dicts only: conv clamp (None = off; ADA trains "
                   "with 256).")


def import_command() -> int:
  # pylint: disable=import-outside-toplevel
  from gandl_jax import checkpoint
  from gandl_jax.interop import stylegan2_ada
  src = FLAGS.pkl or FLAGS.state_dicts
  if not os.path.exists(src):
    raise FileNotFoundError(f"{src} does not exist")
  step_dir = checkpoint.checkpoint_dir(FLAGS.workdir) / str(FLAGS.step)
  if step_dir.exists():
    if not FLAGS.overwrite:
      raise FileExistsError(f"{step_dir} already exists; pass --overwrite to "
                            f"replace it (or another --workdir or --step)")
  if FLAGS.pkl:
    sds, hints = stylegan2_ada.load_pickle(FLAGS.pkl,
                                           trust=FLAGS.trust_pickle)
  else:
    sds = stylegan2_ada.load_state_dicts(FLAGS.state_dicts)
    hints = {"mbstd_group_size": FLAGS.mbstd_group_size,
             "mapping_lr_multiplier": FLAGS.mapping_lr_multiplier,
             "w_avg_beta": FLAGS.w_avg_beta, "conv_clamp": FLAGS.conv_clamp}
  if step_dir.exists():    # --overwrite, once the input has been read
    step_dir.rmtree()
  try:
    path = stylegan2_ada.import_to_workdir(sds, hints, FLAGS.workdir, src,
                                           step=FLAGS.step)
  except stylegan2_ada.ImportErrorWithKeys as e:
    raise ValueError(f"{src}: {e}") from e
  _, meta = checkpoint.restore_model(path)
  print(f"wrote {path}")
  print(json.dumps(meta["model"], indent=2))
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  if bool(FLAGS.pkl) == bool(FLAGS.state_dicts):
    raise cli.usage("give exactly one of --pkl or --state_dicts")
  if FLAGS.trust_pickle and not FLAGS.pkl:
    raise cli.usage("--trust_pickle applies to --pkl only")
  if not FLAGS.workdir:
    raise cli.usage("--workdir is required")
  cli.run("gandl-import", import_command)


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
