r"""Sites/s of gandl-convert against the TFDS builder on Beam's local runner,
on the same synthetic tree.

  python -m tools.bench.convert --size 256 --resolution 64 --workers 2

Writes a synthetic RxRx19a (gandl-synth; 768 sites per plate) into --scratch
(reused on later runs), then converts it with gandl-convert (`--workers`
processes) and builds it with `tfds_rxrx19a.py` on Beam's FnApiRunner: one
worker in this process, and `--workers` processes
(direct_running_mode=multi_processing). Every run writes to a fresh
directory. Records sites/s per run (wall time of the whole job: planning,
reading, resizing, writing, index).

`--runs convert,loaddata` compares gandl-convert on the PNG tree with
`--dataset loaddata` on the same sites as 16-bit TIFFs (each PNG value x 257)
described by a LoadData CSV (written once into --scratch): the 16-bit decode,
the percentile sample (64 sites) and the rescaling.
"""
import os
import shutil
import time

from absl import flags

from tools.bench import harness

harness.define_flags(rounds=1, warmup=0)

_SIZE = flags.DEFINE_integer("size", 256, "Edge of the synthetic source PNGs.")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "Output edge (a TFDS "
                                   "config: 8, 16, ..., 1024).")
_PLATES = flags.DEFINE_integer("plates", 1, "Synthetic plates per experiment "
                               "(1: 768 sites).")
_WORKERS = flags.DEFINE_integer("workers", 2, "gandl-convert processes and "
                                "Beam direct_num_workers.")
_RUNS = flags.DEFINE_list("runs", ["convert", "beam1", "beamN"],
                          "Which runs: convert, beam1 (one in-process Beam "
                          "worker), beamN (--workers Beam processes), "
                          "loaddata (16-bit TIFFs through a LoadData CSV).")
_SCRATCH = flags.DEFINE_string("scratch", "/tmp/gandl-bench-convert", "Where "
                               "the synthetic tree and outputs go.")


def _tree() -> str:
  from gandl_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  base = os.path.join(_SCRATCH.value, f"tree-{_SIZE.value}-p{_PLATES.value}")
  root = os.path.join(base, "RxRx19a")
  if not os.path.exists(os.path.join(root, "metadata.csv")):
    t = time.time()
    synthetic.generate(base, size=_SIZE.value, plates=_PLATES.value, seed=0)
    harness.say(f"synthetic tree: {time.time() - t:.1f} s")
  return root


def _fresh(name: str) -> str:
  out = os.path.join(_SCRATCH.value, name)
  shutil.rmtree(out, ignore_errors=True)
  return out


def _convert(root: str) -> int:
  from gandl_jax.data import convert  # pylint: disable=import-outside-toplevel
  s = convert.convert("rxrx19a", root, _fresh("convert"), _RESOLUTION.value,
                      workers=_WORKERS.value)
  return int(s["num_examples"])


def _loaddata_csv(root: str) -> str:
  """The tree's sites as 16-bit TIFFs and a LoadData CSV (made once)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  base = os.path.join(_SCRATCH.value, f"loaddata-{_SIZE.value}-p{_PLATES.value}")
  csv_path = os.path.join(base, "load_data.csv")
  if os.path.exists(csv_path):
    return csv_path
  t = time.time()
  rows = []
  md = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  for r in md.to_dict("records"):
    plate = f"{r['experiment']}_{r['plate']}"
    d = os.path.join(base, "images", plate)
    os.makedirs(d, exist_ok=True)
    row = dict(Metadata_Plate=plate, Metadata_Well=r["well"],
               Metadata_Site=r["site"], Metadata_Condition=r["disease_condition"])
    for ch in range(1, 6):
      src = os.path.join(root, "images", r["experiment"], f"Plate{r['plate']}",
                         f"{r['well']}_s{r['site']}_w{ch}.png")
      name = f"{r['well']}_s{r['site']}_w{ch}.tiff"
      a = np.asarray(Image.open(src), np.uint16) * 257
      Image.fromarray(a).save(os.path.join(d, name), format="TIFF")
      row[f"FileName_w{ch}"], row[f"PathName_w{ch}"] = name, d
    rows.append(row)
  pd.DataFrame(rows).to_csv(csv_path + ".tmp", index=False)
  os.replace(csv_path + ".tmp", csv_path)
  harness.say(f"16-bit TIFF LoadData set: {time.time() - t:.1f} s")
  return csv_path


def _convert_loaddata(root: str) -> int:
  from gandl_jax.data import convert  # pylint: disable=import-outside-toplevel
  s = convert.convert("loaddata", _loaddata_csv(root), _fresh("loaddata"),
                      _RESOLUTION.value, workers=_WORKERS.value)
  return int(s["num_examples"])


def _beam(root: str, workers: int) -> int:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import tfds_rxrx19a  # pylint: disable=import-outside-toplevel
  flags_ = ["--runner=FnApiRunner", f"--direct_num_workers={workers}"]
  if workers > 1:
    flags_.append("--direct_running_mode=multi_processing")
  b = tfds_rxrx19a.Rxrx19a(config=str(_RESOLUTION.value),
                           data_dir=_fresh(f"tfds-{workers}"))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=root,
      beam_options=pipeline_options.PipelineOptions(flags=flags_)))
  return int(b.info.splits["train"].num_examples)


def main(argv):
  del argv
  root = _tree()
  runs = {"convert": lambda: _convert(root), "beam1": lambda: _beam(root, 1),
          "beamN": lambda: _beam(root, _WORKERS.value),
          "loaddata": lambda: _convert_loaddata(root)}
  labels = {"convert": f"gandl-convert --workers {_WORKERS.value}",
            "beam1": "tfds builder, FnApiRunner, 1 worker",
            "beamN": f"tfds builder, FnApiRunner, {_WORKERS.value} processes",
            "loaddata": f"gandl-convert --dataset loaddata (16-bit TIFF) "
                        f"--workers {_WORKERS.value}"}
  counts = {}
  times = harness.alternate(
      {name: (lambda name=name: counts.__setitem__(name, runs[name]()))
       for name in _RUNS.value}, flags.FLAGS.rounds, flags.FLAGS.warmup)
  for name, t in times.items():
    n = counts[name]
    harness.emit("sites_per_s", n / t.median, "sites/s",
                 {"run": labels[name], "sites": n, "size": _SIZE.value,
                  "resolution": _RESOLUTION.value, "workers": _WORKERS.value},
                 timing=t)
    harness.say(f"{labels[name]}: {n} sites {_SIZE.value}->{_RESOLUTION.value}"
                f" in {t.median:.1f} s = {n / t.median:.1f} sites/s")


if __name__ == "__main__":
  harness.run(main, "convert")
