"""The inputs of an evaluation: its embeddings sets, its options, and the
loading and post-processing every set goes through (normalization,
whitening, well means) before the tasks see it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import pandas as pd

from gandl_jax.evaluate import (classify, dose_response, normalize,
                                 retrieval, tasks)
from gandl_jax.evaluate.io import Embeddings, TableSpec, load_embeddings

EmbeddingsInput = Union[str, Sequence[str], Embeddings]


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
  """One embeddings set of an evaluation (the first is the main one; the
  others go side by side: a random-init discriminator, Recursion's
  embeddings, classical features, a DenseNet baseline...).

  embeddings: file(s) in any layout `io.load_embeddings` reads, or loaded
    `Embeddings`.
  rxrx1: RxRx1 embeddings of the same model (the zero-shot cell-type task).
  metadata / rxrx1_metadata: joined by site_id; None: the first set's.
  """
  name: str
  embeddings: EmbeddingsInput
  rxrx1: Optional[EmbeddingsInput] = None
  metadata: Optional[Union[str, pd.DataFrame]] = None
  rxrx1_metadata: Optional[Union[str, pd.DataFrame]] = None


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
  # Threads running independent tasks side by side (a plain pool) and the
  # per-plate normalization; None: one per CPU core, at most MAX_THREADS;
  # 1: one after another. The results are the same for any number; memory
  # grows with it.
  threads: Optional[int] = None


NORMALIZATIONS = ("plate", "robust_plate", "tvn", "none")
# Options.threads=None: one thread per CPU core, at most this many (each
# task holds its own copies of the rows).
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


def load(x: EmbeddingsInput, metadata, log,
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
  issues = list(emb.issues)
  note = tasks.probe_plates_note(emb)   # shown in the report's inputs notes
  if note:
    issues.append(note)
  return Embeddings(meta, X, emb.source, issues, emb.file_metadata), info
