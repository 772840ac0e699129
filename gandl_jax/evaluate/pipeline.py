"""`evaluate(sets, output_dir)`: load every embeddings set, post-process
it, run the registered tasks on it, then write metrics.json, the figures
and report.md.

The sets go through the same post-processing and tasks, side by side in the
report (the first is the main one: its metadata is the default of the
others). Each task's failure (bad input, absent classes) is recorded with
its reason and the other tasks still run; when every task failed
(`outcome`), nothing is written and `AllTasksFailed` says why. The files
of the previous run into the same directory are removed first (`outputs`). The tasks are those of
`registry.TASKS` (registered by the `task_*` modules imported below);
`runner` runs them, `report` renders them.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, Optional, Sequence

from absl import logging

from gandl_jax.evaluate import (compare, normalize, outputs, plots, registry,
                                report, runner, truth as truth_lib)
# The built-in tasks, registered in this order (that of metrics.json and of
# the report's sections).
from gandl_jax.evaluate import task_classification  # noqa: F401 pylint: disable=unused-import
from gandl_jax.evaluate import task_dose_response  # noqa: F401 pylint: disable=unused-import
from gandl_jax.evaluate import task_retrieval  # noqa: F401 pylint: disable=unused-import
from gandl_jax.evaluate import task_rxrx1  # noqa: F401 pylint: disable=unused-import
from gandl_jax.evaluate.inputs import (  # noqa: F401 (the package's API)
    MAX_THREADS, NORMALIZATIONS, EmbeddingSet, EmbeddingsInput, Options,
    load, normalization_method, postprocess, thread_count)
from gandl_jax.evaluate.io import TableSpec
from gandl_jax.evaluate.tasks import DOSE_RESPONSE, RXRX1, TRUTH
from gandl_jax import schema

# The tasks gandl-evaluate runs by default (all registered ones but those
# that follow another).
ALL_TASKS = tuple(registry.default_tasks())


class AllTasksFailed(ValueError):
  """Every task that ran failed: nothing was written. `metrics` holds the
  results (each task's reason)."""

  def __init__(self, message: str, metrics: Dict):
    super().__init__(message)
    self.metrics = metrics


def _task_results(metrics: Dict):
  """(set, task, result) of every task of every set in `metrics`."""
  for name, e in metrics["embeddings"].items():
    for k, t in e.items():
      if k not in ("input", "postprocessing", "timing_s") and \
          isinstance(t, dict) and "status" in t:
        yield name, k, t


def outcome(metrics: Dict) -> str:
  """"ok" when no task failed; "partial" when some failed (or failed in
  part) and others hold results; "failed" when tasks failed and none holds
  a result. Skipped tasks count for neither."""
  results = [t for _, _, t in _task_results(metrics)]
  failed = [t for t in results if t["status"] == "failed"]
  if not failed:
    return "ok"
  return "partial" if any(runner.done(t) for t in results) else "failed"


def _all_failed_message(metrics: Dict, output_dir: str) -> str:
  reasons: Dict[str, list] = {}
  for name, task, t in _task_results(metrics):
    if t["status"] == "failed":
      reasons.setdefault(t.get("reason", "no reason"), []).append(
          f"{task} ({name})" if len(metrics["embeddings"]) > 1 else task)
  parts = [f"{', '.join(ts)}: {r}" for r, ts in reasons.items()]
  return (f"every task failed, no report written to {output_dir}: " +
          " | ".join(parts))


def _find_truth(candidates: Sequence[Optional[str]]) -> Optional[str]:
  for c in candidates:
    if not c or not isinstance(c, str):
      continue
    d = c if os.path.isdir(c) else os.path.dirname(os.path.abspath(c.split(",")[0]))
    p = os.path.join(d, schema.SYNTHETIC_TRUTH_FILE)
    if os.path.exists(p):
      return p
  return None


def _projection(ctx: registry.Context, extras: Dict, res: Dict) -> None:
  """2-D projection of the post-processed rows for the report."""
  t = time.time()
  try:
    idx, coords = plots.projection(ctx.emb.features,
                                   ctx.options.projection_points,
                                   ctx.options.protocol.seed)
    m = ctx.emb.meta.iloc[idx]
    col = {}
    if "disease_condition" in m:
      col["condition"] = normalize.condition_labels(m)
    if "cell_type" in m:
      col["cell type"] = m["cell_type"].astype(str).to_numpy()
    if col:
      extras["projection"] = (coords, col)
  except ValueError as e:
    res["projection_error"] = str(e)
  ctx.timing["projection"] = round(time.time() - t, 2)


def _ordered(d: Dict, order: Sequence[str]) -> Dict:
  """`d` with the keys of `order` first, in that order, then the others."""
  out = {k: d[k] for k in order if k in d}
  out.update((k, v) for k, v in d.items() if k not in out)
  return out


def _evaluate_set(s: EmbeddingSet, todo: Sequence[registry.Task],
                  truth_df, truth_err: Optional[str], compounds: Sequence[str],
                  opts: Options, out_dir: str, log,
                  spec: Optional[TableSpec],
                  files: Optional[outputs.OutputFiles] = None) -> tuple:
  """Runs `todo` on one embeddings set; returns (metrics, extras for the
  figures and per-task methods)."""
  t0 = time.time()
  timing: Dict = {}
  emb, owned = load(s.embeddings, s.metadata, log, spec)
  timing["load"] = round(time.time() - t0, 2)
  raw = {}
  for task in todo:
    if task.before_postprocess is not None:
      try:
        raw[task.name] = task.before_postprocess(emb, opts)
      except Exception as e:  # pylint: disable=broad-except
        raw[task.name] = e   # raised when the task asks for it
  t = time.time()
  emb, pp = postprocess(emb, opts, owned)
  timing["postprocess"] = round(time.time() - t, 2)
  res: Dict = {"input": {"source": emb.source, "rows": int(len(emb.meta)),
                         "dim": emb.dim, "issues": emb.issues,
                         "file_metadata": emb.file_metadata},
               "postprocessing": pp}
  ctx = registry.Context(
      name=s.name, emb=emb, options=opts, source=s, postprocessing=pp,
      compounds=compounds, truth=truth_df, truth_error=truth_err,
      output_dir=out_dir, raw=raw, timing=timing, log=log, files=files)
  del emb
  results: Dict = {}
  runner.run_tasks(todo, ctx, results, timing, thread_count(opts.threads))
  extras: Dict = {}
  _projection(ctx, extras, res)
  if ctx.shared.get(DOSE_RESPONSE) is not None:
    extras["dose"] = ctx.shared[DOSE_RESPONSE]
  rx1 = ctx.shared.get(RXRX1) or {}
  if "projection" in rx1:
    extras["projection_rxrx1"] = rx1["projection"]
  # The rows of the tasks, for per-task methods.
  extras["meta"], extras["rxrx1_meta"] = ctx.emb.meta, rx1.get("meta")
  extras["predictions"] = ctx.predictions
  ctx.release()
  res["tasks"] = _ordered(results, list(registry.TASKS))
  timing["total"] = round(time.time() - t0, 2)
  res["timing_s"] = _ordered(timing, ["load", "postprocess",
                                      *registry.TASKS, "projection"])
  res["timing_s"]["total"] = res["timing_s"].pop("total")
  return res, extras


def evaluate(sets: Sequence[EmbeddingSet], output_dir: str, *,
             tasks: Optional[Sequence[str]] = None,
             truth: Optional[str] = None, compounds: Sequence[str] = (),
             options: Options = Options(),
             log: Callable[[str], None] = logging.info,
             table: Optional[TableSpec] = None) -> Dict:
  """Evaluates the embeddings `sets` side by side into `output_dir`, every
  set with the same post-processing and tasks.

  sets: the first is the main one; the others' `metadata` and
    `rxrx1_metadata` default to its.
  tasks: names of registered tasks (`registry.TASKS`); default
    `ALL_TASKS`. The tasks they require run too. Unknown names raise
    ValueError before anything runs.
  truth: synthetic_truth.csv of simulated data (default: found next to the
    first set's metadata or embeddings).
  compounds: compound names shown in the tables and figures.
  table: how to read profile tables from other tools (column mapping,
    feature regex, negative-control value); CellProfiler tables are
    detected without it.

  Writes metrics.json, report.md, figures/*.png and the tasks' CSV tables,
  each atomically, after removing the files the previous run listed in the
  directory's manifest (`outputs.MANIFEST`). Returns the metrics dict as
  written. Raises `AllTasksFailed` (a ValueError), writing no report, when
  every task that ran failed.
  """
  normalization_method(options)
  thread_count(options.threads)
  if options.cell_type_features not in ("raw", "normalized"):
    raise ValueError(f"cell_type_features must be 'raw' or 'normalized', got "
                     f"{options.cell_type_features!r}")
  sets = list(sets)
  if not sets:
    raise ValueError("no embeddings set to evaluate")
  wanted = list(tasks if tasks is not None else ALL_TASKS)
  todo = registry.resolve(wanted)
  first = sets[0]
  sets = [first] + [dataclasses.replace(
      s, metadata=first.metadata if s.metadata is None else s.metadata,
      rxrx1_metadata=(first.rxrx1_metadata if s.rxrx1_metadata is None
                      else s.rxrx1_metadata)) for s in sets[1:]]
  names = [s.name for s in sets]
  if len(set(names)) != len(names):
    raise ValueError(f"embeddings set names must differ, got {names}")
  for method in options.per_task:
    if method.name in names:
      raise ValueError(f"the name {method.name!r} is taken by a per-task "
                       f"method")
  os.makedirs(output_dir, exist_ok=True)
  fig_dir = os.path.join(output_dir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  files = outputs.OutputFiles(output_dir, log)
  t_start = time.time()

  truth_df, truth_err = None, None
  if TRUTH in [t.name for t in todo]:
    truth_path = truth or _find_truth(
        [first.metadata if isinstance(first.metadata, str) else None,
         first.embeddings if isinstance(first.embeddings, str) else None])
    if truth_path:
      try:
        truth_df = truth_lib.read_truth(truth_path)
        log(f"planted truth: {truth_path} ({len(truth_df)} compounds)")
      except (ValueError, OSError) as e:
        truth_err = f"{truth_path}: {e}"

  for method in options.per_task:
    method.prepare(log)   # bad weights or paths fail before any task runs
  results: Dict[str, Dict] = {}
  extras: Dict[str, Dict] = {}
  for s in sets:
    log(f"evaluating {s.name}")
    results[s.name], extras[s.name] = _evaluate_set(
        s, todo, truth_df, truth_err, compounds, options, output_dir, log,
        table, files)
  for method in options.per_task:
    log(f"evaluating {method.name} (trained per task on the training part)")
    results[method.name] = method.evaluate(extras[first.name], wanted, options,
                                           log, runner.record)
    results[method.name]["rows_from"] = first.name
    extras[method.name] = {}
    names.append(method.name)
  set_names = [s.name for s in sets]
  comparisons = compare.paired_comparisons(
      {n: extras[n].get("predictions", {}) for n in set_names}, set_names,
      options.protocol.seed)
  for x in extras.values():
    x.pop("meta", None)
    x.pop("rxrx1_meta", None)
    x.pop("predictions", None)

  if outcome({"embeddings": {n: r["tasks"] for n, r in results.items()}}
             ) == "failed":
    files.clear_previous()   # no result of an earlier run stays behind
    metrics = {"embeddings": {n: r["tasks"] for n, r in results.items()}}
    raise AllTasksFailed(_all_failed_message(metrics, output_dir), metrics)
  planted = ({} if truth_df is None else {
      str(r.treatment): float(r.true_ec50) for r in truth_df.itertuples()
      if r.true_ec50 == r.true_ec50})
  figures = report.write_figures(results, extras, fig_dir, compounds, options,
                                 planted, files.add)
  metrics = {
      "version": 1,
      "embeddings": {n: {"input": r["input"],
                         "postprocessing": r["postprocessing"],
                         **{k: r[k] for k in ("weights", "config",
                                              "rows_from") if k in r},
                         **r["tasks"], "timing_s": r["timing_s"]}
                     for n, r in results.items()},
      "names": names,
      "comparisons": comparisons,
      "tasks_requested": wanted,
      "options": _options_dict(options),
      "figures": figures,
      "elapsed_s": round(time.time() - t_start, 2),
  }
  clean = report.write_metrics(
      os.path.join(output_dir, files.add("metrics.json")), metrics)
  notes = [m.note(clean["embeddings"][m.name]) for m in options.per_task
           if m.name in clean["embeddings"]]
  report.write_report(os.path.join(output_dir, files.add("report.md")),
                      report.markdown(clean, options, notes))
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
