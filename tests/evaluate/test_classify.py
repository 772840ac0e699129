"""The SVM protocol equals a plain scikit-learn pipeline on the same split."""
import numpy as np
import pytest
from sklearn.model_selection import (GridSearchCV, StratifiedKFold,
                                     train_test_split)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from gandl_jax.evaluate import classify


def _planted(n=600, dim=20, seed=0, frac_pos=0.25, strength=1.2):
  rng = np.random.default_rng(seed)
  y = np.where(rng.random(n) < frac_pos, "Mock", "Active SARS-CoV-2")
  w = rng.standard_normal(dim)
  w /= np.linalg.norm(w)
  X = rng.standard_normal((n, dim)) + strength * np.outer(y == "Mock", w)
  return X.astype(np.float32), y


def test_matches_plain_sklearn_pipeline():
  X, y = _planted()
  cfg = classify.ProtocolConfig(seed=3)
  ours = classify.run_protocol(X, y, ["Mock", "Active SARS-CoV-2"], cfg)
  # Independent reference: the textbook scikit-learn pipeline.
  Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y,
                                        random_state=3)
  pipe = make_pipeline(StandardScaler(), LinearSVC(class_weight="balanced",
                                                   dual=False, tol=1e-3))
  grid = GridSearchCV(pipe, {"linearsvc__C": [1e-3, 1e-2, 1e-1, 1.0]},
                      scoring="balanced_accuracy",
                      cv=StratifiedKFold(3, shuffle=True, random_state=3))
  grid.fit(Xtr, ytr)
  ref_acc = float((grid.predict(Xte) == yte).mean())
  assert ours.metrics["accuracy"] == pytest.approx(ref_acc, abs=1e-12)
  assert ours.metrics["C"] == grid.best_params_["linearsvc__C"]
  assert ours.metrics["accuracy"] > 0.65
  assert ours.metrics["n_test"] == len(yte)
  cm = np.array(ours.metrics["confusion_matrix"])
  assert cm.sum() == len(yte)
  # Class weights inversely proportional to frequency (balanced).
  svm = ours.model.named_steps["svm"]
  assert svm.class_weight == "balanced" and not svm.dual


def test_plate_split_holds_out_whole_plates():
  X, y = _planted(n=800)
  plates = np.array([f"P{i % 10}" for i in range(len(y))])
  cfg = classify.ProtocolConfig(seed=0)
  tr, te = classify.grouped_split(y, plates, cfg, "control")
  assert set(plates[tr]).isdisjoint(plates[te])
  assert 0.15 < len(te) / len(y) < 0.35
  f = classify.run_protocol(X, y, ["Mock", "Active SARS-CoV-2"], cfg,
                            split="plate", groups=plates)
  assert f.metrics["n_test_plates"] + f.metrics["n_train_plates"] == 10
  assert "plate-grouped" in f.metrics["cv"]


def test_absent_class_names_task_and_counts():
  y = np.array(["Mock"] * 30 + ["Active SARS-CoV-2"] * 2)
  with pytest.raises(classify.TaskError,
                     match=r"task control: .*'Active SARS-CoV-2': 2.*32"):
    classify.check_classes(y, ["Mock", "Active SARS-CoV-2"], "control", 6)


def test_multiclass_metrics():
  rng = np.random.default_rng(0)
  classes = np.array(["HEPG2", "HUVEC", "RPE", "U2OS"])
  y = classes[rng.integers(0, 4, 400)]
  centers = 2 * rng.standard_normal((4, 10))
  X = rng.standard_normal((400, 10)) + centers[np.searchsorted(classes, y)]
  f = classify.run_protocol(X.astype(np.float32), y, list(classes),
                            classify.ProtocolConfig())
  m = f.metrics
  assert set(m["per_class_accuracy"]) == set(classes)
  cm = np.array(m["confusion_matrix"])
  for i, c in enumerate(m["classes"]):
    assert m["per_class_accuracy"][c] == pytest.approx(cm[i, i] / cm[i].sum())
  assert 0.5 < m["roc_auc"] <= 1.0


def test_dual_fits_on_threads_equal_one_after_another():
  """liblinear's dual solver draws from one process-wide generator: fits on
  several threads take turns and give the coefficients of fits one after
  another (here every fit is dual: rows < 2 x features)."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  cfg = classify.ProtocolConfig(seed=1, c_grid=(0.1, 1.0), max_iter=200)
  data = [_planted(n=160, dim=120, seed=s, strength=0.6) for s in range(4)]
  assert classify.use_dual(160, 120)

  def run(k):
    X, y = data[k]
    f = classify.run_protocol(X, y, ["Mock", "Active SARS-CoV-2"], cfg)
    return f.model.named_steps["svm"].coef_.copy(), f.metrics["C"]

  alone = [run(k) for k in range(4)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for _ in range(3):
      side = list(pool.map(run, range(4)))
      for (a, ca), (b, cb) in zip(alone, side):
        assert ca == cb
        np.testing.assert_array_equal(a, b)
