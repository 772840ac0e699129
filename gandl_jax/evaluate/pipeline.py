"""`evaluate(...)`: load, post-process, run the tasks, write the report.

One or two embeddings sets (the second, `baseline`, side by side: e.g. a
random-init discriminator, or Recursion's published embeddings) go through the
same post-processing and tasks; RxRx1 embeddings, when given, feed the
zero-shot cell-type task. Each task's failure (bad input, absent classes) is
recorded with its reason and the other tasks still run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd

from absl import logging

from gandl_jax.evaluate import (classify, dose_response, normalize, plots,
                                report, retrieval, tasks as task_lib,
                                truth as truth_lib)
from gandl_jax.evaluate.io import Embeddings, TableSpec, load_embeddings
from gandl_jax import io as gio
from gandl_jax import schema

EmbeddingsInput = Union[str, Sequence[str], Embeddings]


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
  """One more embeddings set evaluated side by side with the first (e.g.
  classical features, an untrained D, a DenseNet baseline). `metadata`
  defaults to the first set's; `rxrx1` feeds its zero-shot task."""
  name: str
  embeddings: EmbeddingsInput
  rxrx1: Optional[EmbeddingsInput] = None
  metadata: Optional[Union[str, pd.DataFrame]] = None


@dataclasses.dataclass(frozen=True)
class Options:
  """Post-processing and task settings (defaults: the paper's protocol)."""
  # One of NORMALIZATIONS; `normalize=False` is the old spelling of "none".
  normalization: str = "plate"
  normalize: bool = True
  min_controls: int = 8             # fewer control sites: use all wells
  tvn_batch: str = "plate"          # TVN's CORAL step per "plate"/"experiment"
  tvn_shrinkage: Optional[float] = None   # None: Ledoit-Wolf
  whiten: bool = False              # PCA whitening fitted on control sites
  whiten_components: Optional[int] = None
  aggregate: str = "site"           # "site" or "well" (mean of sites)
  # Features for the cell-type tasks (cell_model, rxrx1): "raw" = before
  # per-plate normalization, which centers every plate on its own controls and
  # so erases cell-type means (each plate holds one cell type); "normalized" =
  # the same post-processed features as the other tasks.
  cell_type_features: str = "raw"
  protocol: classify.ProtocolConfig = classify.ProtocolConfig()
  fit: dose_response.FitConfig = dose_response.FitConfig()
  hit_threshold: float = 0.5
  top_compounds: int = 6            # dose-response plots / table rows
  table_rows: int = 15
  projection_points: int = 15_000
  retrieval: retrieval.RetrievalConfig = retrieval.RetrievalConfig()
  # Methods trained per task on the tasks' training parts (they see labels),
  # evaluated on the rows and splits of the first embeddings set: objects
  # with `name`, `prepare(log)`, `evaluate(primary, wanted, options, log,
  # run_task) -> results` and `note(results) -> markdown`, e.g.
  # `gandl_jax.baselines.collapsed.CollapsedMethod`.
  per_task: Tuple[Any, ...] = ()
  # Threads running independent task groups side by side (control ->
  # dose-response -> truth, the retrieval metrics, the SVM splits, the
  # projection) and the per-plate normalization; None: one per CPU core, at
  # most MAX_THREADS; 1: one after another. The results are the same for
  # any number; memory grows with it (2 threads at RxRx19a size: 3.4 GB
  # peak against 2.8 GB on one).
  threads: Optional[int] = None


NORMALIZATIONS = ("plate", "robust_plate", "tvn", "none")
# Options.threads=None: one thread per CPU core, at most this many (there
# are at most 7 task groups, and each holds its own copies of the rows).
MAX_THREADS = 4


def thread_count(threads: Optional[int]) -> int:
  """Threads for `Options.threads` (None: one per core, at most
  MAX_THREADS)."""
  if threads is None:
    return min(os.cpu_count() or 1, MAX_THREADS)
  if threads < 1:
    raise ValueError(f"threads must be >= 1, got {threads}")
  return threads


def normalization_method(opts: Options) -> str:
  method = opts.normalization if opts.normalize else "none"
  if method not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got "
                     f"{method!r}")
  return method


def _load(x: EmbeddingsInput, metadata, log,
          spec: Optional[TableSpec] = None) -> Tuple[Embeddings, bool]:
  """(embeddings, owned) - owned arrays may be modified in place."""
  if isinstance(x, Embeddings):
    if metadata is not None:
      from gandl_jax.evaluate.io import join_metadata, read_metadata
      md = read_metadata(metadata) if isinstance(metadata, str) else metadata
      return join_metadata(x, md, str(metadata) if isinstance(metadata, str)
                           else "metadata"), False
    return x, False
  t = time.time()
  emb = load_embeddings(x, metadata, spec)
  log(f"loaded {emb.source}: {len(emb.meta)} rows x {emb.dim} features "
      f"({time.time() - t:.1f}s)")
  return emb, True


def postprocess(emb: Embeddings, opts: Options, owned: bool
                ) -> Tuple[Embeddings, Dict]:
  """Per-plate normalization, optional whitening and well aggregation."""
  info: Dict = {}
  X = emb.features
  meta = emb.meta
  parts = []
  method = normalization_method(opts)
  ctrl_desc = ("well_type == negative_control" if "well_type" in meta
               else "untreated sites (empty treatment)")
  if method in ("plate", "robust_plate"):
    try:
      plates = normalize.plate_keys(meta)
      ctrl = normalize.control_mask(meta)
      if method == "plate":
        X, pinfo = normalize.plate_normalize(
            X, plates, ctrl, opts.min_controls, inplace=owned,
            threads=thread_count(opts.threads))
      else:
        X, pinfo = normalize.robust_plate_normalize(
            X, plates, ctrl, opts.min_controls, inplace=owned)
      info["plate_normalization"] = {
          "method": ("mean / standard deviation" if method == "plate" else
                     "median / MAD (x 1.4826, + 1e-18; pycytominer "
                     "mad_robustize)"),
          "plates": pinfo.plates, "control_sites": pinfo.control_sites,
          "plates_normalized_by_all_wells": len(pinfo.fallback_plates),
          "fallback_plates": pinfo.fallback_plates[:20],
          "controls": ctrl_desc}
      parts.append(f"per-plate {'robust ' if method != 'plate' else ''}"
                   f"({pinfo.plates} plates, {len(pinfo.fallback_plates)} by "
                   f"all wells)")
    except ValueError as e:
      info["plate_normalization"] = {"status": "skipped", "reason": str(e)}
      parts.append("no plate normalization")
  elif method == "tvn":
    try:
      batches = normalize.batch_keys(meta, opts.tvn_batch)
      ctrl = normalize.control_mask(meta)
      X, tinfo = normalize.tvn(X, batches, ctrl, opts.whiten_components,
                               opts.tvn_shrinkage, opts.min_controls,
                               seed=opts.protocol.seed, inplace=owned)
      sh = list(tinfo.shrinkage.values())
      info["tvn"] = {
          "components": tinfo.components, "batch": opts.tvn_batch,
          "batches": tinfo.batches, "fit_rows": tinfo.fit_rows,
          "controls": ctrl_desc,
          "shrinkage": ("Ledoit-Wolf" if opts.tvn_shrinkage is None
                        else opts.tvn_shrinkage),
          "shrinkage_range": [min(sh), max(sh)],
          "batches_aligned_by_all_rows": len(tinfo.fallback_batches),
          "fallback_batches": tinfo.fallback_batches[:20]}
      parts.append(f"TVN ({tinfo.components} comps, CORAL per "
                   f"{opts.tvn_batch}, {tinfo.batches} batches)")
    except ValueError as e:
      info["tvn"] = {"status": "skipped", "reason": str(e)}
      parts.append("no TVN")
  if opts.whiten:
    ctrl = normalize.control_mask(meta)
    fit_rows = X[ctrl] if ctrl.sum() >= 2 else X
    w = normalize.fit_whitening(fit_rows, opts.whiten_components,
                                seed=opts.protocol.seed)
    X = w.transform(X)
    info["whitening"] = {"components": int(w.components.shape[1]),
                         "fitted_on": ("control sites" if ctrl.sum() >= 2
                                       else "all sites (no controls)"),
                         "fit_rows": int(min(len(fit_rows), 100_000))}
    parts.append(f"PCA whitening ({w.components.shape[1]} comps)")
  if opts.aggregate == "well":
    meta, X = normalize.aggregate_wells(meta, X)
    info["aggregation"] = {"level": "well", "wells": int(len(meta))}
    parts.append(f"well means ({len(meta)} wells)")
  elif opts.aggregate != "site":
    raise ValueError(f"aggregate must be 'site' or 'well', got {opts.aggregate!r}")
  info["summary"] = ", ".join(parts) or "none"
  return Embeddings(meta, X, emb.source, emb.issues, emb.file_metadata), info


def _run_task(results: Dict, name: str, fn: Callable, log, timing: Dict):
  t = time.time()
  cpu = time.thread_time()
  try:
    out = fn()
    val = out[0] if isinstance(out, tuple) else out
    results[name] = {"status": "ok", **(val.summary if hasattr(val, "summary")
                                         else val)}
    # CPU of this thread (not of BLAS's or of other tasks' threads).
    log(f"  {name}: ok ({time.time() - t:.1f}s, "
        f"{time.thread_time() - cpu:.1f} CPU s)")
    return out
  except (classify.TaskError, ValueError, KeyError) as e:
    results[name] = {"status": "failed", "reason": str(e)}
    log(f"  {name}: FAILED: {e}")
  except Exception as e:  # pylint: disable=broad-except
    results[name] = {"status": "failed",
                     "reason": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc(limit=4)}
    log(f"  {name}: FAILED: {type(e).__name__}: {e}")
  finally:
    timing[name] = round(time.time() - t, 2)
  return None


class _Once:
  """A computation run once, by whoever asks first: a worker thread of
  `run_side_by_side` or a task that needs its result (which then waits for
  a worker already running it, or runs it itself: no thread ever waits for
  work that no thread has started)."""

  def __init__(self, fn: Callable[[], Any]):
    self._fn = fn
    self._lock = threading.Lock()
    self._done = False
    self._value: Any = None
    self._error: Optional[BaseException] = None

  def __call__(self) -> Any:
    with self._lock:
      if not self._done:
        try:
          self._value = self._fn()
        except BaseException as e:  # pylint: disable=broad-except
          self._error = e
        self._done = True
        self._fn = None
    if self._error is not None:
      raise self._error
    return self._value

  def run_quietly(self) -> None:
    """Runs it (for a worker): a failure is raised to whoever uses it."""
    try:
      self()
    except Exception:  # pylint: disable=broad-except
      pass


def run_side_by_side(fns: Sequence[Callable[[], None]],
                     threads: Optional[int] = None) -> None:
  """Runs `fns` on `threads` threads (None: `thread_count`), in the order
  given when one thread; waits for all, then re-raises the first failure
  in the order given."""
  threads = min(thread_count(threads), len(fns))
  if threads > 1:
    _import_shared_modules()
  if threads <= 1:
    for fn in fns:
      fn()
    return
  # `warnings.catch_warnings` (used by the tasks and scikit-learn) is not
  # thread-safe: whatever the threads leave in the filters is undone here.
  # BLAS on one thread: the task threads fill the cores already, and
  # OpenBLAS's own threads, waiting for work between calls, spin (4 of 55
  # CPU s at RxRx19a size on 2 cores). The tasks' BLAS work is matrix
  # products, whose threads split the rows and columns, not the sums: the
  # same numbers (all six tasks at RxRx19a size compared equal).
  with warnings.catch_warnings(), normalize.single_thread_blas(), \
      concurrent.futures.ThreadPoolExecutor(
          threads, thread_name_prefix="gandl-evaluate") as pool:
    futures = [pool.submit(fn) for fn in fns]
    concurrent.futures.wait(futures)
  for f in futures:
    f.result()


def _import_shared_modules() -> None:
  """Imports, in this thread, the modules that the tasks' libraries import
  lazily and others look up in `sys.modules`: scikit-learn checks whether
  an input is a polars frame once "polars" is in `sys.modules`, and a
  polars that duckdb (under copairs) is importing on another thread is
  there half initialized (AttributeError)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  for name in ("polars",):
    if name not in sys.modules and importlib.util.find_spec(name) is not None:
      importlib.import_module(name)


# metrics.json keeps one order of tasks and timings whatever ran first.
_TASK_ORDER = ("control", "cell_model", "dose_response", "truth", "activity",
               "consistency", "replicates", "rxrx1")
_TIMING_ORDER = ("load", "postprocess", "control", "cell_model",
                 "dose_response", "truth", "retrieval_profiles", "activity",
                 "consistency", "replicates", "projection", "rxrx1", "total")


def _ordered(d: Dict, order: Sequence[str]) -> Dict:
  """`d` with the keys of `order` first, in that order, then the others."""
  out = {k: d[k] for k in order if k in d}
  out.update((k, v) for k, v in d.items() if k not in out)
  return out


def _find_truth(candidates: Sequence[Optional[str]]) -> Optional[str]:
  for c in candidates:
    if not c or not isinstance(c, str):
      continue
    d = c if os.path.isdir(c) else os.path.dirname(os.path.abspath(c.split(",")[0]))
    p = os.path.join(d, schema.SYNTHETIC_TRUTH_FILE)
    if os.path.exists(p):
      return p
  return None


def _evaluate_set(name: str, emb_in: EmbeddingsInput, metadata,
                  rx1_in, rx1_meta, wanted: Sequence[str], truth_df,
                  truth_err: Optional[str], compounds: Sequence[str],
                  opts: Options, out_dir: str, log,
                  spec: Optional[TableSpec] = None) -> Tuple[Dict, Dict]:
  """Runs every wanted task on one embeddings set; returns (metrics, extras)."""
  timing: Dict = {}
  res: Dict = {"tasks": {}, "timing_s": timing}
  extras: Dict = {}
  t0 = time.time()
  emb, owned = _load(emb_in, metadata, log, spec)
  timing["load"] = round(time.time() - t0, 2)
  if opts.cell_type_features not in ("raw", "normalized"):
    raise ValueError(f"cell_type_features must be 'raw' or 'normalized', got "
                     f"{opts.cell_type_features!r}")
  raw_ct = opts.cell_type_features == "raw"
  raw_sub, raw_err = None, None
  if task_lib.CELL_MODEL in wanted and raw_ct:
    try:
      raw_sub = emb.subset(task_lib.control_rows(emb.meta, task_lib.CELL_MODEL))
      if opts.aggregate == "well":
        m, x = normalize.aggregate_wells(raw_sub.meta, raw_sub.features)
        raw_sub = Embeddings(m, x, raw_sub.source)
    except (classify.TaskError, ValueError) as e:
      raw_err = str(e)
  t = time.time()
  emb, pp = postprocess(emb, opts, owned)
  timing["postprocess"] = round(time.time() - t, 2)
  res["input"] = {"source": emb.source, "rows": int(len(emb.meta)),
                  "dim": emb.dim, "issues": emb.issues,
                  "file_metadata": emb.file_metadata}
  res["postprocessing"] = pp
  T = res["tasks"]
  cfg = opts.protocol
  # The SVM splits that do not feed dose-response are jobs of their own, so
  # that the threads stay busy; each task still reports both its splits.
  split_jobs: Dict[Tuple[str, str], _Once] = {}
  if task_lib.CONTROL in wanted or task_lib.DOSE_RESPONSE in wanted:
    split_jobs[task_lib.CONTROL, "plate"] = _Once(
        lambda: task_lib.classification_split(emb, task_lib.CONTROL, cfg,
                                              "plate"))
  if task_lib.CELL_MODEL in wanted and raw_err is None:
    for split in task_lib.SPLITS:
      split_jobs[task_lib.CELL_MODEL, split] = _Once(
          lambda split=split: task_lib.classification_split(
              raw_sub if raw_ct else emb, task_lib.CELL_MODEL, cfg, split))

  def _splits(task):
    return {s: j for (t, s), j in split_jobs.items() if t == task}

  def _classification_chain():
    fitted = None
    if task_lib.CONTROL in wanted or task_lib.DOSE_RESPONSE in wanted:
      out = _run_task(T, task_lib.CONTROL,
                      lambda: task_lib.control_classification(
                          emb, cfg, _splits(task_lib.CONTROL)), log, timing)
      fitted = out[1] if out else None
    if task_lib.DOSE_RESPONSE in wanted:
      if fitted is None:
        T[task_lib.DOSE_RESPONSE] = {
            "status": "failed",
            "reason": "needs the control classifier: " +
                      T.get(task_lib.CONTROL, {}).get("reason", "not run")}
      else:
        dr = _run_task(T, task_lib.DOSE_RESPONSE,
                       lambda: task_lib.dose_response_task(
                           emb, fitted, opts.fit, opts.hit_threshold,
                           compounds, opts.table_rows), log, timing)
        if dr is not None:
          extras["dose"] = dr
          safe = _safe(name)
          for kind, df in (("fits", dr.fits), ("points", dr.points)):
            p = os.path.join(out_dir, f"dose_response_{kind}_{safe}.csv")
            gio.atomic_write(p, lambda f, df=df: df.to_csv(f, index=False))
          T[task_lib.DOSE_RESPONSE]["files"] = [
              f"dose_response_fits_{safe}.csv",
              f"dose_response_points_{safe}.csv"]
    if task_lib.TRUTH in wanted:
      if truth_df is None:
        T[task_lib.TRUTH] = {
            "status": "skipped" if truth_err is None else "failed",
            "reason": truth_err or f"no {schema.SYNTHETIC_TRUTH_FILE} given "
                      f"or found next to the metadata / embeddings"}
      elif "dose" not in extras:
        T[task_lib.TRUTH] = {
            "status": "failed", "reason": "needs dose-response: " +
            T.get(task_lib.DOSE_RESPONSE, {}).get("reason", "not run")}
      else:
        _run_task(T, task_lib.TRUTH,
                  lambda: truth_lib.compare(extras["dose"].fits, truth_df),
                  log, timing)

  def _cell_model():
    if raw_err is not None:
      T[task_lib.CELL_MODEL] = {"status": "failed", "reason": raw_err}
      return
    _run_task(T, task_lib.CELL_MODEL,
              lambda: task_lib.cell_model_classification(
                  raw_sub if raw_ct else emb, cfg,
                  _splits(task_lib.CELL_MODEL)), log, timing)
    if task_lib.CELL_MODEL in T:
      T[task_lib.CELL_MODEL]["features"] = (
          "before per-plate normalization" if raw_ct else
          "post-processed (" + pp["summary"] + ")")

  def _projection():
    # 2-D projection for the report.
    t = time.time()
    try:
      idx, coords = plots.projection(emb.features, opts.projection_points,
                                     cfg.seed)
      m = emb.meta.iloc[idx]
      col = {}
      if "disease_condition" in m:
        col["condition"] = normalize.condition_labels(m)
      if "cell_type" in m:
        col["cell type"] = m["cell_type"].astype(str).to_numpy()
      if col:
        extras["projection"] = (coords, col)
    except ValueError as e:
      res["projection_error"] = str(e)
    timing["projection"] = round(time.time() - t, 2)

  # Independent groups of tasks, longest first, then the SVM splits that a
  # task waits for (run by whichever thread gets there first: a task whose
  # split no thread has started yet runs it itself); side by side on
  # `opts.threads` threads (their heavy parts - liblinear, BLAS, numpy -
  # release the GIL). Each task and split is seeded on its own, so the
  # results do not depend on the order or the number of threads.
  chains: List[Callable[[], None]] = []
  if any(t in wanted for t in (task_lib.CONTROL, task_lib.DOSE_RESPONSE,
                               task_lib.TRUTH)):
    chains.append(_classification_chain)
  if task_lib.ACTIVITY in wanted or task_lib.REPLICATES in wanted:
    chains.append(lambda: _retrieval_tasks(T, name, emb, wanted, compounds,
                                           opts, out_dir, log, timing))
  chains += [j.run_quietly for j in split_jobs.values()]
  if task_lib.CELL_MODEL in wanted:
    chains.append(_cell_model)
  chains.append(_projection)
  run_side_by_side(chains, opts.threads)
  raw_sub = None
  res["tasks"] = T = _ordered(T, _TASK_ORDER)
  extras["meta"] = emb.meta   # rows of the tasks, for per-task baselines
  del emb
  # Zero-shot RxRx1.
  if task_lib.RXRX1 in wanted:
    if rx1_in is None:
      T[task_lib.RXRX1] = {"status": "skipped", "reason":
                        "no RxRx1 embeddings given (--rxrx1_embeddings)"}
    else:
      def _rx1():
        e1, owned1 = _load(rx1_in, rx1_meta, log)
        opts1 = (dataclasses.replace(opts, normalize=False, whiten=False)
                 if raw_ct else opts)
        e1, pp1 = postprocess(e1, opts1, owned1)
        extras["rxrx1_meta"] = e1.meta
        out = task_lib.rxrx1_cell_type(e1, cfg)
        out["input"] = {"source": e1.source, "rows": int(len(e1.meta)),
                        "issues": e1.issues}
        out["postprocessing"] = pp1
        out["features"] = ("before per-plate normalization" if raw_ct else
                           "post-processed (" + pp1["summary"] + ")")
        idx, coords = plots.projection(e1.features, opts.projection_points,
                                       cfg.seed)
        extras["projection_rxrx1"] = (coords, {
            "cell type": e1.meta["cell_type"].astype(str).to_numpy()[idx]})
        return out
      _run_task(T, task_lib.RXRX1, _rx1, log, timing)
  timing["total"] = round(time.time() - t0, 2)
  res["timing_s"] = _ordered(timing, _TIMING_ORDER)
  return res, extras


def _retrieval_profiles(emb: Embeddings, level: str) -> Embeddings:
  """Well means (the field's unit of replication) or the sites as they are."""
  if level == "site":
    return emb
  if level != "well":
    raise ValueError(f"retrieval level must be 'well' or 'site', got {level!r}")
  if "well_id" not in emb.meta or not emb.meta["well_id"].duplicated().any():
    return emb
  m, x = normalize.aggregate_wells(emb.meta, emb.features)
  return Embeddings(m, x, emb.source)


def _retrieval_tasks(T: Dict, name: str, emb: Embeddings, wanted, compounds,
                     opts: Options, out_dir: str, log, timing: Dict) -> None:
  """mAP activity / consistency, percent replicating, energy distance."""
  cfg = dataclasses.replace(opts.retrieval, seed=opts.protocol.seed)
  t = time.time()
  try:
    prof = _retrieval_profiles(emb, cfg.level)
    centering = {"centered_on": "none (--nocenter_on_reference)"}
    if cfg.center_on_reference:
      try:
        x, centering = retrieval.center_on_reference(prof.meta, prof.features)
        prof = Embeddings(prof.meta, x, prof.source)
      except classify.TaskError as e:
        centering = {"centered_on": f"none ({e})"}
    timing["retrieval_profiles"] = round(time.time() - t, 2)
  except ValueError as e:
    for t in (task_lib.ACTIVITY, task_lib.REPLICATES):
      if t in wanted:
        T[t] = {"status": "failed", "reason": str(e)}
    return
  safe = _safe(name)

  def save(kind, df):
    fname = f"{kind}_{safe}.csv"
    gio.atomic_write(os.path.join(out_dir, fname),
                 lambda f: df.to_csv(f, index=False))
    return fname

  if task_lib.ACTIVITY in wanted:
    holder = {}

    def _activity():
      summary, table = retrieval.phenotypic_activity(prof.meta, prof.features,
                                                     cfg)
      holder["table"] = table
      summary["centering"] = centering
      cols = ["key", "treatment", "treatment_conc", "cell_type",
              "n_replicates", "mean_average_precision", "p_value",
              "corrected_p_value", "below_corrected_p"]
      summary["top"] = retrieval.records(table, cols, opts.table_rows)
      if compounds:
        named = table[table["treatment"].isin(list(compounds))]
        summary["named"] = retrieval.records(named, cols, len(named))
      summary["files"] = [save("map_activity", table)]
      return summary
    _run_task(T, task_lib.ACTIVITY, _activity, log, timing)
    if cfg.annotation:
      def _consistency():
        summary, table = retrieval.phenotypic_consistency(
            prof.meta, prof.features, holder.get("table"), cfg)
        summary["top"] = retrieval.records(
            table, ["annotation", "cell", "n_compounds",
                    "mean_average_precision", "p_value", "corrected_p_value",
                    "below_corrected_p"], opts.table_rows)
        summary["files"] = [save("map_consistency", table)]
        return summary
      _run_task(T, task_lib.CONSISTENCY, _consistency, log, timing)
    else:
      T[task_lib.CONSISTENCY] = {
          "status": "skipped",
          "reason": "no annotation column given (--annotation_column)"}
  if task_lib.REPLICATES in wanted:
    def _replicates():
      summary, table = retrieval.percent_replicating(prof.meta, prof.features,
                                                     cfg)
      summary["files"] = [save("replicates", table)]
      ed, _ = retrieval.treatment_vs_control(prof.meta, prof.features,
                                             compounds, cfg)
      summary["energy_distance"] = ed
      return summary
    _run_task(T, task_lib.REPLICATES, _replicates, log, timing)


def _safe(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def evaluate(embeddings: EmbeddingsInput, output_dir: str,
             metadata: Optional[Union[str, pd.DataFrame]] = None,
             tasks: Optional[Sequence[str]] = None,
             baseline: Optional[EmbeddingsInput] = None,
             baseline_name: str = "baseline", name: str = "embeddings",
             baseline_metadata: Optional[Union[str, pd.DataFrame]] = None,
             rxrx1_embeddings: Optional[EmbeddingsInput] = None,
             rxrx1_metadata: Optional[Union[str, pd.DataFrame]] = None,
             rxrx1_baseline: Optional[EmbeddingsInput] = None,
             truth: Optional[str] = None, compounds: Sequence[str] = (),
             options: Options = Options(),
             log: Callable[[str], None] = logging.info,
             extra_sets: Sequence[EmbeddingSet] = (),
             table: Optional[TableSpec] = None) -> Dict:
  """Evaluates embeddings (and optionally a baseline and `extra_sets`) into
  `output_dir`, every set with the same post-processing and tasks.

  Writes metrics.json, report.md, figures/*.png and dose-response CSVs, each
  atomically. Returns the metrics dict as written. `tasks`:
  subset of ('control', 'cell_model', 'dose_response', 'rxrx1', 'truth');
  default all. Unknown task names raise ValueError before anything runs.
  `table`: how to read profile tables from other tools (column mapping,
  feature regex, negative-control value); CellProfiler tables are detected
  without it.
  """
  normalization_method(options)
  thread_count(options.threads)
  wanted = list(tasks if tasks is not None else task_lib.ALL_TASKS)
  unknown = [t for t in wanted if t not in task_lib.ALL_TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; choose from "
                     f"{task_lib.ALL_TASKS}")
  names = [name] + ([baseline_name] if baseline is not None else []) + [
      s.name for s in extra_sets]
  if len(set(names)) != len(names):
    raise ValueError(f"embeddings set names must differ, got {names}")
  os.makedirs(output_dir, exist_ok=True)
  fig_dir = os.path.join(output_dir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  t_start = time.time()

  truth_df, truth_err = None, None
  if task_lib.TRUTH in wanted:
    truth_path = truth or _find_truth(
        [metadata if isinstance(metadata, str) else None,
         embeddings if isinstance(embeddings, str) else None])
    if truth_path:
      try:
        truth_df = truth_lib.read_truth(truth_path)
        log(f"planted truth: {truth_path} ({len(truth_df)} compounds)")
      except (ValueError, OSError) as e:
        truth_err = f"{truth_path}: {e}"

  sets = [(name, embeddings, metadata, rxrx1_embeddings)]
  if baseline is not None:
    sets.append((baseline_name, baseline,
                 baseline_metadata if baseline_metadata is not None
                 else metadata, rxrx1_baseline))
  sets += [(s.name, s.embeddings,
            s.metadata if s.metadata is not None else metadata, s.rxrx1)
           for s in extra_sets]
  for method in options.per_task:
    if method.name in [s[0] for s in sets]:
      raise ValueError(f"the name {method.name!r} is taken by a per-task "
                       f"method")
    method.prepare(log)   # bad weights or paths fail before any task runs
  results: Dict[str, Dict] = {}
  extras: Dict[str, Dict] = {}
  for set_name, emb_in, md, rx1 in sets:
    log(f"evaluating {set_name}")
    r, x = _evaluate_set(set_name, emb_in, md, rx1, rxrx1_metadata, wanted,
                         truth_df, truth_err, compounds, options, output_dir,
                         log, table)
    results[set_name] = r
    extras[set_name] = x
  for method in options.per_task:
    log(f"evaluating {method.name} (trained per task on the training part)")
    results[method.name] = method.evaluate(extras[name], wanted, options, log,
                                           _run_task)
    results[method.name]["rows_from"] = name
    extras[method.name] = {}
    sets.append((method.name, None, None, None))
  for x in extras.values():
    x.pop("meta", None)
    x.pop("rxrx1_meta", None)

  planted = ({} if truth_df is None else {
      str(r.treatment): float(r.true_ec50) for r in truth_df.itertuples()
      if r.true_ec50 == r.true_ec50})
  figures = _figures(results, extras, fig_dir, compounds, options, planted)
  metrics = {
      "version": 1,
      "embeddings": {n: {"input": r["input"],
                         "postprocessing": r["postprocessing"],
                         **{k: r[k] for k in ("weights", "config",
                                              "rows_from") if k in r},
                         **r["tasks"], "timing_s": r["timing_s"]}
                     for n, r in results.items()},
      "names": [s[0] for s in sets],
      "tasks_requested": wanted,
      "options": _options_dict(options),
      "figures": figures,
      "elapsed_s": round(time.time() - t_start, 2),
  }
  clean = report.write_metrics(os.path.join(output_dir, "metrics.json"),
                               metrics)
  report.write_report(os.path.join(output_dir, "report.md"),
                      _markdown(clean, figures, options))
  log(f"wrote {output_dir}/metrics.json and report.md "
      f"({time.time() - t_start:.1f}s)")
  return clean


def _options_dict(o: Options) -> Dict:
  d = dataclasses.asdict(dataclasses.replace(o, per_task=()))
  d["per_task"] = [m.name for m in o.per_task]
  del d["threads"]        # a speed setting: the results do not depend on it
  if d["whiten_components"] is None:
    d["whiten_components"] = "all"
  d["normalization"] = normalization_method(o)
  return d


def _figures(results, extras, fig_dir, compounds, opts,
             planted_ec50: Dict[str, float]) -> Dict:
  figs: Dict = {"confusion": {}, "projection": {}}
  for n, r in results.items():
    safe = _safe(n)
    for task, title in ((task_lib.CONTROL, "control"),
                        (task_lib.CELL_MODEL, "cell model"),
                        (task_lib.RXRX1, "RxRx1 cell type")):
      t = r["tasks"].get(task, {})
      if t.get("status") != "ok":
        continue
      panels = [(f"{n}: {title}, {split} split", t[split]["confusion_matrix"],
                 t[split]["classes"]) for split in ("random", "plate")
                if t.get(split, {}).get("status") == "ok"]
      if panels:
        rel = f"figures/confusion_{task}_{safe}.png"
        plots.confusion_figure(os.path.join(fig_dir, os.path.basename(rel)),
                               panels)
        figs["confusion"].setdefault(task, {})[n] = rel
    for key, label in (("projection", "RxRx19a"), ("projection_rxrx1", "RxRx1")):
      if key in extras[n]:
        coords, col = extras[n][key]
        rel = f"figures/{key}_{safe}.png"
        plots.projection_figure(os.path.join(fig_dir, os.path.basename(rel)),
                                coords, col, f"{n} ({label})")
        figs["projection"].setdefault(label, {})[n] = rel
  # Dose-response: the top compounds of each set plus the named ones.
  keys: List[Tuple[str, str]] = []
  dose_sets = []
  for n in results:
    dr = extras[n].get("dose")
    if dr is None:
      continue
    dose_sets.append((n, dr.points, dr.fits))
    for r in dr.fits.head(opts.top_compounds).itertuples():
      if (r.group, r.treatment) not in keys:
        keys.append((r.group, r.treatment))
    for r in dr.fits[dr.fits["treatment"].isin(list(compounds))].itertuples():
      if (r.group, r.treatment) not in keys:
        keys.append((r.group, r.treatment))
  if dose_sets and keys:
    rel = "figures/dose_response.png"
    plots.dose_response_figure(os.path.join(fig_dir, "dose_response.png"),
                               keys, dose_sets, planted_ec50=planted_ec50)
    figs["dose_response"] = rel
  return figs


def _markdown(m: Dict, figs: Dict, opts: Options) -> str:
  sets = m["embeddings"]
  names = m["names"]
  cfg = opts.protocol
  lines = [
      "# GAN-DL evaluation report", "",
      f"Embeddings: {', '.join(f'**{n}**' for n in names)}. Tasks: "
      f"{', '.join(m['tasks_requested'])}. Elapsed {m['elapsed_s']} s.", "",
      f"Protocol: seeded (seed {cfg.seed}) stratified {1 - cfg.test_size:.0%}/"
      f"{cfg.test_size:.0%} split; class weights inversely proportional to "
      f"class frequency; standardization + linear SVM (LinearSVC, squared "
      f"hinge, L2; tol {cfg.tol}), C "
      f"in {list(cfg.c_grid)} chosen by {cfg.cv_folds}-fold CV (balanced "
      f"accuracy) on the training part only (at most {cfg.cv_max_rows} rows); "
      f"final fit on at most {cfg.max_train_rows} training rows. The plate "
      f"split holds out whole plates (random site splits leak plate "
      f"identity).", "",
      report.summary_section(sets),
      *[m.note(sets[m.name]) for m in opts.per_task if m.name in sets],
      report.inputs_section(sets),
      report.classification_section(
          "Control classification (Mock vs Active SARS-CoV-2)", task_lib.CONTROL,
          sets, figs["confusion"].get(task_lib.CONTROL, {}),
          "Untreated sites; positive class for F1 / ROC AUC: Active "
          "SARS-CoV-2."),
      report.classification_section(
          "Cell model classification (HRCE vs VERO)", task_lib.CELL_MODEL, sets,
          figs["confusion"].get(task_lib.CELL_MODEL, {}),
          "Untreated Mock and Active sites; positive class: VERO."),
      report.dose_response_section(sets, figs.get("dose_response"),
                                   opts.table_rows),
      report.classification_section(
          "Zero-shot RxRx1 cell type (HEPG2, HUVEC, RPE, U2OS)", task_lib.RXRX1,
          sets, figs["confusion"].get(task_lib.RXRX1, {}),
          "4-class linear SVM on embeddings of RxRx1 sites (w1-w5); "
          "ROC AUC = macro one-vs-rest."),
      report.truth_section(sets),
      report.retrieval_section(sets, opts.table_rows),
      "## 2-D projection", "",
      "PCA of a random subset of post-processed embeddings; untreated sites "
      "coloured by disease condition, treated sites grey.", "",
  ]
  for label, per in figs["projection"].items():
    for n, rel in per.items():
      lines += [f"![{label} projection, {n}]({rel})", ""]
  nulls = m.get("null_reasons", {})
  if nulls:
    lines += ["## Values not computed", "",
              report.table(["metric", "reason"],
                           [[k, v] for k, v in list(nulls.items())[:60]]), ""]
  return "\n".join(lines) + "\n"
