"""The computations of the classification and dose-response tasks, each on
one post-processed embeddings set (registered as tasks by the `task_*`
modules; the per-task baselines and the training probe use them too).

Each function returns a JSON-ready dict; bad input raises
`classify.TaskError` with the task name and row counts, which the caller
records while the other tasks go on.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from gandl_jax.evaluate import classify, compare, dose_response, normalize
from gandl_jax.evaluate.io import Embeddings
from gandl_jax import embeddings as emb_format
from gandl_jax import schema

CONTROL = "control"
CELL_MODEL = "cell_model"
DOSE_RESPONSE = "dose_response"
RXRX1 = "rxrx1"
TRUTH = "truth"

SPLITS = ("random", "plate")


def _require(meta: pd.DataFrame, cols: Sequence[str], task: str) -> None:
  missing = [c for c in cols if c not in meta]
  if missing:
    raise classify.TaskError(
        f"task {task}: metadata column(s) {missing} missing ({len(meta)} rows);"
        f" pass --metadata with the dataset's metadata.csv")


def control_rows(meta: pd.DataFrame, task: str = CONTROL) -> np.ndarray:
  """Untreated Mock and Active SARS-CoV-2 sites (the paper's control groups)."""
  _require(meta, ["disease_condition", "treatment"], task)
  cond = meta["disease_condition"].astype(str).to_numpy()
  sel = normalize.control_mask(meta) & np.isin(cond, [schema.MOCK, schema.ACTIVE])
  if not sel.any():
    raise classify.TaskError(
        f"task {task}: no untreated `{schema.MOCK}` or `{schema.ACTIVE}` site "
        f"among {len(meta)} rows")
  return sel


@dataclasses.dataclass
class TaskRows:
  """The rows and labels of a classification task (shared by the SVM
  protocol and the per-task baselines, so both see the same split)."""
  mask: np.ndarray          # rows of the embeddings' meta in the task
                            # (indices, in site_id order)
  y: np.ndarray             # labels of those rows
  classes: List[str]
  groups: np.ndarray        # plate keys of those rows
  positive: Optional[str]
  rows: str                 # description for the report


def classification_rows(meta: pd.DataFrame, task: str,
                        cfg: classify.ProtocolConfig) -> TaskRows:
  """Rows, labels, classes and plates of `task` (control, cell_model, rxrx1);
  TaskError when columns or classes are missing.

  The rows come in site_id order, so the seeded split depends on the sites
  and not on the order of the file: sets of the same sites get the same
  split, and their test predictions pair site by site."""
  if task == CONTROL:
    sel = control_rows(meta)
    y = meta["disease_condition"].astype(str).to_numpy()[sel]
    classes, positive = [schema.ACTIVE, schema.MOCK], schema.ACTIVE
    rows = "untreated Mock and Active SARS-CoV-2 sites"
  elif task == CELL_MODEL:
    _require(meta, ["cell_type"], CELL_MODEL)
    sel = control_rows(meta, CELL_MODEL)
    y = meta["cell_type"].astype(str).to_numpy()[sel]
    classes, positive = list(schema.RXRX19A_CELL_TYPES), "VERO"
    rows = "untreated Mock and Active SARS-CoV-2 sites"
  elif task == RXRX1:
    _require(meta, ["cell_type"], RXRX1)
    y = meta["cell_type"].astype(str).to_numpy()
    known = np.isin(y, schema.RXRX1_CELL_TYPES)
    if not known.all():
      bad = sorted(set(y[~known]))[:5]
      raise classify.TaskError(
          f"task {RXRX1}: {int((~known).sum())} of {len(y)} rows have a "
          f"cell_type outside {schema.RXRX1_CELL_TYPES} (e.g. {bad}); is this "
          f"RxRx1 data?")
    sel = np.ones(len(y), bool)
    classes, positive = list(schema.RXRX1_CELL_TYPES), None
    rows = "all RxRx1 sites"
  else:
    raise ValueError(f"{task!r} is not a classification task")
  idx = np.flatnonzero(sel)
  order = np.argsort(meta["site_id"].astype(str).to_numpy()[idx],
                     kind="stable")
  y = y[order]
  classify.check_classes(y, classes, task, cfg.min_per_class)
  groups = normalize.plate_keys(meta)[idx[order]]
  return TaskRows(idx[order], y, classes, groups, positive, rows)


def probe_plates(emb: Embeddings) -> List[str]:
  """The plates a probe-selected checkpoint was chosen on (the file's
  `gandl.probe_plates`, written by `gandl-export --step best`), [] if none:
  the control task is scored without them (`_classify`)."""
  text = (emb.file_metadata or {}).get(emb_format.META_KEY_PROBE_PLATES)
  if not text:
    return []
  try:
    plates = json.loads(text)
    if not isinstance(plates, list):
      raise ValueError("not a list")
  except ValueError as e:
    raise ValueError(f"{emb.source}: metadata {emb_format.META_KEY_PROBE_PLATES}"
                     f" must be a JSON list of plate keys, got {text[:80]!r} "
                     f"({e})") from None
  return [str(p) for p in plates]


def probe_plates_note(emb: Embeddings) -> Optional[str]:
  """The report's line on the excluded probe plates, None when none."""
  plates = probe_plates(emb)
  if not plates:
    return None
  return (f"{len(plates)} plates used for checkpoint selection were excluded "
          f"from the control task")


def _one_split(X: np.ndarray, t: TaskRows, cfg: classify.ProtocolConfig,
               task: str, split: str, site_ids: np.ndarray,
               predictions: Optional[Dict] = None
               ) -> Tuple[Dict, Optional[classify.Fitted]]:
  """One split's metrics, with the balanced accuracy's bootstrap interval;
  the test part's predictions go to `predictions[split]` (site_id, y,
  pred, plate) for the paired comparisons between sets."""
  try:
    f = classify.run_protocol(X, t.y, t.classes, cfg, split=split,
                              groups=t.groups, task=task, positive=t.positive)
  except classify.TaskError as e:
    return {"status": "failed", "reason": str(e)}, None
  te = f.test_rows
  m = {"status": "ok", **f.metrics}
  m["balanced_accuracy_interval"] = compare.accuracy_interval(
      t.y[te], f.test_pred, t.groups[te], split, cfg.seed)
  if predictions is not None:
    predictions[split] = pd.DataFrame({
        "site_id": site_ids[te], "y": t.y[te], "pred": f.test_pred,
        "plate": t.groups[te]})
  return m, f


def _classify(emb: Embeddings, task: str, cfg: classify.ProtocolConfig,
              predictions: Optional[Dict] = None
              ) -> Tuple[Dict, Optional[classify.Fitted]]:
  """Both splits of `task`: its metrics and the random split's model."""
  t = classification_rows(emb.meta, task, cfg)
  excluded = probe_plates(emb) if task == CONTROL else []
  if excluded:
    keep = ~np.isin(t.groups, excluded)
    if not keep.any():
      raise classify.TaskError(
          f"task {task}: every plate of its {len(t.y)} rows was used for "
          f"checkpoint selection ({emb_format.META_KEY_PROBE_PLATES}); "
          f"nothing is left to score")
    t = dataclasses.replace(t, mask=t.mask[keep], y=t.y[keep],
                            groups=t.groups[keep])
    classify.check_classes(t.y, t.classes, task, cfg.min_per_class)
  out: Dict = {"n_rows": int(len(t.y)),
               "class_counts": {c: int((t.y == c).sum()) for c in t.classes}}
  fitted = None
  X = emb.features[t.mask]
  ids = emb.meta["site_id"].astype(str).to_numpy()[t.mask]
  for split in SPLITS:
    out[split], f = _one_split(X, t, cfg, task, split, ids, predictions)
    if split == "random":
      fitted = f
  out["rows"] = t.rows
  if excluded:
    out["excluded_probe_plates"] = sorted(excluded)
    out["note"] = probe_plates_note(emb)
  failed = [s for s in SPLITS if out[s]["status"] != "ok"]
  if failed:
    # A split that cannot run fails the task; what ran is kept (partial).
    out["status"] = "failed"
    out["reason"] = "; ".join(f"{s} split: {out[s]['reason']}"
                              for s in failed)
    out["partial"] = len(failed) < len(SPLITS)
  return out, fitted


def control_classification(emb: Embeddings, cfg: classify.ProtocolConfig,
                           predictions: Optional[Dict] = None
                           ) -> Tuple[Dict, classify.Fitted]:
  """`predictions` (optional): filled with each split's test predictions."""
  out, fitted = _classify(emb, CONTROL, cfg, predictions)
  if fitted is None:
    raise classify.TaskError(f"task {CONTROL}: {out['random']['reason']}")
  return out, fitted


def cell_model_classification(emb: Embeddings, cfg: classify.ProtocolConfig,
                              predictions: Optional[Dict] = None) -> Dict:
  return _classify(emb, CELL_MODEL, cfg, predictions)[0]


def rxrx1_cell_type(emb: Embeddings, cfg: classify.ProtocolConfig,
                    predictions: Optional[Dict] = None) -> Dict:
  """Zero-shot RxRx1: 4-class linear SVM on cell type, per-class accuracy."""
  return _classify(emb, RXRX1, cfg, predictions)[0]


@dataclasses.dataclass
class DoseResponseResult:
  summary: Dict
  points: pd.DataFrame
  fits: pd.DataFrame


def treated_rows(meta: pd.DataFrame) -> np.ndarray:
  _require(meta, ["treatment", "treatment_conc", "disease_condition"],
           DOSE_RESPONSE)
  conc = pd.to_numeric(meta["treatment_conc"], errors="coerce").to_numpy()
  treated = ~normalize.control_mask(meta)
  infected = meta["disease_condition"].astype(str).to_numpy() == schema.ACTIVE
  return treated & infected & np.isfinite(conc) & (conc > 0)


def healthy_scores(model: classify.Fitted, X: np.ndarray,
                   rows: Optional[np.ndarray] = None,
                   block: int = 32768) -> np.ndarray:
  """Decision score of X's `rows` (default all), oriented so that larger =
  more Mock-like. Rows are gathered block by block: no copy of the whole
  selection (250,000 x 1,024 treated sites at RxRx19a size)."""
  sign = 1.0 if model.classes[1] == schema.MOCK else -1.0
  n = len(X) if rows is None else len(rows)
  out = np.empty(n, dtype=np.float64)
  for s in range(0, n, block):
    part = X[s:s + block] if rows is None else X[rows[s:s + block]]
    out[s:s + block] = model.model.decision_function(part)
  return sign * out


def dose_response_task(emb: Embeddings, model: classify.Fitted,
                       fit_cfg: dose_response.FitConfig,
                       hit_threshold: float, compounds: Sequence[str],
                       top_n: int) -> DoseResponseResult:
  meta = emb.meta
  treated = treated_rows(meta)
  if not treated.any():
    raise classify.TaskError(
        f"task {DOSE_RESPONSE}: no treated `{schema.ACTIVE}` site with a "
        f"positive treatment_conc among {len(meta)} rows")
  ctrl = control_rows(meta, DOSE_RESPONSE)
  cond = meta["disease_condition"].astype(str).to_numpy()
  cell = (meta["cell_type"].astype(str).to_numpy() if "cell_type" in meta
          else np.full(len(meta), "all"))
  idx_ctrl = np.flatnonzero(ctrl)
  idx_tr = np.flatnonzero(treated)
  s_ctrl = healthy_scores(model, emb.features, idx_ctrl)
  s_tr = healthy_scores(model, emb.features, idx_tr)
  # Rescue scale, per cell type where both controls exist, else global.
  mock_c = cond[idx_ctrl] == schema.MOCK
  act_c = cond[idx_ctrl] == schema.ACTIVE
  try:
    glob = dose_response.rescue_scale(s_ctrl, mock_c, act_c)
  except ValueError as e:
    raise classify.TaskError(f"task {DOSE_RESPONSE}: {e}") from e
  scales = {}
  rescue = np.empty(len(idx_tr))
  for ct in np.unique(cell[idx_tr]):
    in_ct = cell[idx_ctrl] == ct
    try:
      a, m = dose_response.rescue_scale(s_ctrl, mock_c & in_ct, act_c & in_ct)
      scales[str(ct)] = {"active_mean": a, "mock_mean": m, "from": ct}
    except ValueError:
      a, m = glob
      scales[str(ct)] = {"active_mean": a, "mock_mean": m,
                         "from": "all cell types (no paired controls)"}
    rows = cell[idx_tr] == ct
    rescue[rows] = (s_tr[rows] - a) / (m - a)
  pred_healthy = s_tr > 0      # the classifier calls the site Mock
  df = pd.DataFrame({
      "group": cell[idx_tr],
      "treatment": meta["treatment"].astype(str).to_numpy()[idx_tr],
      "conc": pd.to_numeric(meta["treatment_conc"]).to_numpy()[idx_tr],
      "rescue": rescue, "healthy": pred_healthy, "score": s_tr})
  points = dose_response.summarize_points(df)
  fits = dose_response.fit_all(points, fit_cfg, hit_threshold)
  flags = fits["flag"].value_counts().to_dict()
  summary: Dict = {
      "n_treated_sites": int(len(idx_tr)),
      "n_compounds": int(fits["treatment"].nunique()),
      "n_fits": int(len(fits)),
      "flags": {str(k): int(v) for k, v in flags.items()},
      "n_hits": int(fits["hit"].sum()),
      "hit_definition": f"flag ok and efficacy >= {hit_threshold} (rescue "
                        f"units, 0 = infected controls, 1 = Mock)",
      "rescue_scale": scales,
      "control_sites_fraction_healthy": {
          "Mock": float((s_ctrl[mock_c] > 0).mean()),
          "Active SARS-CoV-2": float((s_ctrl[act_c] > 0).mean())},
      "top": _fit_records(fits.head(top_n)),
  }
  if compounds:
    named = fits[fits["treatment"].isin(list(compounds))]
    summary["named"] = _fit_records(named)
    absent = [c for c in compounds if c not in set(fits["treatment"])]
    if absent:
      summary["named_not_found"] = absent
  return DoseResponseResult(summary, points, fits)


def _fit_records(fits: pd.DataFrame) -> List[Dict]:
  keep = ["rank", "group", "treatment", "flag", "ec50", "efficacy", "hill",
          "bottom", "top", "r2", "n_sites", "n_concentrations",
          "max_mean_rescue", "hit", "reason"]
  recs = []
  for r in fits[keep].to_dict("records"):
    rec = {}
    for k, v in r.items():
      if isinstance(v, (np.bool_, bool)):
        rec[k] = bool(v)
      elif k in ("rank", "n_sites", "n_concentrations"):
        rec[k] = int(v)
      elif v is None or isinstance(v, str):
        rec[k] = v
      else:
        v = float(v)
        rec[k] = v if np.isfinite(v) else None
    if rec.get("ec50") is None:
      rec["ec50_reason"] = rec.get("reason") or "not fitted"
    recs.append(rec)
  return recs
