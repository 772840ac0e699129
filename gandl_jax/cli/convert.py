r"""gandl-convert: RxRx19a / RxRx1 (or the synthetic tree), or any Cell
Painting set described by CellProfiler LoadData CSVs -> TFRecord shards.

  gandl-convert --dataset rxrx19a --input /data/RxRx19a \
      --output gs://BUCKET/shards/rxrx19a-256 --resolution 256 --workers 16
  gandl-convert --dataset loaddata --input /data/jump/BR00116991/load_data.csv \
      --channels OrigDNA,OrigER,OrigRNA,OrigAGP,OrigMito \
      --output /data/shards/jump-256 --resolution 256 --workers 16

Exit status (README, "Exit status"): 0 when every site converted, 3 when
some failed (listed with the reason in OUTPUT/errors.csv; the rest is
converted), 1 when metadata.csv (or the LoadData CSV) is unusable, when no
site converts, or when OUTPUT holds a conversion with other inputs or flags
(pass --overwrite). Rerunning the same command resumes: finished shards are
kept.
"""
import shlex
import sys

from absl import flags

from gandl_jax import cli

_DATASET = flags.DEFINE_enum("dataset", "rxrx19a", ["rxrx19a", "rxrx1",
                                                  "loaddata"],
                             "Which layout the input has: a public RxRx "
                             "tree, or loaddata (CellProfiler LoadData CSVs).")
_INPUT = flags.DEFINE_string("input", None, "Dataset root (metadata.csv, "
                             "images/); loaddata: the LoadData CSV file(s), "
                             "comma-separated.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Shard directory (local or "
                              "gs://).", required=True)
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Output edge in pixels.")
_SUBSET = flags.DEFINE_enum("subset", "all", ["all", "controls"],
                            "controls: RxRx19a untreated wells, RxRx1 control "
                            "wells.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "A positive integer; "
                                   "default: ~128 MiB per shard, at least 16.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes decoding PNGs.")
_CHANNELS = flags.DEFINE_list("channels", None, "Channel numbers to stack "
                              "(default rxrx19a 1-5, rxrx1 1-5); loaddata: "
                              "channel names, the FileName_ suffixes (default "
                              "every one), e.g. OrigDNA,OrigER,OrigRNA,"
                              "OrigAGP,OrigMito.")
_CLIP = flags.DEFINE_string("clip_percentiles", "0.1,99.9", "loaddata: LOW,"
                            "HIGH percentiles of each channel's values on the "
                            "sampled sites, mapped to 0 and 255; 'none': the "
                            "bit depth's full range. A constant channel (no "
                            "spread between the percentiles, e.g. saturated "
                            "at 65535) gets the full range too, with a "
                            "warning: 0 stays black, 65535 becomes 255. A "
                            "channel mixing 8- and 16-bit files is refused.")
_SAMPLE = flags.DEFINE_integer("intensity_sample", 64, "loaddata: sites "
                               "sampled for the percentiles.")
_SEED = flags.DEFINE_integer("intensity_seed", 0, "loaddata: seed of that "
                             "sample.")
_PATH_MAP = flags.DEFINE_multi_string("path_map", [], "loaddata: OLD=NEW "
                                      "replaces a prefix of the image paths "
                                      "(repeatable), e.g. s3://cellpainting-"
                                      "gallery/=/data/cpg/.")
_IMAGE_ROOT = flags.DEFINE_string(
    "image_root", None, "loaddata: the directory every image must lie in; "
    "rows whose PathName_/FileName_ lead elsewhere ('..', absolute paths, "
    "symlinks out of it) are refused in errors.csv. Default: the LoadData "
    "CSV's directory, or for a path rewritten by --path_map that entry's "
    "NEW side.")
_ALLOW_OUTSIDE = flags.DEFINE_bool(
    "allow_outside_root", False, "loaddata: read images wherever the CSV "
    "points, outside the image root too.")
_COMPRESSION = flags.DEFINE_enum("compression", "", ["", "GZIP"],
                                 "TFRecord compression.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the conversion "
                                "in --output (needed when its inputs or flags "
                                "differ): every shard is redone.")


def convert_command(**kwargs) -> int:
  """`convert.convert(**kwargs)`, its summary printed; the exit status."""
  cli.check_output_dir(kwargs["output_dir"])
  # Imported here so that conversion worker processes (spawned) stay light.
  from gandl_jax.data import convert  # pylint: disable=import-outside-toplevel
  summary = convert.convert(**kwargs)
  print(f"converted {summary['num_examples']} sites into "
        f"{summary['num_shards']} shards in {summary['output_dir']}; "
        f"{summary['num_failed']} failed"
        + (f" (see {summary['errors_csv']})" if summary["num_failed"] else ""))
  return cli.EXIT_PARTIAL if summary["num_failed"] else cli.EXIT_OK


def _clip(text: str):
  if text.strip().lower() == "none":
    return None
  try:
    low, high = (float(v) for v in text.split(","))
  except ValueError as e:
    raise cli.usage(f"--clip_percentiles must be LOW,HIGH (e.g. 0.1,99.9) or "
                    f"none, got {text!r}") from e
  return low, high


def main(argv):
  cli.no_arguments(argv)
  if _NUM_SHARDS.value is not None and _NUM_SHARDS.value < 1:
    raise cli.usage(f"--num_shards must be a positive integer, got "
                    f"{_NUM_SHARDS.value}")
  loaddata = _DATASET.value == "loaddata"
  try:
    channels = (None if not _CHANNELS.value else
                [c.strip() for c in _CHANNELS.value] if loaddata else
                [int(c.strip().lstrip("w")) for c in _CHANNELS.value])
  except ValueError as e:
    raise cli.usage(f"--channels must be channel numbers like 1,2,3: {e}")
  extra = {}
  if loaddata:
    from gandl_jax.data.loaddata import parse_path_map  # pylint: disable=import-outside-toplevel
    try:
      path_map = parse_path_map(_PATH_MAP.value)
    except ValueError as e:
      raise cli.usage(f"--path_map: {e}")
    extra = dict(path_map=path_map, clip_percentiles=_clip(_CLIP.value),
                 intensity_sample=_SAMPLE.value, intensity_seed=_SEED.value,
                 image_root=_IMAGE_ROOT.value,
                 allow_outside_root=_ALLOW_OUTSIDE.value)
  else:
    for name in ("path_map", "image_root", "allow_outside_root"):
      if flags.FLAGS[name].present:
        raise cli.usage(f"--{name} applies to --dataset loaddata only")
  # Recorded in dataset_info.json and the progress records; readers print it
  # as the command that completes an interrupted conversion.
  command = shlex.join(["gandl-convert"] + sys.argv[1:])
  cli.run("gandl-convert", lambda: convert_command(
      dataset=_DATASET.value, input_dir=_INPUT.value, output_dir=_OUTPUT.value,
      resolution=_RESOLUTION.value, subset=_SUBSET.value,
      num_shards=_NUM_SHARDS.value, workers=_WORKERS.value, channels=channels,
      compression=_COMPRESSION.value, overwrite=_OVERWRITE.value,
      command=command, **extra))


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
