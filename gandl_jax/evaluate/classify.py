"""The linear-SVM protocol of the GAN-DL paper, with a plate-grouped variant.

Protocol (Mascolini et al. 2022): a seeded, stratified 75/25 split
of the selected sites; class weights inversely proportional to class frequency
(scikit-learn's `class_weight='balanced'`, n / (k * n_c)); standardization and
a linear SVM (`LinearSVC`, squared hinge, L2) whose C is chosen by stratified
k-fold cross-validation on the training part only (balanced accuracy). The
plate-grouped variant holds out whole plates (stratified group split), since a
random site split leaks plate identity from train to test.

Speed choices (documented in docs/evaluation.md): liblinear's primal solver
when rows >= 2 x features, the dual one otherwise (`use_dual`); the C search runs on at most
`cv_max_rows` training rows (a seeded stratified subset) and the final fit on
at most `max_train_rows`; below those sizes the protocol is exactly the plain
scikit-learn pipeline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import (GridSearchCV, StratifiedGroupKFold,
                                     StratifiedKFold, train_test_split)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC


class TaskError(ValueError):
  """A task cannot run on this input (missing classes, columns, rows)."""


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
  seed: int = 0
  test_size: float = 0.25
  c_grid: Tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
  cv_folds: int = 3
  cv_max_rows: int = 4_000
  max_train_rows: int = 60_000
  min_per_class: int = 6
  max_iter: int = 1000
  tol: float = 1e-3        # liblinear stopping tolerance (see docs)


def use_dual(n_rows: int, n_features: int) -> bool:
  """liblinear's dual solver is faster when rows < 2 x features (measured:
  1,800 x 1,024 at C=1: dual 0.1 s, primal 4.6 s; 14,000 x 1,024: primal
  0.9 s, dual 23 s). Both minimize the same objective."""
  return n_rows < 2 * n_features


# liblinear's dual solvers draw from one process-wide random generator
# (seeded per fit): dual fits on several threads take turns so that each
# fit sees its own seeded sequence. The primal solver draws nothing and
# runs side by side (liblinear releases the GIL while it trains).
_DUAL_LOCK = threading.Lock()


def _fit_guard(dual: bool):
  return _DUAL_LOCK if dual else contextlib.nullcontext()


def make_svm(C: float, cfg: ProtocolConfig, dual: bool = False) -> Pipeline:
  """StandardScaler + LinearSVC(class_weight='balanced', squared hinge, L2)."""
  return Pipeline([
      ("scale", StandardScaler()),
      ("svm", LinearSVC(C=C, class_weight="balanced", dual=dual, tol=cfg.tol,
                        max_iter=cfg.max_iter, random_state=cfg.seed)),
  ])


def check_classes(y: np.ndarray, classes: Sequence[str], task: str,
                  min_per_class: int) -> None:
  """Raises TaskError naming the task and counts when a class is too rare."""
  counts = {c: int((y == c).sum()) for c in classes}
  short = {c: n for c, n in counts.items() if n < min_per_class}
  if short:
    raise TaskError(
        f"task {task}: class(es) {short} have too few rows among the "
        f"{len(y)} selected rows (needs >= {min_per_class} per class; counts "
        f"{counts})")


def random_split(y: np.ndarray, cfg: ProtocolConfig
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Seeded stratified split: (train indices, test indices)."""
  idx = np.arange(len(y))
  tr, te = train_test_split(idx, test_size=cfg.test_size, stratify=y,
                            random_state=cfg.seed)
  return np.sort(tr), np.sort(te)


def grouped_split(y: np.ndarray, groups: np.ndarray, cfg: ProtocolConfig,
                  task: str = "") -> Tuple[np.ndarray, np.ndarray]:
  """Whole groups (plates) held out, stratified by class, about test_size."""
  n_splits = max(2, int(round(1.0 / cfg.test_size)))
  n_groups = len(np.unique(groups))
  if n_groups < n_splits:
    raise TaskError(f"task {task}: plate-grouped split needs >= {n_splits} "
                    f"plates, got {n_groups}")
  sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True,
                              random_state=cfg.seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    tr, te = next(sgkf.split(np.zeros(len(y)), y, groups))
  for name, part in (("train", tr), ("test", te)):
    missing = sorted(set(np.unique(y)) - set(np.unique(y[part])))
    if missing:
      raise TaskError(
          f"task {task}: plate-grouped split leaves no {missing} rows in the "
          f"{name} part ({n_groups} plates; each class needs plates on both "
          f"sides)")
  return np.sort(tr), np.sort(te)


def _stratified_cap(y: np.ndarray, cap: int, seed: int) -> np.ndarray:
  """Indices of a seeded stratified subset of at most `cap` rows (sorted)."""
  if len(y) <= cap:
    return np.arange(len(y))
  idx, _ = train_test_split(np.arange(len(y)), train_size=cap, stratify=y,
                            random_state=seed)
  return np.sort(idx)


def select_c(X: np.ndarray, y: np.ndarray, cfg: ProtocolConfig,
             groups: Optional[np.ndarray] = None
             ) -> Tuple[float, Dict[str, float], str]:
  """C with the best mean CV balanced accuracy (first best on ties).

  Returns (C, {str(C): score}, description of the CV used).
  """
  sub = _stratified_cap(y, cfg.cv_max_rows, cfg.seed)
  Xs, ys = X[sub], y[sub]
  desc = f"{cfg.cv_folds}-fold stratified CV on {len(sub)} training rows"
  cv = StratifiedKFold(cfg.cv_folds, shuffle=True, random_state=cfg.seed)
  fit_params = {}
  if groups is not None:
    gs = groups[sub]
    per_class = min(len(np.unique(gs[ys == c])) for c in np.unique(ys))
    if per_class >= cfg.cv_folds:
      cv = StratifiedGroupKFold(cfg.cv_folds, shuffle=True,
                                random_state=cfg.seed)
      fit_params = {"groups": gs}
      desc = (f"{cfg.cv_folds}-fold plate-grouped stratified CV on {len(sub)} "
              f"training rows")
    else:
      desc += " (too few plates per class for grouped CV)"
  fold_rows = int(len(sub) * (cfg.cv_folds - 1) / cfg.cv_folds)
  dual = use_dual(fold_rows, X.shape[1])
  search = GridSearchCV(make_svm(1.0, cfg, dual), {"svm__C": list(cfg.c_grid)},
                        scoring="balanced_accuracy", cv=cv, refit=False,
                        n_jobs=1, error_score="raise")
  with warnings.catch_warnings(), _fit_guard(dual):
    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.simplefilter("ignore", UserWarning)
    search.fit(Xs, ys, **fit_params)
  best = int(np.argmin(search.cv_results_["rank_test_score"]))
  scores = {repr(float(c)): float(s) for c, s in zip(
      cfg.c_grid, search.cv_results_["mean_test_score"])}
  return float(cfg.c_grid[best]), scores, desc


@dataclasses.dataclass
class Fitted:
  """A fitted protocol: the model, its classes, the test part's metrics,
  and the test rows (indices into the protocol's X, y) with their
  predictions."""
  model: Pipeline
  classes: List[str]
  metrics: Dict
  test_rows: Optional[np.ndarray] = None
  test_pred: Optional[np.ndarray] = None


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           scores: np.ndarray, classes: Sequence[str],
                           positive: Optional[str] = None) -> Dict:
  """Accuracy, balanced accuracy, F1, ROC AUC, confusion matrix, per class.

  `scores`: decision_function output ((n,) for 2 classes, positive =
  classes[1]; (n, k) otherwise). Undefined values are None with a reason.
  """
  classes = list(classes)
  out: Dict = {
      "accuracy": float(skm.accuracy_score(y_true, y_pred)),
      "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
      "f1_macro": float(skm.f1_score(y_true, y_pred, labels=classes,
                                     average="macro", zero_division=0)),
      "classes": classes,
      "confusion_matrix": skm.confusion_matrix(
          y_true, y_pred, labels=classes).tolist(),
      "confusion_matrix_note": "rows = true class, columns = predicted, in "
                               "the order of `classes`",
  }
  cm = np.asarray(out["confusion_matrix"], dtype=np.float64)
  per_class = {}
  for i, c in enumerate(classes):
    tot = cm[i].sum()
    per_class[c] = float(cm[i, i] / tot) if tot else None
  out["per_class_accuracy"] = per_class
  present = [c for c in classes if (y_true == c).any()]
  if len(classes) == 2:
    pos = positive or classes[1]
    out["positive_class"] = pos
    out["f1"] = float(skm.f1_score(y_true, y_pred, pos_label=pos,
                                   zero_division=0))
    if len(present) == 2:
      s = scores if pos == classes[1] else -scores
      out["roc_auc"] = float(skm.roc_auc_score(y_true == pos, s))
    else:
      out["roc_auc"] = None
      out["roc_auc_reason"] = "test part holds a single class"
  else:
    aucs = {}
    for i, c in enumerate(classes):
      yb = y_true == c
      if yb.any() and (~yb).any():
        aucs[c] = float(skm.roc_auc_score(yb, scores[:, i]))
      else:
        aucs[c] = None
    vals = [v for v in aucs.values() if v is not None]
    out["roc_auc_per_class"] = aucs
    out["roc_auc"] = float(np.mean(vals)) if vals else None
    out["roc_auc_note"] = "macro mean of one-vs-rest AUCs of decision scores"
  return out


def split_rows(y: np.ndarray, cfg: ProtocolConfig, split: str = "random",
               groups: Optional[np.ndarray] = None, task: str = ""
               ) -> Tuple[np.ndarray, np.ndarray]:
  """(train, test) row indices of `split` ('random' or 'plate'): the one
  split every method of a task uses."""
  if split == "random":
    return random_split(y, cfg)
  if split == "plate":
    if groups is None:
      raise TaskError(f"task {task}: plate-grouped split needs plate keys")
    return grouped_split(y, groups, cfg, task)
  raise ValueError(f"unknown split {split!r}")


def run_protocol(X: np.ndarray, y: np.ndarray, classes: Sequence[str],
                 cfg: ProtocolConfig, split: str = "random",
                 groups: Optional[np.ndarray] = None, task: str = "",
                 positive: Optional[str] = None) -> Fitted:
  """Split, choose C on the training part, fit, score on the test part."""
  classes = sorted(classes)
  tr, te = split_rows(y, cfg, split, groups, task)
  cv_groups = None if split == "random" else groups[tr]
  C, cv_scores, cv_desc = select_c(X[tr], y[tr], cfg, cv_groups)
  used = tr[_stratified_cap(y[tr], cfg.max_train_rows, cfg.seed)]
  dual = use_dual(len(used), X.shape[1])
  model = make_svm(C, cfg, dual)
  with warnings.catch_warnings(), _fit_guard(dual):
    warnings.simplefilter("ignore", ConvergenceWarning)
    model.fit(X[used], y[used])
  pred = model.predict(X[te])
  scores = model.decision_function(X[te])
  m = classification_metrics(y[te], pred, scores, list(model.classes_),
                             positive)
  m.update({
      "split": split,
      "n_train": int(len(tr)),
      "n_train_used": int(len(used)),
      "n_test": int(len(te)),
      "train_class_counts": {c: int((y[tr] == c).sum()) for c in classes},
      "test_class_counts": {c: int((y[te] == c).sum()) for c in classes},
      "C": C,
      "cv_balanced_accuracy": cv_scores,
      "cv": cv_desc,
  })
  if groups is not None:
    m["n_test_plates"] = int(len(np.unique(groups[te])))
    m["n_train_plates"] = int(len(np.unique(groups[tr])))
  return Fitted(model, list(model.classes_), m, te, pred)
