"""Synthetic RxRx19a / RxRx1: layout, vocabularies, determinism, planted signal."""
import csv
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gandl_jax.data import synthetic
from gandl_jax import schema


@pytest.fixture(scope="module")
def rxrx19a(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  root = synthetic.generate(str(out), dataset="rxrx19a", size=64, plates=2,
                            wells_per_plate=24, seed=3, workers=1)
  return root


def _site_stats(root, df, channels=5):
  """Simple per-channel image statistics per site: mean, std, 90th percentile."""
  feats = []
  for r in df.itertuples():
    chans = []
    for ch in range(1, channels + 1):
      p = os.path.join(root, "images", schema.image_relpath(
          r.experiment, int(r.plate), r.well, int(r.site), ch))
      chans.append(np.asarray(Image.open(p), np.float64))
    x = np.stack(chans)
    flat = x.reshape(channels, -1)
    feats.append(np.concatenate([flat.mean(1), flat.std(1),
                                 np.percentile(flat, 90, axis=1)]))
  return np.asarray(feats)


def test_layout_columns_and_vocabularies(rxrx19a):
  assert os.path.basename(rxrx19a) == "RxRx19a"
  with open(os.path.join(rxrx19a, "metadata.csv"), newline="") as f:
    header = next(csv.reader(f))
  assert tuple(header) == schema.RXRX19A_COLUMNS
  df = pd.read_csv(os.path.join(rxrx19a, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  assert len(df) == 4 * 2 * 24 * 4
  assert set(df.cell_type) == set(schema.RXRX19A_CELL_TYPES)
  assert set(df.experiment) == set(schema.RXRX19A_EXPERIMENTS)
  assert set(df.site.astype(int)) == set(schema.RXRX19A_SITES)
  assert set(df.disease_condition) == set(schema.DISEASE_CONDITIONS) | {""}
  assert 0 < (df.disease_condition == "").sum() < len(df) // 20
  assert df.site_id.is_unique
  for r in df.head(50).itertuples():
    assert r.site_id == schema.site_id(r.experiment, int(r.plate), r.well, int(r.site))
    assert r.well_id == schema.well_id(r.experiment, int(r.plate), r.well)
    assert r.cell_type == r.experiment.split("-")[0]
  # Untreated wells have empty treatment and concentration; treated ones both.
  treated = df.treatment != ""
  assert (df.treatment_conc[treated] != "").all()
  assert (df.treatment_conc[~treated] == "").all()
  assert set(df.treatment_conc[treated].astype(float)) <= set(synthetic.CONCENTRATIONS)
  assert (df.disease_condition[treated] == schema.ACTIVE).all()
  # Two-letter rows exist, as on the real 1536-well plates.
  assert df.well.str.match(r"^[A-Z]{2}\d{2}$").any()
  # One 8-bit grayscale PNG per channel at the requested size.
  r = df.iloc[0]
  for ch in range(1, 6):
    p = os.path.join(rxrx19a, "images", r.experiment, f"Plate{r.plate}",
                     f"{r.well}_s{r.site}_w{ch}.png")
    with Image.open(p) as im:
      assert im.mode == "L" and im.size == (64, 64)


def test_truth_file_names_rescuers_with_ec50(rxrx19a):
  truth = synthetic.compound_truth(rxrx19a)
  assert truth["Remdesivir (GS-5734)"]["role"] == "rescue"
  assert truth["GS-441524"]["role"] == "rescue"
  assert truth["Remdesivir (GS-5734)"]["ec50_uM"] == pytest.approx(0.5)
  roles = [v["role"] for v in truth.values()]
  assert roles.count("toxic") >= 1 and roles.count("inert") > roles.count("rescue")
  # Per-site truth: rescue follows the Hill curve (checked in closed form).
  sites = pd.read_csv(os.path.join(rxrx19a, synthetic.SITES_FILE))
  df = pd.read_csv(os.path.join(rxrx19a, "metadata.csv"), dtype=str,
                   keep_default_na=False).merge(sites, on="site_id")
  rem = df[df.treatment == "GS-441524"]
  c = rem.treatment_conc.astype(float).to_numpy()
  ec50, h, eff = 1.5, 1.2, 0.9
  expected = synthetic.ACTIVE_SEVERITY * (1 - eff * c**h / (c**h + ec50**h))
  # Per-site severity scatters around the curve with sd ACTIVE_SEVERITY_SD.
  resid = rem.severity.to_numpy() - expected
  assert abs(resid.mean()) < 0.05 and resid.std() < 0.15
  mock = df[df.disease_condition == schema.MOCK]
  assert (mock.severity == 0).all() and (mock.infected_fraction == 0).all()
  active = df[(df.disease_condition == schema.ACTIVE) & (df.treatment == "")]
  assert active.infected_fraction.mean() > 0.6


def test_deterministic_and_independent_of_workers(tmp_path, rxrx19a):
  root = synthetic.generate(str(tmp_path), dataset="rxrx19a", size=64, plates=[1],
                            wells_per_plate=16, seed=3, workers=1)
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str, keep_default_na=False)
  # A rerun with the same seed and 2 worker processes writes identical files.
  root2 = synthetic.generate(str(tmp_path / "again"), dataset="rxrx19a", size=64,
                             plates=[1], wells_per_plate=16, seed=3, workers=2)
  for r in df.sample(5, random_state=0).itertuples():
    rel = schema.image_relpath(r.experiment, int(r.plate), r.well, int(r.site), 4)
    a = np.asarray(Image.open(os.path.join(root, "images", rel)))
    b = np.asarray(Image.open(os.path.join(root2, "images", rel)))
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(root, "metadata.csv"), "rb") as f1, \
      open(os.path.join(root2, "metadata.csv"), "rb") as f2:
    assert f1.read() == f2.read()
  spec = synthetic.SiteSpec(0, (), "HRCE", 0.0, 0.0, (1.0,) * 5, (5.0,) * 5)
  a, _ = synthetic.render_site(spec, 64, 5, seed=3)
  b, _ = synthetic.render_site(spec, 64, 5, seed=3)
  c, _ = synthetic.render_site(spec, 64, 5, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_linear_classifier_recovers_planted_biology(rxrx19a):
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import cross_val_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  df = pd.read_csv(os.path.join(rxrx19a, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  untreated = df[df.treatment == ""].reset_index(drop=True)
  x = _site_stats(rxrx19a, untreated)
  # Plate-wise normalization: z-score each feature by the plate's Mock sites.
  plate_key = (untreated.experiment + "/" + untreated.plate).to_numpy()
  xn = np.empty_like(x)
  for k in np.unique(plate_key):
    m = plate_key == k
    ref = x[m & (untreated.disease_condition == schema.MOCK).to_numpy()]
    xn[m] = (x[m] - ref.mean(0)) / (ref.std(0) + 1e-6)
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))

  sel = untreated.disease_condition.isin([schema.MOCK, schema.ACTIVE]).to_numpy()
  y = (untreated.disease_condition[sel] == schema.ACTIVE).to_numpy()
  acc = cross_val_score(clf, xn[sel], y, cv=5).mean()
  chance = max(y.mean(), 1 - y.mean())
  assert acc > 0.9 and acc > chance + 0.25, (acc, chance)

  y = (untreated.cell_type == "HRCE").to_numpy()
  acc = cross_val_score(clf, x, y, cv=5).mean()
  assert acc > 0.95, acc

  # UV-inactivated virus looks like Mock: no better than chance + a margin.
  sel = untreated.disease_condition.isin([schema.MOCK, schema.UV_INACTIVATED]).to_numpy()
  y = (untreated.disease_condition[sel] == schema.MOCK).to_numpy()
  acc = cross_val_score(clf, xn[sel], y, cv=5).mean()
  assert acc < 0.75, acc


def test_plate_effects_visible_before_normalization(rxrx19a):
  df = pd.read_csv(os.path.join(rxrx19a, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  healthy = df[df.disease_condition.isin([schema.MOCK, schema.UV_INACTIVATED])]
  healthy = healthy.reset_index(drop=True)
  x = _site_stats(rxrx19a, healthy)[:, :5]       # per-channel means
  plate_key = (healthy.experiment + "/" + healthy.plate).to_numpy()

  def plate_fraction(v, key, groups):
    """Fraction of variance explained by plate, within each cell type."""
    fr = []
    for g in np.unique(groups):
      m = groups == g
      vv, kk = v[m], key[m]
      means = {k: vv[kk == k].mean() for k in np.unique(kk)}
      between = np.var([means[k] for k in kk])
      fr.append(between / vv.var())
    return float(np.mean(fr))

  ct = healthy.cell_type.to_numpy()
  raw = [plate_fraction(x[:, c], plate_key, ct) for c in range(5)]
  # Normalize each plate by its own Mock sites, then look at the UV sites.
  uv = (healthy.disease_condition == schema.UV_INACTIVATED).to_numpy()
  xn = np.empty_like(x)
  for k in np.unique(plate_key):
    m = plate_key == k
    ref = x[m & ~uv]
    xn[m] = x[m] / ref.mean(0)
  norm = [plate_fraction(xn[uv, c], plate_key[uv], ct[uv]) for c in range(5)]
  raw_uv = [plate_fraction(x[uv, c], plate_key[uv], ct[uv]) for c in range(5)]
  assert max(raw) > 0.5, raw
  assert np.mean(norm) < 0.5 * np.mean(raw_uv), (norm, raw_uv)
  # The planted gains and offsets explain the plate-to-plate differences:
  # with pixel = gain * signal + offset, plate 1 predicts plate 2's mean.
  truth = synthetic.read_truth(rxrx19a)
  planted = {(r.experiment, r.plate, int(r.channel), r.parameter): float(r.value)
             for r in truth[truth.kind == "plate"].itertuples()}
  err, diff = [], []
  for exp in schema.RXRX19A_EXPERIMENTS:
    for c in range(5):
      m = [x[(healthy.experiment == exp).to_numpy()
             & (healthy.plate == p).to_numpy(), c].mean() for p in ("1", "2")]
      g1, o1, g2, o2 = (planted[(exp, p, c + 1, k)] for p in ("1", "2")
                        for k in ("gain", "offset"))
      signal = (m[0] - o1) / g1
      err.append(abs(g2 * signal + o2 - m[1]))
      diff.append(abs(m[0] - m[1]))
  assert np.mean(err) < 0.35 * np.mean(diff), (np.mean(err), np.mean(diff))


def test_rxrx1_layout_and_cell_types(tmp_path):
  root = synthetic.generate(str(tmp_path), dataset="rxrx1", size=64, plates=1,
                            wells_per_plate=12, seed=0, workers=1)
  assert os.path.basename(root) == "RxRx1"
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str, keep_default_na=False)
  assert tuple(df.columns) == schema.RXRX1_COLUMNS
  assert set(df.cell_type) == set(schema.RXRX1_CELL_TYPES)
  assert set(df.well_type) == set(schema.RXRX1_WELL_TYPES)
  assert set(df.site.astype(int)) == set(schema.RXRX1_SITES)
  assert (df.sirna[df.well_type == "negative_control"] == "EMPTY").all()
  r = df.iloc[0]
  for ch in range(1, 7):
    assert os.path.exists(os.path.join(root, "images", schema.image_relpath(
        r.experiment, int(r.plate), r.well, int(r.site), ch)))
  # Distinct morphology: the four cell types separate on image statistics.
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import cross_val_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  x = _site_stats(root, df, channels=6)
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  acc = cross_val_score(clf, x, df.cell_type.to_numpy(), cv=4).mean()
  assert acc > 0.8, acc


def test_bad_arguments():
  with pytest.raises(ValueError, match="dataset"):
    synthetic.generate("/nonexistent", dataset="rxrx2")
  with pytest.raises(ValueError, match="wells_per_plate"):
    synthetic.generate("/nonexistent", wells_per_plate=5)


# --------------------------------------------------------------------------
# Difficulty modes.

# Digests (decoded pixels of every PNG, plus the CSV files, in path order) of
# trees written by the code before the hard modes existed (commit d5d8ce4):
# the easy mode must stay byte for byte the same.
EASY_DIGESTS = {
    "rxrx19a": "dae9afeb8dc966e7b368f9bef9e827d8a3f06c9b23c9029fbe86c89053684ba9",
    "rxrx1": "ee8cf55c08fb514f980ecced32344ca3d87ff0d6ee45cf284c94cd7e4ef9a864",
}


def _tree_digest(root):
  import hashlib
  h = hashlib.sha256()
  for dp, dn, fn in sorted(os.walk(root)):
    dn.sort()
    for f in sorted(fn):
      p = os.path.join(dp, f)
      h.update(os.path.relpath(p, root).encode())
      if f.endswith(".png"):
        h.update(np.asarray(Image.open(p)).tobytes())
      else:
        with open(p, "rb") as fh:
          h.update(fh.read())
  return h.hexdigest()


def test_easy_mode_unchanged(tmp_path):
  a = synthetic.generate(str(tmp_path / "a"), dataset="rxrx19a", size=32,
                         plates=[1], wells_per_plate=16, seed=3, workers=1)
  b = synthetic.generate(str(tmp_path / "b"), dataset="rxrx1", size=32,
                         plates=[1], wells_per_plate=8, seed=3, workers=1,
                         difficulty="easy")
  assert _tree_digest(a) == EASY_DIGESTS["rxrx19a"]
  assert _tree_digest(b) == EASY_DIGESTS["rxrx1"]


@pytest.fixture(scope="module", params=["hard", "hard2"])
def hard(request, tmp_path_factory):
  out = tmp_path_factory.mktemp(request.param)
  root = synthetic.generate(str(out), dataset="rxrx19a", size=48, plates=2,
                            wells_per_plate=16, seed=5, workers=1,
                            difficulty=request.param)
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  sites = pd.read_csv(os.path.join(root, synthetic.SITES_FILE), dtype={"site_id": str})
  df = df.merge(sites, on="site_id")
  ctrl = df[(df.treatment == "") & df.disease_condition.isin(
      [schema.MOCK, schema.ACTIVE])].reset_index(drop=True)
  images = np.stack([np.stack([np.asarray(Image.open(os.path.join(
      root, "images", schema.image_relpath(r.experiment, int(r.plate), r.well,
                                           int(r.site), ch))))
      for ch in range(1, 6)], -1) for r in ctrl.itertuples()])
  return dict(root=root, difficulty=request.param, ctrl=ctrl, images=images)


def _balanced_accuracy(x, y, groups=None):
  from sklearn.metrics import balanced_accuracy_score
  from sklearn.model_selection import (GroupKFold, StratifiedKFold,
                                       cross_val_predict)
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from sklearn.svm import LinearSVC
  clf = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=20000))
  if groups is None:
    pred = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True,
                                                           random_state=0))
  else:
    pred = cross_val_predict(clf, x, y, cv=GroupKFold(len(set(groups))),
                             groups=groups)
  return balanced_accuracy_score(y, pred)


def test_hard_intensity_statistics_do_not_separate(hard):
  from gandl_jax.baselines import classical
  ctrl, images = hard["ctrl"], hard["images"]
  # Mean, std, 1/5/25/50/75/95/99th percentiles of every channel.
  x = np.array([np.concatenate([classical.intensity_statistics(im[..., c])
                                for c in range(5)]) for im in images])
  assert x.shape == (len(ctrl), 45)
  y = (ctrl.disease_condition == schema.ACTIVE).to_numpy()
  groups = (ctrl.experiment + "/" + ctrl.plate).to_numpy()
  assert 60 < y.sum() < len(y) - 40
  assert _balanced_accuracy(x, y, groups) <= 0.65
  assert _balanced_accuracy(x, y) <= 0.65
  # Nor do they separate the cell types.
  assert _balanced_accuracy(x, (ctrl.cell_type == "HRCE").to_numpy(), groups) <= 0.65


def test_hard_signal_exists(hard):
  from gandl_jax.baselines import classical
  ctrl = hard["ctrl"]
  y = (ctrl.disease_condition == schema.ACTIVE).to_numpy()
  groups = (ctrl.experiment + "/" + ctrl.plate).to_numpy()
  # The planted per-site severity separates the classes ...
  assert _balanced_accuracy(ctrl[["severity"]].to_numpy(float), y, groups) >= 0.95
  assert (ctrl.severity[~y] == 0).all() and ctrl.severity[y].mean() > 0.6
  # ... and the images carry it in their morphology: texture, granularity,
  # colocalization and nuclei features (intensity statistics left out).
  names = classical.feature_names(5)
  morph = [i for i, n in enumerate(names)
           if not any(n.endswith(f"_{s}") for s in classical.INTENSITY)]
  x = classical.features(hard["images"])[:, morph]
  assert _balanced_accuracy(x, y, groups) >= 0.8


def test_hard_truth_files(hard):
  root = hard["root"]
  truth = synthetic.read_truth(root)
  assert tuple(truth.columns) == synthetic.TRUTH_COLUMNS
  gen = truth[truth.kind == "generator"].set_index("parameter").value
  assert gen["difficulty"] == hard["difficulty"]
  assert {"gain", "offset", "vignetting"} <= set(truth[truth.kind == "plate"].parameter)
  comp = synthetic.compound_truth(root)
  assert comp["Remdesivir (GS-5734)"]["ec50_uM"] == pytest.approx(0.5)
  sites = pd.read_csv(os.path.join(root, synthetic.SITES_FILE))
  assert tuple(sites.columns) == synthetic.SITES_COLUMNS
  pheno = truth[(truth.kind == "infection") & (truth.parameter == "phenotype")]
  assert "nucleoli" in pheno.value.iloc[0]


def test_match_histogram_takes_the_target_at_each_rank():
  rng = np.random.default_rng(0)
  img = rng.random((2, 8, 8))
  q = np.stack([np.linspace(0, 100, 5), np.linspace(10, 20, 5) ** 2])
  out = synthetic.match_histogram(img, q)
  p = (np.arange(64) + 0.5) / 64
  for c in range(2):
    expect = np.interp(p, np.linspace(0, 1, 5), q[c])
    np.testing.assert_allclose(np.sort(out[c].ravel()), expect)
    # Ranks are kept: the brightest input pixel gets the brightest value.
    np.testing.assert_array_equal(np.argsort(out[c].ravel()),
                                  np.argsort(img[c].ravel()))


def test_hard_deterministic_and_independent_of_workers(tmp_path):
  kw = dict(dataset="rxrx1", size=32, plates=[1], wells_per_plate=6, seed=2,
            difficulty="hard")
  a = synthetic.generate(str(tmp_path / "a"), workers=1, **kw)
  b = synthetic.generate(str(tmp_path / "b"), workers=2, **kw)
  assert _tree_digest(a) == _tree_digest(b)
  with pytest.raises(ValueError, match="difficulty"):
    synthetic.generate(str(tmp_path / "c"), difficulty="medium")
  assert set(synthetic.DIFFICULTIES) == set(synthetic.DESIGNS) == {
      "easy", "hard", "hard2"}
