"""Per-plate normalization, PCA whitening and well aggregation vs numpy."""
import numpy as np
import pandas as pd

from gandl_jax.evaluate import normalize


def _plates(n_plates=5, per_plate=60, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  plates = np.repeat([f"HRCE-1_{p + 1}" for p in range(n_plates)], per_plate)
  controls = np.tile(np.arange(per_plate) % 3 == 0, n_plates)
  group = np.tile(np.arange(per_plate) % 2, n_plates)      # a biological effect
  signal = np.outer(group, np.linspace(1, 2, dim))
  shifts = 5.0 * rng.standard_normal((n_plates, dim))
  scales = np.exp(0.5 * rng.standard_normal(n_plates))
  noise = rng.standard_normal((n_plates * per_plate, dim))
  pidx = np.repeat(np.arange(n_plates), per_plate)
  X = (scales[pidx, None] * (noise + signal) + shifts[pidx]).astype(np.float32)
  return X, plates, controls, group


def test_plate_shift_removed_and_matches_numpy():
  X, plates, controls, group = _plates()
  Y, info = normalize.plate_normalize(X, plates, controls)
  assert info.plates == 5 and info.fallback_plates == []
  for p in np.unique(plates):
    m = plates == p
    ref = X[m & controls].astype(np.float64)
    expect = (X[m] - ref.mean(0)) / ref.std(0)
    np.testing.assert_allclose(Y[m], expect, rtol=1e-4, atol=1e-4)
  # The planted plate shift dominates before, is gone after: per-plate means
  # of the same biological group agree across plates.
  def spread(Z):
    means = np.stack([Z[(plates == p) & (group == 1)].mean(0)
                      for p in np.unique(plates)])
    return means.std(0).max()
  assert spread(X) > 2.0
  assert spread(Y) < 0.5
  # The biological effect survives.
  diff = Y[group == 1].mean(0) - Y[group == 0].mean(0)
  assert (diff > 0.5).all()
  # Input untouched unless inplace.
  assert not np.shares_memory(X, Y)


def test_fallback_to_all_wells():
  X, plates, controls, _ = _plates(n_plates=2)
  controls = controls.copy()
  controls[plates == "HRCE-1_2"] = False
  Y, info = normalize.plate_normalize(X, plates, controls, min_controls=4)
  assert info.fallback_plates == ["HRCE-1_2"]
  m = plates == "HRCE-1_2"
  np.testing.assert_allclose(Y[m].mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(Y[m].std(0), 1, atol=1e-3)


def test_whitening_gives_identity_covariance():
  rng = np.random.default_rng(1)
  A = rng.standard_normal((6, 6))
  X = (rng.standard_normal((4000, 6)) @ A + 3).astype(np.float32)
  w = normalize.fit_whitening(X)
  Z = w.transform(X).astype(np.float64)
  np.testing.assert_allclose(Z.mean(0), 0, atol=1e-3)
  np.testing.assert_allclose(np.cov(Z.T), np.eye(6), atol=2e-3)
  assert normalize.fit_whitening(X, n_components=2).transform(X).shape == (4000, 2)


def test_aggregate_wells_matches_groupby():
  rng = np.random.default_rng(2)
  meta = pd.DataFrame({"well_id": np.repeat(["E_1_A01", "E_1_A02", "E_1_B01"],
                                            [4, 3, 2]),
                       "site": [1, 2, 3, 4, 1, 2, 3, 1, 2]})
  meta = meta.sample(frac=1, random_state=0).reset_index(drop=True)
  X = rng.standard_normal((9, 5)).astype(np.float32)
  mw, Xw = normalize.aggregate_wells(meta, X)
  ref = pd.DataFrame(X).groupby(meta["well_id"].to_numpy()).mean()
  np.testing.assert_allclose(Xw, ref.loc[mw["well_id"]].to_numpy(), rtol=1e-6)
  assert dict(zip(mw["well_id"], mw["n_sites"])) == {"E_1_A01": 4,
                                                    "E_1_A02": 3, "E_1_B01": 2}
  assert "site" not in mw


def test_plate_normalize_bit_for_bit_in_blocks_and_threads(monkeypatch):
  """Row blocks, contiguous or scattered plates, any number of threads:
  every value is float32((float64(x) - mean_ref) / std_ref), bit for bit."""
  monkeypatch.setattr(normalize, "_NORM_BLOCK", 7)
  X, plates, controls, _ = _plates(n_plates=4, per_plate=50, dim=5)
  controls = controls.copy()
  controls[plates == "HRCE-1_3"] = False          # falls back to all rows
  perm = np.random.default_rng(2).permutation(len(X))
  for order in (np.arange(len(X)), perm):         # contiguous, scattered
    x, p, c = X[order], plates[order], controls[order]
    expect = np.empty_like(x)
    for name in np.unique(p):
      m = p == name
      ref = x[m & c] if (m & c).sum() >= 8 else x[m]
      ref = ref.astype(np.float64)
      std = np.where(ref.std(0) > 1e-6, ref.std(0), 1.0)
      expect[m] = ((x[m] - ref.mean(0)) / std).astype(np.float32)
    for threads in (1, 3):
      Y, info = normalize.plate_normalize(x, p, c, threads=threads)
      assert info.fallback_plates == ["HRCE-1_3"]
      np.testing.assert_array_equal(Y.view(np.int32), expect.view(np.int32))
