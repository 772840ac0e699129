r"""Is the planted biology of a synthetic tree visible in intensities alone?

  python -m tools.check_synth --root /tmp/synth-hard/RxRx19a

On the untreated Mock and Active SARS-CoV-2 sites of a gandl-synth RxRx19a
tree, prints the balanced accuracy of
  (i)  a linear SVM (sklearn LinearSVC, standardized features) on per-channel
       intensity statistics (mean, std, 1/5/25/50/75/95/99th percentiles; the
       `intensity_statistics` of gandl_jax.baselines.classical), plate-grouped
       cross-validation (each plate held out once) and 5-fold random split;
  (ii) the same classifier on the planted per-site severity
       (synthetic_sites.csv), i.e. whether the signal is there at all.
Easy mode: (i) is near 1. Hard modes: (i) should be near chance (0.5).
"""
import json
import os

import numpy as np
import pandas as pd
from absl import app, flags
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from gandl_jax import schema
from gandl_jax.baselines import classical
from gandl_jax.data import synthetic

_ROOT = flags.DEFINE_string("root", None, "gandl-synth RxRx19a root.")
flags.mark_flags_as_required(["root"])


def control_sites(root: str) -> pd.DataFrame:
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  sites = pd.read_csv(os.path.join(root, synthetic.SITES_FILE), dtype={"site_id": str})
  df = df.merge(sites, on="site_id")
  sel = (df.treatment == "") & df.disease_condition.isin([schema.MOCK, schema.ACTIVE])
  return df[sel].reset_index(drop=True)


def intensity_table(root: str, df: pd.DataFrame, channels: int = 5) -> np.ndarray:
  rows = []
  for r in df.itertuples():
    stats = []
    for ch in range(1, channels + 1):
      p = os.path.join(root, "images", schema.image_relpath(
          r.experiment, int(r.plate), r.well, int(r.site), ch))
      stats.append(classical.intensity_statistics(np.asarray(Image.open(p))))
    rows.append(np.concatenate(stats))
  return np.asarray(rows)


def balanced_accuracy(x: np.ndarray, y: np.ndarray, groups=None) -> float:
  clf = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=20000))
  if groups is None:
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    pred = cross_val_predict(clf, x, y, cv=cv)
  else:
    cv = GroupKFold(len(np.unique(groups)))
    pred = cross_val_predict(clf, x, y, cv=cv, groups=groups)
  return float(balanced_accuracy_score(y, pred))


def main(argv):
  del argv
  root = _ROOT.value
  df = control_sites(root)
  y = (df.disease_condition == schema.ACTIVE).to_numpy()
  groups = (df.experiment + "/" + df.plate).to_numpy()
  x = intensity_table(root, df)
  sev = df[["severity"]].to_numpy(float)
  out = {
      "sites": int(len(df)), "active": int(y.sum()), "plates": int(len(set(groups))),
      "intensity_svm_plate_split": round(balanced_accuracy(x, y, groups), 4),
      "intensity_svm_random_split": round(balanced_accuracy(x, y), 4),
      "severity_plate_split": round(balanced_accuracy(sev, y, groups), 4),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
