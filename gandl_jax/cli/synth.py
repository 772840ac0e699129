r"""gandl-synth: writes the synthetic RxRx19a (or RxRx1) tree.

  gandl-synth --output /tmp/synth --size 256 --plates 2 --seed 0
  gandl-synth --output /tmp/synth --dataset rxrx1 --size 128
  gandl-synth --output /tmp/synth-hard --size 64 --difficulty hard

See docs/data.md for what is planted (synthetic_truth.csv).
"""
import os
import shutil

from absl import flags
from absl import logging

from gandl_jax import cli
from gandl_jax.data import synthetic

_OUTPUT = flags.DEFINE_string("output", None, "Parent directory; the tree goes "
                              "to OUTPUT/RxRx19a or OUTPUT/RxRx1.", required=True)
_DATASET = flags.DEFINE_enum("dataset", "rxrx19a", ["rxrx19a", "rxrx1"],
                             "Which public layout to imitate.")
_SIZE = flags.DEFINE_integer("size", 256, "Site edge in pixels.")
_PLATES = flags.DEFINE_list("plates", None, "Plates per experiment (one number) "
                            "or a list of plate numbers; default 2.")
_WELLS = flags.DEFINE_integer("wells_per_plate", None, "Default 48 (rxrx19a), "
                              "24 (rxrx1).")
_EXPERIMENTS = flags.DEFINE_integer("experiments", 1, "RxRx1: experiments per "
                                    "cell type (the last one is 'test').")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_WORKERS = flags.DEFINE_integer("workers", None, "Processes (default: all cores).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing "
                                "tree written by gandl-synth (refused "
                                "otherwise).")
_DIFFICULTY = flags.DEFINE_enum(
    "difficulty", "easy", list(synthetic.DIFFICULTIES),
    "easy: the planted biology shows in per-channel intensities; hard, hard2: "
    "two designs where it shows only in morphology and arrangement (every "
    "channel's intensity histogram matched between classes).")


def clear_output(root: str, overwrite: bool) -> None:
  """Refuses an existing tree at `root` unless `overwrite`; then removes it,
  if gandl-synth wrote it (its synthetic_truth.csv), so that no file of the
  old tree is left among the new one's."""
  if not os.path.exists(root) or not os.listdir(root):
    return
  if not overwrite:
    raise FileExistsError(f"{root} already exists; pass --overwrite to "
                          f"replace it")
  if not os.path.isfile(os.path.join(root, "synthetic_truth.csv")):
    raise FileExistsError(f"{root} exists and was not written by gandl-synth "
                          f"(no synthetic_truth.csv); not replaced: choose "
                          f"another --output")
  shutil.rmtree(root)


def synth_command() -> int:
  clear_output(os.path.join(_OUTPUT.value,
                            synthetic.DATASET_DIRS[_DATASET.value]),
               _OVERWRITE.value)
  plates = None
  if _PLATES.value:
    vals = [int(p) for p in _PLATES.value]
    plates = vals[0] if len(vals) == 1 else vals
  root = synthetic.generate(_OUTPUT.value, dataset=_DATASET.value,
                            size=_SIZE.value, plates=plates, seed=_SEED.value,
                            wells_per_plate=_WELLS.value,
                            experiments=_EXPERIMENTS.value,
                            workers=_WORKERS.value,
                            difficulty=_DIFFICULTY.value)
  logging.info("Wrote %s", root)
  print(root)
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  cli.run("gandl-synth", synth_command)


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
