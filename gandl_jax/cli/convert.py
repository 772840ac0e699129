r"""gandl-convert: RxRx19a / RxRx1 (or the synthetic tree) -> TFRecord shards.

  gandl-convert --dataset rxrx19a --input /data/RxRx19a \
      --output gs://BUCKET/shards/rxrx19a-256 --resolution 256 --workers 16

Exit status 0 when every site converted, 1 when some failed (listed with the
reason in OUTPUT/errors.csv; the rest is converted), 2 when metadata.csv is
unusable (nothing written). Rerunning resumes: finished shards are kept.
"""
import sys

from absl import app
from absl import flags
from absl import logging

_DATASET = flags.DEFINE_enum("dataset", "rxrx19a", ["rxrx19a", "rxrx1"],
                             "Which public layout the input has.")
_INPUT = flags.DEFINE_string("input", None, "Dataset root (metadata.csv, "
                             "images/).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Shard directory (local or "
                              "gs://).", required=True)
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Output edge in pixels.")
_SUBSET = flags.DEFINE_enum("subset", "all", ["all", "controls"],
                            "controls: RxRx19a untreated wells, RxRx1 control "
                            "wells.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "Default: ~128 MiB per "
                                   "shard, at least 16.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes decoding PNGs.")
_CHANNELS = flags.DEFINE_list("channels", None, "Channel numbers to stack "
                              "(default rxrx19a 1-5, rxrx1 1-5).")
_COMPRESSION = flags.DEFINE_enum("compression", "", ["", "GZIP"],
                                 "TFRecord compression.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo finished shards.")


def main(argv):
  del argv
  # Imported here so that conversion worker processes (spawned) stay light.
  from gandl_jax.data import convert  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.INFO)
  channels = [int(c.lstrip("w")) for c in _CHANNELS.value] if _CHANNELS.value else None
  sys.exit(convert.run_command(
      dataset=_DATASET.value, input_dir=_INPUT.value, output_dir=_OUTPUT.value,
      resolution=_RESOLUTION.value, subset=_SUBSET.value,
      num_shards=_NUM_SHARDS.value, workers=_WORKERS.value, channels=channels,
      compression=_COMPRESSION.value, overwrite=_OVERWRITE.value,
      command=convert.main_command()))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
