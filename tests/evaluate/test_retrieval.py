"""Retrieval metrics (copairs mAP, percent replicating, energy distance) and
the normalizations, against brute-force numpy references."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from gandl_jax.evaluate import normalize, retrieval
from gandl_jax.evaluate.pipeline import Options, normalization_method
from gandl_jax.evaluate.io import TableSpec, load_embeddings

NULL = 20_000


def _table(rng, dim=6):
  """One plate: 6 control wells, compounds A (planted), B, C x 3 wells."""
  rows, feats = [], []
  shift = np.zeros(dim)
  shift[:2] = 6.0
  for i in range(6):
    rows.append(("", f"C{i:02d}"))
    feats.append(rng.standard_normal(dim))
  for comp, s in (("A", shift), ("B", 0.0), ("C", 0.0)):
    for r in range(3):
      rows.append((comp, f"{comp}{r:02d}"))
      feats.append(rng.standard_normal(dim) + s)
  md = pd.DataFrame(rows, columns=["treatment", "well"])
  md["experiment"], md["plate"] = "E", 1
  md["well_id"] = "E_1_" + md["well"]
  md["site_id"] = md["well_id"] + "_1"
  md["treatment_conc"] = np.where(md["treatment"] == "", np.nan, 1.0)
  return md, np.asarray(feats, np.float32)


def _ap(sim_pos, sim_neg):
  """Average precision of one ranked list (descending similarity)."""
  s = np.concatenate([sim_pos, sim_neg])
  rel = np.concatenate([np.ones(len(sim_pos)), np.zeros(len(sim_neg))])
  rel = rel[np.argsort(-s, kind="stable")]
  hits = np.cumsum(rel)
  return float((hits / np.arange(1, len(rel) + 1))[rel == 1].mean())


def _cos(X):
  U = X / np.linalg.norm(X, axis=1, keepdims=True)
  return U @ U.T


def _exact_null(n_pos, n_total):
  """Every placement of the positives in a ranked list of n_total."""
  vals = []
  for pos in itertools.combinations(range(n_total), n_pos):
    ranks = np.array(pos) + 1
    vals.append(np.mean(np.arange(1, n_pos + 1) / ranks))
  return np.array(vals)


def _bh(p):
  p = np.asarray(p, float)
  order = np.argsort(p)
  m = len(p)
  q = p[order] * m / np.arange(1, m + 1)
  q = np.minimum.accumulate(q[::-1])[::-1]
  out = np.empty(m)
  out[order] = np.minimum(q, 1.0)
  return out


@pytest.mark.parametrize("negatives", ["plate", "all"])
def test_map_and_pvalues_equal_brute_force(negatives):
  """One plate: plate-local negatives (block lookup of the similarities) and
  all negatives (similarities from the rows) give the same ranking."""
  md, X = _table(np.random.default_rng(0))
  cfg = retrieval.RetrievalConfig(null_size=NULL, seed=1, negatives=negatives)
  summary, table = retrieval.phenotypic_activity(md, X, cfg)
  S = _cos(X.astype(np.float64))
  ctrl = np.flatnonzero(md["treatment"] == "")
  null = _exact_null(2, 2 + len(ctrl))
  got = table.set_index("treatment")
  for comp in ("A", "B", "C"):
    rows = np.flatnonzero(md["treatment"] == comp)
    aps = [_ap(S[q, [r for r in rows if r != q]], S[q, ctrl]) for q in rows]
    m = float(np.mean(aps))
    assert got.loc[comp, "mean_average_precision"] == pytest.approx(m, abs=1e-6)
    # copairs: p = (1 + #{null > mAP}) / (1 + null_size); all queries share
    # one configuration, so the null is that of one AP (exact here).
    p_exact = float((null > m + 1e-9).mean())
    expect = (1 + NULL * p_exact) / (1 + NULL)
    tol = 4 * np.sqrt(max(p_exact * (1 - p_exact), 1e-4) / NULL) + 1e-4
    assert got.loc[comp, "p_value"] == pytest.approx(expect, abs=tol), comp
  np.testing.assert_allclose(got["corrected_p_value"], _bh(got["p_value"]),
                             rtol=1e-9)
  assert got.loc["A", "mean_average_precision"] > 0.9
  assert summary["n_reference_profiles"] == 6
  assert summary["n_scored"] == 3
  assert summary["fraction_retrieved"] == pytest.approx(
      float((got["corrected_p_value"] < 0.05).mean()))


def test_same_well_pairs_are_excluded():
  """Site-level profiles: two identical sites of one well would retrieve each
  other perfectly; the guard leaves them out of the positive pairs."""
  rng = np.random.default_rng(3)
  md, X = _table(rng)
  # Two sites per well; the second site of each A well copies the first.
  md2 = md.loc[md.index.repeat(2)].reset_index(drop=True)
  md2["site"] = np.tile([1, 2], len(md))
  md2["site_id"] = md2["well_id"] + "_" + md2["site"].astype(str)
  X2 = np.repeat(X, 2, axis=0) + 0.01 * rng.standard_normal(
      (2 * len(X), X.shape[1])).astype(np.float32)
  cfg = retrieval.RetrievalConfig(level="site", null_size=500)
  _, table = retrieval.phenotypic_activity(md2, X2, cfg)
  S = _cos(X2.astype(np.float64))
  ctrl = np.flatnonzero(md2["treatment"] == "")
  wells = md2["well_id"].to_numpy()
  got = table.set_index("treatment")
  for comp in ("A", "B", "C"):
    rows = np.flatnonzero(md2["treatment"] == comp)
    guarded = np.mean([_ap(S[q, [r for r in rows if wells[r] != wells[q]]],
                           S[q, ctrl]) for q in rows])
    unguarded = np.mean([_ap(S[q, [r for r in rows if r != q]], S[q, ctrl])
                         for q in rows])
    assert got.loc[comp, "mean_average_precision"] == pytest.approx(
        guarded, abs=1e-6)
    if comp != "A":
      assert unguarded > guarded + 0.05   # the same-well twin would win
  # Same-plate guard: every replicate is on plate 1, so nothing is scored.
  with pytest.raises(retrieval.TaskError, match="no compound-dose has replicates in two plates"):
    retrieval.phenotypic_activity(md2, X2, retrieval.RetrievalConfig(
        level="site", null_size=100, exclude_same_plate=True))


def test_percent_replicating_and_consistency():
  rng = np.random.default_rng(5)
  dim, rows, feats = 16, [], []
  dirs = np.linalg.qr(rng.standard_normal((dim, 8)))[0].T
  for c in range(8):
    for r in range(4):
      planted = c < 4
      rows.append((f"K{c}", f"P{r}", f"W{c:02d}{r}", "t1" if c % 2 else "t2"))
      feats.append(rng.standard_normal(dim) * 0.5 +
                   (4 * dirs[c] if planted else 0))
  for i in range(12):
    rows.append(("", f"P{i % 4}", f"N{i:02d}", ""))
    feats.append(rng.standard_normal(dim) * 0.5)
  md = pd.DataFrame(rows, columns=["treatment", "plate", "well", "target"])
  md["experiment"] = "E"
  md["well_id"] = "E_" + md["plate"] + "_" + md["well"]
  md["site_id"] = md["well_id"] + "_1"
  X = np.asarray(feats, np.float32)
  cfg = retrieval.RetrievalConfig(replicate_null=300, seed=0)
  s, t = retrieval.percent_replicating(md, X, cfg)
  t = t.set_index("treatment")
  S = _cos(X.astype(np.float64))
  for c in range(8):
    r = np.flatnonzero(md["treatment"] == f"K{c}")
    med = np.median(S[np.ix_(r, r)][np.triu_indices(len(r), 1)])
    assert t.loc[f"K{c}", "median_replicate_cosine"] == pytest.approx(
        med, abs=1e-5)
    assert t.loc[f"K{c}", "replicating"] == (med > t.loc[f"K{c}", "null_p95"])
  # The 4 planted compounds replicate, the 4 noise ones do not.
  assert t.loc[[f"K{c}" for c in range(4)], "replicating"].all()
  assert not t.loc[[f"K{c}" for c in range(4, 8)], "replicating"].any()
  assert s["percent_replicating"] == 50.0
  # Consistency on all doses: the planted compounds are orthogonal, so the
  # annotation (odd / even) is not retrievable beyond chance: mAP < 0.9.
  cfg2 = retrieval.RetrievalConfig(annotation="target", consistency_on="all",
                                   null_size=500)
  sc, tc = retrieval.phenotypic_consistency(md, X, None, cfg2)
  assert sc["n_compounds"] == 8 and sc["n_annotations"] == 2
  assert set(tc["annotation"]) == {"t1", "t2"}


def test_energy_distance_matches_scipy_in_1d():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(40), rng.standard_normal(30) + 0.7
  e = retrieval.energy_distance(a[:, None], b[:, None])
  assert np.sqrt(e) == pytest.approx(scipy.stats.energy_distance(a, b),
                                     rel=1e-9)
  e2, p = retrieval.energy_test(a[:, None], b[:, None], 200,
                                np.random.default_rng(1))
  assert e2 == pytest.approx(e) and p < 0.05
  _, p_null = retrieval.energy_test(a[:20, None], a[20:, None], 200,
                                    np.random.default_rng(1))
  assert p_null > 0.05


def test_robust_plate_normalize_equals_numpy_median_mad():
  rng = np.random.default_rng(2)
  X = (rng.standard_normal((60, 5)) * [1, 2, 3, 4, 5] + 7).astype(np.float32)
  X[:, 4] = 3.0                                   # a constant feature
  plates = np.repeat(["p1", "p2"], 30)
  ctrl = rng.random(60) < 0.5
  out, info = normalize.robust_plate_normalize(X, plates, ctrl, min_controls=4)
  for p in ("p1", "p2"):
    rows = plates == p
    ref = X[rows & ctrl].astype(np.float64)
    med = np.median(ref, axis=0)
    mad = scipy.stats.median_abs_deviation(ref, axis=0, scale="normal")
    scale = np.where(mad > 0, mad + 1e-18, 1.0)
    np.testing.assert_allclose(out[rows], (X[rows] - med) / scale, rtol=1e-5,
                               atol=1e-5)
  assert info.plates == 2 and not info.fallback_plates


def _batches(rng, n_batches=3, n_ctrl=400, n_trt=200, dim=5):
  """Affine batch effects on a shared control distribution; treated rows are
  shifted by delta before the batch effect."""
  L = rng.standard_normal((dim, dim)) * 0.5 + np.eye(dim)
  delta = np.array([1.5, -1.0, 0.0, 0.5, 0.0])
  X, b, c = [], [], []
  for k in range(n_batches):
    A = np.eye(dim) + 0.4 * rng.standard_normal((dim, dim))
    off = 3 * rng.standard_normal(dim)
    z = rng.standard_normal((n_ctrl + n_trt, dim)) @ L.T
    z[n_ctrl:] += delta
    X.append(z @ A.T + off)
    b += [f"b{k}"] * (n_ctrl + n_trt)
    c += [True] * n_ctrl + [False] * n_trt
  Sigma = L @ L.T
  maha = float(np.sqrt(delta @ np.linalg.solve(Sigma, delta)))
  return (np.concatenate(X).astype(np.float32), np.array(b), np.array(c),
          maha)


@pytest.mark.parametrize("shrinkage,tol", [(0.0, 1e-3), (None, 1e-3)])
def test_tvn_identity_control_covariance_and_planted_difference(shrinkage,
                                                                 tol):
  X, b, ctrl, maha = _batches(np.random.default_rng(7))
  Z, info = normalize.tvn(X, b, ctrl, shrinkage=shrinkage)
  assert info.batches == 3 and info.components == 5
  assert set(info.shrinkage.values()) == {0.0}
  for k in np.unique(b):
    ref = Z[(b == k) & ctrl].astype(np.float64)
    np.testing.assert_allclose(np.cov(ref, rowvar=False), np.eye(5), atol=tol)
    np.testing.assert_allclose(ref.mean(0), 0.0, atol=1e-4)
    # The treatment shift survives as its Mahalanobis length, in every batch.
    diff = Z[(b == k) & ~ctrl].mean(0) - ref.mean(0)
    assert np.linalg.norm(diff) == pytest.approx(maha, rel=0.15)


def test_tvn_shrinks_batches_with_few_controls():
  X, b, ctrl, _ = _batches(np.random.default_rng(8), n_ctrl=8, n_trt=20)
  Z, info = normalize.tvn(X, b, ctrl, min_controls=4)
  assert np.isfinite(Z).all()
  assert all(0 < a <= 1 for a in info.shrinkage.values())


def _cellprofiler_csv(path, rng):
  rows = []
  plates = ["BR00116991", "BR00116992"]
  comps = [("DMSO", "control", "")] + [(f"BRD-{i}", "trt", f"T{i % 2}")
                                       for i in range(6)]
  dim = 12
  dirs = rng.standard_normal((len(comps), dim))
  for p_i, plate in enumerate(plates):
    w = 0
    for c_i, (comp, ptype, target) in enumerate(comps):
      for r in range(6 if comp == "DMSO" else 3):
        well = f"{'ABCDEFGH'[w // 12]}{w % 12 + 1:02d}"
        w += 1
        x = rng.standard_normal(dim) + 2.0 * p_i + (
            2.5 * dirs[c_i] if c_i in (1, 2, 3) else 0)
        rec = {"Metadata_Plate": plate, "Metadata_Well": well,
               "Metadata_broad_sample": comp, "Metadata_pert_type": ptype,
               "Metadata_mmoles_per_liter": 0 if comp == "DMSO" else 10,
               "Metadata_target": target}
        for j in range(dim):
          comp_name = ("Cells", "Cytoplasm", "Nuclei")[j % 3]
          rec[f"{comp_name}_Feature_{j}"] = x[j]
        rows.append(rec)
  pd.DataFrame(rows).to_csv(path, index=False)


def test_cellprofiler_table_loads_with_defaults_and_mapping(tmp_path):
  p = tmp_path / "profiles.csv"
  _cellprofiler_csv(p, np.random.default_rng(0))
  emb = load_embeddings(str(p))
  assert emb.dim == 12
  assert set(emb.meta["plate"]) == {"BR00116991", "BR00116992"}
  assert (emb.meta["well_type"] == "negative_control").sum() == 12
  assert emb.meta["site_id"].is_unique
  # The same table through an explicit mapping and feature regex.
  df = pd.read_csv(p).rename(columns=lambda c: c.replace("Metadata_", "m_"))
  df.to_csv(tmp_path / "other.csv", index=False)
  spec = TableSpec.parse("plate=m_Plate,well=m_Well,treatment=m_broad_sample",
                         r"^(Cells|Cytoplasm|Nuclei)_", "DMSO")
  emb2 = load_embeddings(str(tmp_path / "other.csv"), spec=spec)
  np.testing.assert_array_equal(emb2.features, emb.features)
  assert (emb2.meta["well_type"] == "negative_control").sum() == 12
  with pytest.raises(ValueError, match="not found"):
    load_embeddings(str(tmp_path / "other.csv"),
                    spec=TableSpec.parse("plate=Nope,well=m_Well"))
  with pytest.raises(ValueError, match="ours=theirs"):
    TableSpec.parse("plate")


@pytest.mark.e2e
def test_cellprofiler_table_through_gandl_evaluate(tmp_path):
  p = tmp_path / "profiles.csv"
  _cellprofiler_csv(p, np.random.default_rng(1))
  out = tmp_path / "out"
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.evaluate", f"--embeddings={p}",
       f"--output={out}", "--tasks=activity,replicates",
       "--normalization=robust_plate", "--annotation_column=Metadata_target",
       "--consistency_on=all", "--null_size=2000", "--compounds=BRD-0"],
      capture_output=True, text=True, cwd=repo,
      env=dict(os.environ, PYTHONPATH=repo))
  assert r.returncode == 0, r.stderr[-2000:]
  with open(out / "metrics.json") as f:
    m = json.load(f)
  e = m["embeddings"]["embeddings"]
  assert m["options"]["normalization"] == "robust_plate"
  assert e["activity"]["status"] == "ok", e["activity"]
  assert e["activity"]["n_compound_doses"] == 6
  assert e["activity"]["n_reference_profiles"] == 12
  top = {r["treatment"] for r in e["activity"]["top"][:3]}
  assert top == {"BRD-0", "BRD-1", "BRD-2"}
  assert e["replicates"]["status"] == "ok"
  assert e["replicates"]["energy_distance"]["rows"][0]["treatment"] == "BRD-0"
  assert e["consistency"]["status"] == "ok", e["consistency"]
  assert (out / "map_activity_embeddings.csv").exists()
  report = (out / "report.md").read_text()
  assert "Phenotypic activity" in report


def test_compound_dose_consensus_equals_groupby_mean():
  md, X = _table(np.random.default_rng(4))
  md["treatment_conc"] = np.where(md["treatment"] == "", np.nan,
                                  np.tile([1.0, 10.0, 1.0], 8)[:len(md)])
  mg, Xg = normalize.aggregate_compound_doses(md, X)
  treated = md["treatment"] != ""
  ref = pd.DataFrame(X[treated.to_numpy()]).groupby(
      [md.loc[treated, "treatment"].to_numpy(),
       md.loc[treated, "treatment_conc"].to_numpy()]).mean()
  got = mg[mg["treatment"] != ""].set_index(["treatment", "treatment_conc"])
  assert len(got) == len(ref)
  for key, row in ref.iterrows():
    i = mg.index[(mg["treatment"] == key[0]) &
                 (mg["treatment_conc"] == key[1])][0]
    np.testing.assert_allclose(Xg[i], row.to_numpy(), rtol=1e-5)
  # Controls: one consensus per plate.
  assert (mg["treatment"] == "").sum() == 1
  assert int(mg["n_rows"].sum()) == len(md)


def test_normalization_flag_and_old_alias():
  assert normalization_method(Options()) == "plate"
  assert normalization_method(Options(normalization="tvn")) == "tvn"
  # The old `normalize=False` (--nonormalize) still means no normalization.
  assert normalization_method(Options(normalize=False,
                                      normalization="tvn")) == "none"
  with pytest.raises(ValueError, match="normalization must be one of"):
    normalization_method(Options(normalization="zscore"))


def test_center_on_reference_zeroes_each_plates_reference_mean():
  md, X = _table(np.random.default_rng(6))
  md2 = pd.concat([md, md.assign(plate=2)], ignore_index=True)
  X2 = np.concatenate([X, X + 5.0])
  Z, info = retrieval.center_on_reference(md2, X2)
  ref = (md2["treatment"] == "").to_numpy()
  for p in (1, 2):
    rows = (md2["plate"] == p).to_numpy()
    np.testing.assert_allclose(Z[rows & ref].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(Z[rows], X2[rows] - X2[rows & ref].mean(0),
                               atol=1e-5)
  assert info["plates_without_reference"] == 0


def test_tvn_few_controls_equals_shrunk_coral_reference():
  """A batch with fewer controls than components (b1: the n x n Gram path)
  and one with more (b0: the k x k path) both match (x W - mu) S^-1/2, S
  the shrunk control covariance, computed with scipy."""
  import scipy.linalg  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(9)
  dim = 12
  X = rng.standard_normal((200, dim)).astype(np.float32)
  X[100:] = X[100:] * 1.7 + 2.0
  b = np.repeat(["b0", "b1"], 100)
  ctrl = np.zeros(200, bool)
  ctrl[:8] = ctrl[50:90] = True            # b0: 48 controls
  ctrl[100:108] = True                      # b1: 8 controls < 12 components
  Z, info = normalize.tvn(X, b, ctrl, shrinkage=0.3, min_controls=4)
  w = normalize.fit_whitening(X[ctrl])
  W = w.components * w.scale[None, :]
  for k in ("b0", "b1"):
    rows = b == k
    ref = (X[rows & ctrl].astype(np.float64) - w.mean) @ W
    mu = ref.mean(0)
    C = np.cov(ref, rowvar=False)
    S = 0.7 * C + 0.3 * np.trace(C) / C.shape[0] * np.eye(C.shape[0])
    T = np.linalg.inv(np.real(scipy.linalg.sqrtm(S)))
    expect = ((X[rows].astype(np.float64) - w.mean) @ W - mu) @ T
    np.testing.assert_allclose(Z[rows], expect, rtol=1e-3, atol=1e-3)
  assert info.shrinkage == {"b0": 0.3, "b1": 0.3}


def test_ledoit_wolf_from_gram_equals_sklearn():
  """The O(n) Ledoit-Wolf coefficient of TVN equals scikit-learn's, for
  fewer and for more rows than columns."""
  from sklearn.covariance import ledoit_wolf_shrinkage  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(11)
  for n, k in ((9, 30), (60, 20), (1500, 1100)):
    R = rng.standard_normal((n, k)) @ (np.eye(k) + 0.3 * rng.standard_normal(
        (k, k)))
    R -= R.mean(0)
    G = R @ R.T if n < k else R.T @ R
    got = normalize.ledoit_wolf_shrinkage(np.einsum("ij,ij->i", R, R),
                                          float(np.square(G).sum()), k)
    assert got == pytest.approx(ledoit_wolf_shrinkage(R, assume_centered=True),
                                rel=1e-9)


def test_tvn_ledoit_wolf_equals_reference_and_inplace():
  """Default shrinkage (Ledoit-Wolf, sklearn's coefficient) on a batch with
  fewer controls than components matches the scipy reference; inplace
  writes the same values into X."""
  import scipy.linalg  # pylint: disable=import-outside-toplevel
  from sklearn.covariance import ledoit_wolf_shrinkage  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(12)
  dim = 12
  scales = np.geomspace(0.1, 10, dim)      # far from isotropic: a < 1
  X = (rng.standard_normal((200, dim)) * scales).astype(np.float32)
  X[100:] = X[100:] * 1.7 + 2.0
  X[100:, :6] *= 5.0                        # the batches' covariances
  X[:100, 6:] *= 5.0                        # differ
  b = np.repeat(["b0", "b1"], 100)
  ctrl = np.zeros(200, bool)
  ctrl[:8] = ctrl[50:62] = True            # b0: 20 controls (k <= n < 2k)
  ctrl[100:109] = True                      # b1: 9 controls < 12 components
  Z, info = normalize.tvn(X, b, ctrl, min_controls=4)
  w = normalize.fit_whitening(X[ctrl])
  W = w.components * w.scale[None, :]
  for k in ("b0", "b1"):
    rows = b == k
    ref = (X[rows & ctrl].astype(np.float64) - w.mean) @ W
    mu = ref.mean(0)
    a = ledoit_wolf_shrinkage(ref - mu, assume_centered=True)
    assert 0 < a < 1 and info.shrinkage[k] == round(a, 6)
    C = np.cov(ref, rowvar=False)
    S = (1 - a) * C + a * np.trace(C) / C.shape[0] * np.eye(C.shape[0])
    T = np.linalg.inv(np.real(scipy.linalg.sqrtm(S)))
    expect = ((X[rows].astype(np.float64) - w.mean) @ W - mu) @ T
    np.testing.assert_allclose(Z[rows], expect, rtol=1e-3, atol=1e-3)
  X2 = X.copy()
  Z2, _ = normalize.tvn(X2, b, ctrl, min_controls=4, inplace=True)
  assert np.shares_memory(Z2, X2)
  np.testing.assert_allclose(Z2, Z, rtol=1e-6, atol=1e-6)


def test_perturbation_keys_equal_per_row_formatting():
  """Concentrations formatted once per distinct value give the keys of the
  per-row definition `treatment @ f"{conc:.6g}" [cell_type]`."""
  rng = np.random.default_rng(13)
  conc = rng.choice([0.01, 0.0316227766, 1.0, 3.16227766, 10.0, np.nan,
                     np.inf, 1e-7, 12345678.0], 200)
  meta = pd.DataFrame({"treatment": rng.choice(["A", "B", ""], 200),
                       "treatment_conc": conc,
                       "cell_type": rng.choice(["HRCE", "VERO", None], 200)})
  expect = [f"{t} @ {f'{c:.6g}' if np.isfinite(c) else ''} "
            f"[{'' if pd.isna(ct) else ct}]"
            for t, c, ct in zip(meta["treatment"], conc, meta["cell_type"])]
  assert list(retrieval.perturbation_keys(meta)) == expect


def test_empty_and_constant_feature_columns_cost_no_row(tmp_path):
  """An all-NaN feature column (common in CellProfiler tables) and a
  constant one are dropped and named; every row is kept and the tasks run."""
  p = tmp_path / "profiles.csv"
  _cellprofiler_csv(p, np.random.default_rng(2))
  df = pd.read_csv(p)
  df["Cells_Empty_Measurement"] = np.nan
  df["Nuclei_Constant_Measurement"] = 3.0
  df.loc[5, "Cytoplasm_Feature_1"] = np.nan    # a genuinely bad row
  df.to_csv(p, index=False)
  emb = load_embeddings(str(p))
  assert len(emb.meta) == len(df) - 1
  assert emb.dim == 12
  text = "\n".join(emb.issues)
  assert "1 empty (no finite value) feature column(s) dropped" in text
  assert "Cells_Empty_Measurement" in text
  assert "1 constant feature column(s) dropped" in text
  assert "Nuclei_Constant_Measurement" in text
  assert "1 row(s) with missing, NaN" in text
  # The same through gandl-evaluate's library: the retrieval tasks run.
  from gandl_jax.evaluate import evaluate
  from gandl_jax.evaluate.pipeline import EmbeddingSet
  import dataclasses
  opts = dataclasses.replace(Options(), retrieval=retrieval.RetrievalConfig(
      null_size=500), threads=1)
  m = evaluate([EmbeddingSet("cp", str(p))], str(tmp_path / "out"),
               tasks=["activity"], options=opts, log=lambda s: None)
  e = m["embeddings"]["cp"]
  assert e["input"]["rows"] == len(df) - 1
  assert e["activity"]["status"] == "ok", e["activity"]
  # Every column empty or constant: one line naming the file.
  df2 = df.copy()
  for c in df2.columns:
    if c.startswith(("Cells_", "Cytoplasm_", "Nuclei_")):
      df2[c] = np.nan
  df2.to_csv(tmp_path / "empty.csv", index=False)
  with pytest.raises(ValueError, match="empty.csv: every one of the 14"):
    load_embeddings(str(tmp_path / "empty.csv"))


def _one_well_each(md, X, compounds):
  """Keeps one well of each compound in `compounds` (and all of the rest)."""
  keep = np.ones(len(md), bool)
  for c in compounds:
    rows = np.flatnonzero(md["treatment"].to_numpy() == c)
    keep[rows[1:]] = False
  return md.loc[keep].reset_index(drop=True), X[keep]


def test_compounds_without_replicates_named_rest_scored(tmp_path):
  """Compound-doses in a single well are named and left out; the others are
  scored. None with replicates: one clear reason, not copairs' text."""
  md, X = _table(np.random.default_rng(0))
  cfg = retrieval.RetrievalConfig(null_size=500)
  m1, X1 = _one_well_each(md, X, ["B"])
  summary, table = retrieval.phenotypic_activity(m1, X1, cfg)
  assert summary["without_replicates"] == ["B @ 1"]
  assert summary["n_scored"] == 2
  rep, _ = retrieval.percent_replicating(m1, X1, cfg)
  assert rep["n_without_replicates"] == 1 and rep["n_scored"] == 2
  m0, X0 = _one_well_each(md, X, ["A", "B", "C"])
  for fn in (retrieval.phenotypic_activity, retrieval.percent_replicating):
    with pytest.raises(retrieval.TaskError) as e:
      fn(m0, X0, cfg)
    msg = str(e.value)
    assert "Unable to find" not in msg
    assert "no compound-dose has replicates in two wells" in msg
    assert "all 3 lack them" in msg
