"""Representation probe during training: how good are D's features now?

stylegan2-ada-pytorch tracks FID during training; GAN-DL's product is the
discriminator's embedding, so training tracks that instead. Every
`config.probe_every_kimg`:

1. D's features of a fixed probe set at every layer of
   `config.probe_layers` that the model has (one forward pass; 'fc', 'conv'
   and the pooled block outputs 'b8', 'b16', 'b32' by default) are computed
   with the current weights, data-parallel over the training mesh
   (`model.embed.data_parallel_layer_features`, the forward pass gandl-export
   uses, batch `config.batch_size`);
2. gandl-evaluate's linear-SVM protocol (`evaluate.classify.run_protocol`,
   plate-grouped split: whole plates held out; C searched over
   `PROBE_C_GRID`) is fitted for the control task
   (Mock vs Active SARS-CoV-2, per-plate normalized features, as
   gandl-evaluate's `control` task) and the cell-type task (HRCE vs VERO, raw
   features, as its `cell_model` task), on every layer;
3. the test balanced accuracies go to metrics.jsonl and TensorBoard per
   layer as `probe/control/<layer>`, `probe/cell_type/<layer>` and their mean
   `probe/score/<layer>`; those of `config.probe_layer` (the selection layer)
   also as `probe/control_bacc`, `probe/cell_type_bacc` and `probe/score`
   (the progress line). A new best score of any layer is checkpointed at
   once, its result recorded in the step's meta (`checkpoint_record`) and
   kept by the retention policy, so `gandl-export --step best [--layer L]`
   finds it.

The probe set is chosen from metadata only (sites.csv next to the shards):
untreated Mock and Active sites (the rows of gandl-evaluate's control task)
of the probe plates, at most `config.probe_sites`, spread evenly over the
(condition, cell type, plate) strata, drawn with `config.seed`. The probe
plates are `config.probe_plate_fraction` of each cell type's plates (at least
2 where it has them; `select_plates`): a checkpoint chosen by the probe was
chosen on them, so its meta lists them (`checkpoint_record`), gandl-export
writes the list into the embeddings' metadata, and gandl-evaluate scores the
control task on the other plates. The set is drawn from every site of the
shards (`config.data.filter` restricts training only) and recorded in
WORKDIR/probe_sites.csv (its plates are the probe plates); a resumed run
reads it back instead of drawing again.
The images are read once per process (one filtered pass over this host's
shards, at the first probe) and kept in host memory (sites x R x R x C bytes:
2,000 sites are 655 MB at 256x256, 10 MB at 32x32).

Several hosts: each host reads and embeds the probe sites of its own shards;
the features are gathered on every host, which all fit the same
deterministic SVMs (so every host agrees on the score and on which step to
checkpoint); only process 0 writes files.
"""
from __future__ import annotations

import math
import time
from concurrent import futures
from typing import Any, Dict, List, Mapping, Optional

import jax
import numpy as np
import pandas as pd
from absl import logging

from gandl_jax import checkpoint
from gandl_jax import config as config_lib
from gandl_jax import io as gio
from gandl_jax import schema
from gandl_jax import sharding
from gandl_jax.data import pipeline
from gandl_jax.evaluate import classify, normalize, tasks
from gandl_jax.model import embed as embed_lib
from gandl_jax.model import networks

PROBE_SITES_FILE = "probe_sites.csv"
# The selection layer's results (config.probe_layer).
CONTROL = "probe/control_bacc"
CELL_TYPE = "probe/cell_type_bacc"
SCORE = "probe/score"
SECONDS = "probe/seconds"
EMBED_SECONDS = "probe/embed_seconds"
SITES = "probe/sites"
PLATES = "probe/plates"
# Every probed layer's results: `layer_key(TASK, layer)`.
TASKS = ("control", "cell_type", "score")


def layer_key(task: str, layer: str) -> str:
  """The metrics key of `task` ('control', 'cell_type' or 'score') on D's
  `layer`: 'probe/<task>/<layer>'."""
  return f"probe/{task}/{layer}"

# Columns of probe_sites.csv (site_id first; the rest is what the tasks read).
COLUMNS = ("site_id", "well_id", "cell_type", "experiment", "plate",
           "disease_condition")


# --------------------------------------------------------------------------
# The probe set (metadata only).


def _allocate(sizes: np.ndarray, n: int, rng: np.random.Generator
              ) -> np.ndarray:
  """Sites per stratum: as equal as the strata sizes allow, summing to
  min(n, sizes.sum()) (water-filling; the last few go to random strata)."""
  sizes = np.asarray(sizes, np.int64)
  if sizes.sum() <= n:
    return sizes.copy()
  lo, hi = 0, int(sizes.max())
  while lo < hi:                      # largest level L with sum(min(s, L)) <= n
    mid = (lo + hi + 1) // 2
    if np.minimum(sizes, mid).sum() <= n:
      lo = mid
    else:
      hi = mid - 1
  take = np.minimum(sizes, lo)
  rest = n - int(take.sum())
  open_ = np.flatnonzero(sizes > lo)
  take[rng.permutation(open_)[:rest]] += 1
  return take


MIN_PLATES_PER_CELL_TYPE = 2


def select_plates(rows: pd.DataFrame, fraction: float, seed: int
                  ) -> List[str]:
  """The probe plates among `rows`' plates (`normalize.plate_keys`):
  `fraction` of each cell type's plates, rounded up, at least
  `MIN_PLATES_PER_CELL_TYPE` (all of them when it has fewer), drawn with
  `seed`. A pure function of the plates present (not of row order); sorted.
  """
  plates = pd.Series(normalize.plate_keys(rows), index=rows.index)
  cell = rows["cell_type"].astype(str)
  rng = np.random.default_rng([int(seed), 0x91a7e])
  chosen: List[str] = []
  for ct in sorted(cell.unique()):
    keys = np.array(sorted(plates[cell == ct].unique()))
    k = max(MIN_PLATES_PER_CELL_TYPE, math.ceil(float(fraction) * len(keys)))
    chosen.extend(keys[rng.permutation(len(keys))[:min(k, len(keys))]])
  return sorted(chosen)


def plates_of(sites: pd.DataFrame) -> List[str]:
  """The plates (`normalize.plate_keys`) of the probe sites, sorted."""
  return sorted(set(normalize.plate_keys(sites).tolist()))


def select_sites(table: pd.DataFrame, max_sites: int, seed: int,
                 plate_fraction: float = 1.0) -> pd.DataFrame:
  """The probe set from a sites.csv frame: untreated Mock / Active sites of
  the probe plates (`select_plates` with `plate_fraction`; 1: every plate),
  at most `max_sites`, spread evenly over (condition, cell type, plate).

  A pure function of (table, max_sites, seed, plate_fraction); rows come back
  in table order with the `COLUMNS`. Raises ValueError when the table has no
  such site.
  """
  missing = [c for c in COLUMNS + ("treatment",) if c not in table]
  if missing:
    raise ValueError(
        f"the representation probe needs the RxRx19a metadata column(s) "
        f"{missing}, which these shards' sites.csv lacks; train with "
        f"--config.probe_every_kimg=0 to turn the probe off")
  try:
    sel = tasks.control_rows(table, "probe")
  except classify.TaskError as e:
    raise ValueError(f"{e}; train with --config.probe_every_kimg=0 to turn "
                     f"the probe off") from None
  rows = table[sel]
  if plate_fraction < 1:
    keep = select_plates(rows, plate_fraction, seed)
    rows = rows[np.isin(normalize.plate_keys(rows), keep)]
  plates = normalize.plate_keys(rows)
  keys = (rows["disease_condition"].astype(str) + "|" +
          rows["cell_type"].astype(str) + "|" + pd.Series(plates, rows.index))
  strata = sorted(keys.unique())
  rng = np.random.default_rng([int(seed), 0x9e0be])
  sizes = np.array([(keys == k).sum() for k in strata])
  take = _allocate(sizes, int(max_sites), rng)
  chosen: List[Any] = []
  for k, t in zip(strata, take):
    ids = rows.loc[keys == k, "site_id"].astype(str)
    order = np.argsort(ids.to_numpy(), kind="stable")   # independent of row order
    pick = rng.permutation(len(ids))[:t]
    chosen.extend(ids.index[order[pick]])
  out = table.loc[sorted(chosen, key=table.index.get_loc), list(COLUMNS)]
  return out.reset_index(drop=True)


def write_sites(path: str, sites: pd.DataFrame) -> None:
  gio.atomic_write(path, lambda f: sites.to_csv(f, index=False))


def read_sites(path: str) -> pd.DataFrame:
  """probe_sites.csv as written by `write_sites` (typed like sites.csv)."""
  import io as std_io  # pylint: disable=import-outside-toplevel
  df = pd.read_csv(std_io.StringIO(gio.read_text(path)), dtype=str,
                   keep_default_na=False)
  missing = [c for c in COLUMNS if c not in df]
  if missing or not len(df):
    raise ValueError(f"{path}: expected a non-empty CSV with columns "
                     f"{list(COLUMNS)}, missing {missing}; delete it to draw "
                     f"a new probe set")
  df["plate"] = df["plate"].astype(np.int64)
  return df


def probe_sites(workdir: str, data: str, max_sites: int, seed: int,
                plate_fraction: float = 1.0) -> pd.DataFrame:
  """WORKDIR/probe_sites.csv if present (a resumed run), else a new draw
  from `data`'s sites.csv, written there by process 0."""
  path = gio.join(workdir, PROBE_SITES_FILE)
  if gio.exists(path):
    return read_sites(path)
  try:
    sites = select_sites(pipeline.read_sites_index(data), max_sites, seed,
                         plate_fraction)
  except ValueError as e:
    raise ValueError(f"{data}: {e}") from None
  if jax.process_index() == 0:
    gio.makedirs(workdir)
    write_sites(path, sites)
  return sites


# --------------------------------------------------------------------------
# The linear probes (numpy; the evaluation protocol).


# gandl-evaluate's protocol, C searched over the lower part of its grid:
# C = 1 on near-separable 512-d features takes liblinear ~10x longer than
# C <= 0.1 (tools/bench_probe.py) and the probe runs hundreds of times.
PROBE_C_GRID = (1e-3, 1e-2, 1e-1)


def protocol(seed: int) -> classify.ProtocolConfig:
  """The probe's SVM protocol (gandl-evaluate's, `PROBE_C_GRID`)."""
  return classify.ProtocolConfig(seed=int(seed), c_grid=PROBE_C_GRID)


def scores(X: np.ndarray, meta: pd.DataFrame,
           cfg: classify.ProtocolConfig = protocol(0)) -> Dict[str, Any]:
  """Plate-split test balanced accuracies of the two tasks on features `X`
  of the probe sites `meta` ({CONTROL, CELL_TYPE, SCORE}; a task that cannot
  run is NaN with its reason under 'reasons')."""
  out = layer_scores({"": X}, meta, cfg)
  return {CONTROL: out[layer_key("control", "")],
          CELL_TYPE: out[layer_key("cell_type", "")],
          SCORE: out[layer_key("score", "")],
          "reasons": {({"control": CONTROL, "cell_type": CELL_TYPE}[
              k.split("/")[1]]): v for k, v in out["reasons"].items()}}


def layer_scores(features: Mapping[str, np.ndarray], meta: pd.DataFrame,
                 cfg: classify.ProtocolConfig = protocol(0)
                 ) -> Dict[str, Any]:
  """`scores` of every layer's features ({layer: X}) of the probe sites
  `meta`: {layer_key(task, layer): value}, a task that cannot run NaN with
  its reason under 'reasons' (by key). The fits run side by side on host
  threads (liblinear runs without the GIL)."""
  plates = normalize.plate_keys(meta)
  cond = meta["disease_condition"].astype(str).to_numpy()
  cell = meta["cell_type"].astype(str).to_numpy()
  jobs = []
  for layer, X in features.items():
    # Control task on per-plate normalized features (reference: every probe
    # site of the plate; all are untreated controls).
    Xn, _ = normalize.plate_normalize(X, plates, np.ones(len(X), bool))
    jobs.append((layer_key("control", layer), Xn, cond,
                 [schema.ACTIVE, schema.MOCK], schema.ACTIVE))
    jobs.append((layer_key("cell_type", layer), X, cell, sorted(set(cell)),
                 None))

  def one(key, feats, y, classes, positive):
    try:
      if len(classes) < 2:
        raise classify.TaskError(f"only {classes} among the probe sites")
      classify.check_classes(y, classes, key, cfg.min_per_class)
      fit = classify.run_protocol(feats, y, classes, cfg, split="plate",
                                  groups=plates, task=key, positive=positive)
      return fit.metrics["balanced_accuracy"], None
    except classify.TaskError as e:
      return math.nan, str(e)

  with futures.ThreadPoolExecutor(min(len(jobs), 4)) as pool:
    results = list(pool.map(lambda job: one(*job), jobs))
  out: Dict[str, Any] = {"reasons": {}}
  for (key, *_), (value, reason) in zip(jobs, results):
    out[key] = value
    if reason is not None:
      out["reasons"][key] = reason
  for layer in features:
    done = [out[layer_key(t, layer)] for t in ("control", "cell_type")
            if math.isfinite(out[layer_key(t, layer)])]
    out[layer_key("score", layer)] = (float(np.mean(done)) if done
                                      else math.nan)
  return out


# --------------------------------------------------------------------------
# The tracker the training loop drives.


class Tracker:
  """Runs the probe every `every` iterations (0: never) and remembers the
  best score of every layer (for the checkpoint decision)."""

  def __init__(self, config: Any, workdir: str, mesh: Any,
               D: networks.Discriminator, every: int):
    self.every = int(every) if config.probe_every_kimg > 0 else 0
    self.best = -math.inf           # the selection layer's (probe/score)
    self.layer_best: Dict[str, float] = {}
    self.layers: List[str] = []
    self.plates: List[str] = []
    self._batches: Optional[List[Dict[str, np.ndarray]]] = None
    self._warned = set()
    if not self.every:
      return
    self.mesh, self.data = mesh, config.data.path
    self.batch = int(config.batch_size)
    self.layer = str(config.probe_layer)
    resolution = int(config.model.resolution)
    try:
      networks.check_embedding_layer(self.layer, resolution)
    except ValueError as e:
      raise ValueError(f"config.probe_layer: {e}") from None
    names = config_lib.probe_layer_names(config)
    have = networks.embedding_layers(resolution)
    self.layers = [n for n in names if n in have]
    if len(self.layers) < len(names):
      logging.info("probe: layer(s) %s not in a %dx%d model; not probed",
                   ", ".join(n for n in names if n not in have), resolution,
                   resolution)
    sharding.check_batch(self.batch, mesh.devices.size, jax.process_count(),
                         int(config.model.mbstd_group_size),
                         name="config.batch_size (probe)")
    self.cfg = protocol(config.seed)
    try:
      self.sites = probe_sites(workdir, self.data, int(config.probe_sites),
                               int(config.seed),
                               float(config.get("probe_plate_fraction", 1.0)))
    except ValueError as e:
      logging.warning("probe off: %s", e)
      self.every = 0
      return
    self.plates = plates_of(self.sites)
    self._embed = embed_lib.data_parallel_layer_features(D, mesh,
                                                         self.layers)
    logging.info("probe: %d sites (%s) of %d plates, layers %s (selection: "
                 "%s), every %d iterations",
                 len(self.sites), ", ".join(
                     f"{k} {v}" for k, v in self.sites.groupby(
                         ["cell_type", "disease_condition"]).size().items()),
                 len(self.plates), ", ".join(self.layers), self.layer,
                 self.every)

  @property
  def enabled(self) -> bool:
    return self.every > 0

  def due(self, step: int) -> bool:
    return self.enabled and step % self.every == 0

  def _load(self) -> None:
    """This host's probe images, read once (uint8 host batches)."""
    ids = self.sites["site_id"].astype(str).tolist()
    table = pipeline.read_sites_index(self.data)
    known = set(table["site_id"].astype(str))
    absent = [s for s in ids if s not in known]
    if absent:
      raise ValueError(
          f"probe_sites.csv lists {len(absent)} site(s) that are not in "
          f"{self.data} (e.g. {absent[0]!r}): the shards changed since the "
          f"run started; delete WORKDIR/{PROBE_SITES_FILE} to draw a new set")
    row = pd.Series(np.arange(len(table)), index=table["site_id"].astype(str))
    self._order = row[ids].to_numpy()     # sites.csv row of each probe site
    it, _ = pipeline.eval_host_batches(
        self.data, host_batch=sharding.host_batch_size(self.batch),
        filter={"site_id": ids}, process_index=jax.process_index(),
        process_count=jax.process_count())
    self._batches = [{k: b[k] for k in ("image", "index")} for b in it]

  def layer_features(self, d_params: Any) -> Dict[str, np.ndarray]:
    """{layer: (probe sites, F) features} in probe_sites.csv order, on every
    host, from one forward pass per batch."""
    if self._batches is None:
      self._load()
    variables = {"params": d_params}
    xs: Dict[str, List[np.ndarray]] = {layer: [] for layer in self.layers}
    idx = []
    pending = None
    for b in self._batches + [None]:   # one batch in flight while one is read
      out = None if b is None else self._embed(
          variables, sharding.host_to_global(b["image"], self.mesh))
      if pending is not None:
        for layer in self.layers:
          xs[layer].append(pipeline.host_rows(pending[0][layer], self.mesh))
        idx.append(pending[1]["index"])
      pending = None if b is None else (out, b)
    index = np.concatenate(idx)
    feats = {layer: np.concatenate(v) for layer, v in xs.items()}
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      feats = {layer: np.asarray(multihost_utils.process_allgather(X)).reshape(
          -1, X.shape[1]) for layer, X in feats.items()}
      index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
    keep = index >= 0
    by_row = dict(zip(index[keep].tolist(), np.flatnonzero(keep).tolist()))
    order = [by_row[int(r)] for r in self._order]
    return {layer: X[order] for layer, X in feats.items()}

  def features(self, d_params: Any) -> np.ndarray:
    """The selection layer's (probe sites, F) features (`layer_features`)."""
    return self.layer_features(d_params)[self.layer]

  def run(self, d_params: Any, step: int) -> Dict[str, float]:
    """The probe metrics at `step` (D parameters `d_params`)."""
    t0 = time.monotonic()
    feats = self.layer_features(d_params)
    t1 = time.monotonic()
    result = layer_scores(feats, self.sites, self.cfg)
    for key, reason in result.pop("reasons").items():
      if key not in self._warned:
        self._warned.add(key)
        logging.warning("probe: %s cannot be computed: %s", key, reason)
    for legacy, task in ((CONTROL, "control"), (CELL_TYPE, "cell_type"),
                         (SCORE, "score")):
      result[legacy] = result[layer_key(task, self.layer)]
    result.update({SECONDS: time.monotonic() - t0, EMBED_SECONDS: t1 - t0,
                   SITES: float(len(self.sites)),
                   PLATES: float(len(self.plates))})
    del step
    return result

  def maybe_run(self, d_params: Any, step: int) -> Dict[str, float]:
    return self.run(d_params, step) if self.due(step) else {}

  def new_best(self, metrics: Mapping[str, float]) -> bool:
    """True (and remembered) when `metrics` hold a better score of some
    layer than any before (strictly: the earliest of equal scores is the one
    saved); `best` follows the selection layer's `SCORE`."""
    better = False
    for layer in self.layers:
      score = metrics.get(layer_key("score", layer), math.nan)
      if math.isfinite(score) and score > self.layer_best.get(layer,
                                                              -math.inf):
        self.layer_best[layer] = score
        better = True
    score = metrics.get(SCORE, math.nan)
    if math.isfinite(score) and score > self.best:
      self.best = score
      better = True
    return better


def read_curve(workdir: str) -> List[Dict[str, Any]]:
  """The probe's curve of a run: one dict per probed step of
  WORKDIR/metrics.jsonl with `step`, `kimg`, ADA's `augment_p` (None when
  off) and every finite probe/* metric; a step logged twice (a resumed run
  repeating it) keeps its last line. [] without metrics or probe."""
  import json  # pylint: disable=import-outside-toplevel
  path = gio.join(workdir, "metrics.jsonl")
  by_step: Dict[int, Dict[str, Any]] = {}
  if not gio.exists(path):
    return []
  for line in gio.read_text(path).splitlines():
    rec = json.loads(line) if line.strip() else {}
    values = {k: v for k, v in rec.items()
              if k.startswith("probe/") and isinstance(v, (int, float))
              and math.isfinite(v)}
    if values:
      by_step[rec["step"]] = dict(values, step=rec["step"],
                                  kimg=rec.get("progress/kimg"),
                                  augment_p=rec.get("augment_p"))
  return [by_step[s] for s in sorted(by_step)]


def curve_lines(curve: List[Dict[str, Any]]) -> List[str]:
  """A markdown table of `read_curve`: kimg, the selection layer's control
  (Mock/Active) and cell-type balanced accuracies on the probe plates, and
  ADA's p where it ran."""
  with_p = any(r.get("augment_p") is not None for r in curve)
  head = "| kimg | Mock/Active | HRCE/VERO |" + (" ADA p |" if with_p else "")
  lines = [head, "|---:|---:|---:|" + ("---:|" if with_p else "")]
  for r in curve:
    cells = [f"{r['kimg']:.2f}" if r.get("kimg") is not None else "n/a"]
    cells += [f"{r[k]:.3f}" if k in r else "n/a" for k in (CONTROL, CELL_TYPE)]
    if with_p:
      p = r.get("augment_p")
      cells.append("n/a" if p is None else f"{p:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _finite(value: Any) -> Optional[float]:
  return float(value) if math.isfinite(value) else None


def checkpoint_record(metrics: Mapping[str, float],
                      tracker: Optional[Tracker] = None) -> Dict[str, Any]:
  """{'probe': {...}} for a checkpoint's meta when `metrics` hold a probe
  result, else {}: 'score', 'control_bacc', 'cell_type_bacc' (the selection
  layer's), and with the `tracker`: 'layer' (the selection layer), 'layers'
  ({layer: {'score', 'control_bacc', 'cell_type_bacc'}}) and 'plates' (the
  probe plates: a checkpoint chosen by these scores was chosen on them).
  """
  if SCORE not in metrics:
    return {}
  record: Dict[str, Any] = {
      k.split("/", 1)[1]: _finite(metrics[k])
      for k in (SCORE, CONTROL, CELL_TYPE) if k in metrics}
  if tracker is not None and tracker.layers:
    record["layer"] = tracker.layer
    record["layers"] = {
        layer: {name: _finite(metrics[layer_key(task, layer)])
                for task, name in (("score", "score"),
                                   ("control", "control_bacc"),
                                   ("cell_type", "cell_type_bacc"))
                if layer_key(task, layer) in metrics}
        for layer in tracker.layers}
    record["plates"] = list(tracker.plates)
  return {checkpoint.PROBE_META: record}
