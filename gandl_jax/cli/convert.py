r"""gandl-convert: RxRx19a / RxRx1 (or the synthetic tree) -> TFRecord shards.

  gandl-convert --dataset rxrx19a --input /data/RxRx19a \
      --output gs://BUCKET/shards/rxrx19a-256 --resolution 256 --workers 16

Exit status (README, "Exit status"): 0 when every site converted, 3 when
some failed (listed with the reason in OUTPUT/errors.csv; the rest is
converted), 1 when metadata.csv is unusable (nothing written). Rerunning
resumes: finished shards are kept.
"""
import os
import sys

from absl import app
from absl import flags

from gandl_jax import cli

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


def convert_command(**kwargs) -> int:
  """`convert.convert(**kwargs)`, its summary printed; the exit status."""
  # Imported here so that conversion worker processes (spawned) stay light.
  from gandl_jax.data import convert  # pylint: disable=import-outside-toplevel
  summary = convert.convert(**kwargs)
  print(f"converted {summary['num_examples']} sites into "
        f"{summary['num_shards']} shards in {summary['output_dir']}; "
        f"{summary['num_failed']} failed"
        + (f" (see {summary['errors_csv']})" if summary["num_failed"] else ""))
  return cli.EXIT_PARTIAL if summary["num_failed"] else cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  try:
    channels = ([int(c.strip().lstrip("w")) for c in _CHANNELS.value]
                if _CHANNELS.value else None)
  except ValueError as e:
    raise cli.usage(f"--channels must be channel numbers like 1,2,3: {e}")
  command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
  cli.run("gandl-convert", lambda: convert_command(
      dataset=_DATASET.value, input_dir=_INPUT.value, output_dir=_OUTPUT.value,
      resolution=_RESOLUTION.value, subset=_SUBSET.value,
      num_shards=_NUM_SHARDS.value, workers=_WORKERS.value, channels=channels,
      compression=_COMPRESSION.value, overwrite=_OVERWRITE.value,
      command=command))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
