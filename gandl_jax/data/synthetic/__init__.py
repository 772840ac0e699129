"""A synthetic RxRx19a / RxRx1 in the public layout, with planted, known
biology.

The real datasets cannot be downloaded here, so this package renders cells
into the same tree the converter reads::

  ROOT/metadata.csv                   exact public columns and vocabularies
  ROOT/images/{experiment}/Plate{N}/{well}_s{site}_w{channel}.png
  ROOT/synthetic_truth.csv            planted parameters (long format)
  ROOT/synthetic_sites.csv            per-site truth (cells, infection, toxicity)

Modules, in import order:

  designs.py    the planted biology (compounds, doses, cell types) and the
                designs (`DESIGNS`: "easy", "hard", "hard2") as data
  geometry.py   drawing primitives (lattice, elliptical windows, splatting)
  cells.py      the two cell models (intensity, morphology-only)
  render.py     one site of a design: cells, nuisances, intensity matching,
                plate effects, noise (`render_site`)
  layout.py     plates, wells, metadata rows and truth rows
  __init__.py   the tree writer (`generate`) and the truth readers
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from PIL import Image

from gandl_jax import io as gio
from gandl_jax import schema
from gandl_jax.data.synthetic import layout
from gandl_jax.data.synthetic.designs import (ACTIVE_SEVERITY, COMPOUNDS,
                                              CONCENTRATIONS, DESIGNS,
                                              MORPHOLOGY)
from gandl_jax.data.synthetic.render import (SiteSpec, match_histogram,
                                             render_site)

__all__ = ["ACTIVE_SEVERITY", "COMPOUNDS", "CONCENTRATIONS", "DATASET_DIRS",
           "DESIGNS", "DIFFICULTIES", "MORPHOLOGY", "SITES_COLUMNS",
           "SITES_FILE", "SiteSpec", "TRUTH_COLUMNS", "compound_truth",
           "generate", "match_histogram", "read_truth", "render_site"]

DATASET_DIRS = {"rxrx19a": "RxRx19a", "rxrx1": "RxRx1"}
# "easy": the planted biology shows in per-channel intensities; the others
# are morphology-only (see designs.py).
DIFFICULTIES = tuple(DESIGNS)
SITES_FILE = "synthetic_sites.csv"
TRUTH_COLUMNS = ("kind", "name", "cell_type", "experiment", "plate", "channel",
                 "parameter", "value", "description")
SITES_COLUMNS = ("site_id", "n_cells", "infected_fraction", "severity",
                 "toxicity")


def _csv_text(columns: Sequence[str], rows: Iterable[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise",
                     lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({c: r.get(c, "") for c in columns})
  return buf.getvalue()


def _render_chunk(args) -> List[Tuple[int, dict]]:
  specs, root, size, nch, seed, compress_level, difficulty, cell_types = args
  out = []
  made = set()
  for spec in specs:
    img, truth = render_site(spec, size, nch, seed, difficulty, cell_types)
    for ch in range(nch):
      path = os.path.join(root, "images", spec.relpaths[ch])
      d = os.path.dirname(path)
      if d not in made:
        os.makedirs(d, exist_ok=True)
        made.add(d)
      buf = io.BytesIO()
      Image.fromarray(img[ch], mode="L").save(buf, format="PNG",
                                              compress_level=compress_level)
      gio.write_bytes(path, buf.getvalue())  # whole files, even if killed
    out.append((spec.index, truth))
  return out


def generate(output_dir: str, dataset: str = "rxrx19a", size: int = 256,
             plates: Union[None, int, Sequence[int]] = None, seed: int = 0,
             wells_per_plate: Optional[int] = None,
             experiments: int = 1, workers: Optional[int] = None,
             compress_level: int = 1, difficulty: str = "easy") -> str:
  """Writes a synthetic dataset tree and returns its root (OUTPUT/RxRx19a).

  Args:
    output_dir: parent directory; the tree goes to `output_dir/RxRx19a` or
      `output_dir/RxRx1`.
    dataset: "rxrx19a" or "rxrx1".
    size: site edge in pixels (the field of view is fixed; cells scale).
    plates: plates per experiment (int) or a list of plate numbers.
      Defaults: 2 (rxrx19a: 4 experiments x 2 plates x 48 wells x 4 sites =
      1,536 sites), 2 (rxrx1: 4 cell types x 2 plates x 24 wells x 2 sites).
    seed: everything is a deterministic function of the seed.
    wells_per_plate: defaults 48 (rxrx19a; 15 controls, 33 treated so two
      plates hold every compound x dose once) and 24 (rxrx1).
    experiments: RxRx1 only, experiments per cell type (the last is `test`).
    workers: processes (default: all cores; small jobs run in-process);
      the output does not depend on it.
    compress_level: PNG zlib level (1 is fast; files are still lossless).
    difficulty: "easy" (biology visible in per-channel intensities), "hard"
      or "hard2" (biology only in morphology and arrangement; every channel's
      intensity histogram matched to a class-independent target; see
      `designs.py`). Same layout, compounds and truth files.
  """
  dataset = dataset.lower()
  if dataset not in DATASET_DIRS:
    raise ValueError(f"dataset must be one of {sorted(DATASET_DIRS)}, got {dataset!r}")
  if size < 16:
    raise ValueError(f"size must be >= 16 pixels, got {size}")
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"difficulty must be one of {list(DIFFICULTIES)}, got "
                     f"{difficulty!r}")
  plate_nums = layout.plate_list(plates, 2)
  if dataset == "rxrx19a":
    rows, specs, truth, nch = layout.rxrx19a_layout(
        plate_nums, wells_per_plate or 48, seed, difficulty)
    cell_types = tuple(schema.RXRX19A_CELL_TYPES)
  else:
    rows, specs, truth, nch = layout.rxrx1_layout(
        plate_nums, wells_per_plate or 24, seed, experiments, difficulty)
    cell_types = tuple(schema.RXRX1_CELL_TYPES)
  root = os.path.join(output_dir, DATASET_DIRS[dataset])
  os.makedirs(os.path.join(root, "images"), exist_ok=True)

  chunk = 32
  tasks = [(specs[i:i + chunk], root, size, nch, seed, compress_level,
            difficulty, cell_types) for i in range(0, len(specs), chunk)]
  if workers is None:
    # Small jobs run inline: starting processes would cost more than it saves.
    small = len(specs) * size * size < 2_000_000
    workers = 1 if small else (os.cpu_count() or 1)
  workers = max(1, int(workers))
  results: List[Tuple[int, dict]] = []
  if workers == 1 or len(tasks) == 1:
    for t in tasks:
      results += _render_chunk(t)
  else:
    # spawn: safe even when the caller has already started JAX / TF threads.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
      for part in pool.imap_unordered(_render_chunk, tasks):
        results += part
  site_truth = dict(results)

  site_rows = []
  for r, spec in zip(rows, specs):
    t = site_truth[spec.index]
    site_rows.append(dict(site_id=r["site_id"], n_cells=t["n_cells"],
                          infected_fraction=round(t["infected_fraction"], 4),
                          severity=round(t["severity"], 4),
                          toxicity=round(t["toxicity"], 4)))
  for r in rows:
    if r.get("treatment_conc", None) not in (None, ""):
      r["treatment_conc"] = repr(float(r["treatment_conc"]))
  truth.append(dict(kind="generator", name="synthetic", parameter="size",
                    value=size, description=f"seed {seed}"))
  if difficulty != "easy":
    truth.append(dict(kind="generator", name="synthetic", parameter="difficulty",
                      value=difficulty, description="morphology-only design "
                      "of gandl_jax/data/synthetic/designs.py"))
  gio.write_text(os.path.join(root, schema.SYNTHETIC_TRUTH_FILE), _csv_text(TRUTH_COLUMNS, truth))
  gio.write_text(os.path.join(root, SITES_FILE), _csv_text(SITES_COLUMNS, site_rows))
  # metadata.csv last: its presence marks a complete tree.
  gio.write_text(os.path.join(root, "metadata.csv"),
                     _csv_text(schema.COLUMNS[dataset], rows))
  return root


def read_truth(root: str):
  """The planted truth as a pandas DataFrame (long format, see TRUTH_COLUMNS)."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  return pd.read_csv(os.path.join(root, schema.SYNTHETIC_TRUTH_FILE), dtype=str,
                     keep_default_na=False)


def compound_truth(root: str) -> Dict[str, dict]:
  """{compound: {"role": ..., "ec50_uM": ..., ...}} from synthetic_truth.csv."""
  df = read_truth(root)
  out: Dict[str, dict] = {}
  for r in df[df["kind"] == "compound"].itertuples():
    v = r.value
    try:
      v = float(v)
    except ValueError:
      pass
    out.setdefault(r.name, {})[r.parameter] = v
  return out
