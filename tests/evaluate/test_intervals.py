"""Bootstrap intervals against closed forms and a simulation with a known
answer (coverage near the nominal level)."""
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score

from gandl_jax.evaluate import intervals as iv

# Generative model: P plates, each with N_PER[c] sites of class c. A plate's
# accuracy on class c is Beta(KAPPA * MU[c], KAPPA * (1 - MU[c])) (a plate
# random effect with mean MU[c]); each site is right with that probability.
# With fixed per-plate class counts the expected balanced accuracy is exactly
# mean(MU).
MU = np.array([0.75, 0.65])
N_PER = (16, 24)
KAPPA = 5.0
TRUE_BA = float(MU.mean())


def _plates(rng, plates, mu=MU):
  y = np.tile(np.repeat([0, 1], N_PER), plates)
  g = np.repeat(np.arange(plates), sum(N_PER))
  acc = rng.beta(KAPPA * mu, KAPPA * (1 - mu), size=(plates, 2))
  return y, g, acc[g, y]


def _predict(y, right):
  return np.where(right, y, 1 - y)


def test_point_value_equals_sklearn():
  rng = np.random.default_rng(0)
  labels = np.array(["Mock", "Active", "Irradiated"])
  y = rng.choice(labels, 300, p=[0.2, 0.5, 0.3])
  pred = np.where(rng.random(300) < 0.6, y, rng.choice(labels, 300))
  groups = rng.integers(0, 9, 300)
  ref = balanced_accuracy_score(y, pred)
  assert iv.balanced_accuracy(y, pred) == pytest.approx(ref, abs=1e-12)
  for g in (None, groups):
    d = iv.balanced_accuracy_interval(y, pred, g, n_boot=200)
    assert d["value"] == pytest.approx(ref, abs=1e-12)
    assert d["low"] < d["value"] < d["high"]
  d = iv.paired_difference_interval(y, pred, y, groups, n_boot=200)
  assert d["diff"] == pytest.approx(ref - 1.0, abs=1e-12)


def test_resampling_matches_plain_index_bootstrap():
  # Reference: the textbook cluster bootstrap, one index draw per replicate.
  rng = np.random.default_rng(1)
  y, g, p = _plates(rng, 12)
  pred = _predict(y, rng.random(len(y)) < p)
  members = [np.flatnonzero(g == k) for k in range(12)]
  right = pred == y
  ref = []
  for _ in range(4000):
    idx = np.concatenate([members[k] for k in rng.integers(0, 12, 12)])
    yi, ri = y[idx], right[idx]
    ref.append(0.5 * (ri[yi == 0].mean() + ri[yi == 1].mean()))
  ref_q = np.quantile(ref, [0.025, 0.975])
  d = iv.balanced_accuracy_interval(y, pred, g, n_boot=4000, seed=2,
                                    method="percentile")
  assert d["unit"] == "group" and d["n_units"] == 12
  assert [d["low"], d["high"]] == pytest.approx(ref_q, abs=0.012)


def test_site_interval_width_matches_binomial_closed_form():
  rng = np.random.default_rng(3)
  n = np.array([300, 500])
  y = np.repeat([0, 1], n)
  pred = _predict(y, rng.random(len(y)) < MU[y])
  d = iv.balanced_accuracy_interval(y, pred, n_boot=4000, method="percentile")
  recall = np.array([np.mean(pred[y == c] == c) for c in (0, 1)])
  se = 0.5 * math.sqrt(np.sum(recall * (1 - recall) / n))
  assert d["unit"] == "site" and d["n_units"] == len(y)
  assert (d["high"] - d["low"]) == pytest.approx(2 * 1.96 * se, rel=0.08)


def test_coverage_plate_bootstrap_near_nominal_site_bootstrap_under():
  rng = np.random.default_rng(20)
  n_sim, hit_plate, hit_site, hit_pct = 300, 0, 0, 0
  for i in range(n_sim):
    y, g, p = _plates(rng, 20)
    pred = _predict(y, rng.random(len(y)) < p)
    d = iv.balanced_accuracy_interval(y, pred, g, n_boot=1000, seed=i)
    hit_plate += d["low"] <= TRUE_BA <= d["high"]
    d = iv.balanced_accuracy_interval(y, pred, g, n_boot=1000, seed=i,
                                      method="percentile")
    hit_pct += d["low"] <= TRUE_BA <= d["high"]
    d = iv.balanced_accuracy_interval(y, pred, None, n_boot=1000, seed=i)
    hit_site += d["low"] <= TRUE_BA <= d["high"]
  cov_plate, cov_pct, cov_site = (hit_plate / n_sim, hit_pct / n_sim,
                                  hit_site / n_sim)
  # Measured: plate expanded 0.95, plate percentile 0.93, site 0.68.
  assert 0.90 <= cov_plate <= 0.98, cov_plate
  assert 0.88 <= cov_pct <= 0.98, cov_pct
  assert cov_site < 0.85, cov_site


def test_paired_identical_predictions_give_exact_zero():
  rng = np.random.default_rng(4)
  y, g, p = _plates(rng, 6)
  pred = _predict(y, rng.random(len(y)) < p)
  for method in iv.METHODS:
    d = iv.paired_difference_interval(y, pred, pred.copy(), g, n_boot=300,
                                      method=method)
    assert (d["diff"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    assert d["no_difference"] is True


def test_paired_planted_difference_excluded_zero_and_pairing_tightens():
  rng = np.random.default_rng(5)
  y, g, p = _plates(rng, 12)
  right_a = rng.random(len(y)) < p
  # b: a's predictions with 10% of a's right answers turned wrong.
  right_b = right_a & (rng.random(len(y)) >= 0.10)
  pred_a, pred_b = _predict(y, right_a), _predict(y, right_b)
  d = iv.paired_difference_interval(y, pred_a, pred_b, g)
  assert d["diff"] > 0 and d["low"] > 0 and d["no_difference"] is False
  # Unpaired, the plate effect shared by a and b swamps the difference.
  ia = iv.balanced_accuracy_interval(y, pred_a, g)
  ib = iv.balanced_accuracy_interval(y, pred_b, g)
  assert ia["low"] < ib["high"]
  assert (d["high"] - d["low"]) < 0.5 * (ia["high"] - ia["low"])
  swapped = iv.paired_difference_interval(y, pred_b, pred_a, g)
  assert swapped["diff"] == pytest.approx(-d["diff"])
  assert swapped["high"] < 0


def test_paired_difference_coverage_known_difference():
  # b keeps a right answer with prob 1 - Q and turns a wrong one right with
  # prob R: E[recall_b] = mu (1 - Q) + (1 - mu) R, so the true difference
  # is mean(MU * Q - (1 - MU) * R) = 0.09.
  q, r = 0.15, 0.05
  true_diff = float(np.mean(MU * q - (1 - MU) * r))
  rng = np.random.default_rng(21)
  n_sim, hit, excl = 300, 0, 0
  for i in range(n_sim):
    y, g, p = _plates(rng, 20)
    right_a = rng.random(len(y)) < p
    u = rng.random(len(y))
    right_b = np.where(right_a, u >= q, u < r)
    d = iv.paired_difference_interval(y, _predict(y, right_a),
                                      _predict(y, right_b), g, n_boot=1000,
                                      seed=i)
    hit += d["low"] <= true_diff <= d["high"]
    excl += not d["no_difference"]
  assert 0.90 <= hit / n_sim <= 0.98, hit / n_sim
  assert excl / n_sim > 0.9   # the difference is found nearly every time


def test_degenerate_resamples_are_redrawn():
  # Class 1 sits on one plate of ten: most replicates miss it.
  y = np.zeros(100, int)
  y[:8] = 1
  g = np.repeat(np.arange(10), 10)
  pred = y.copy()
  pred[::3] = 1 - pred[::3]
  d = iv.balanced_accuracy_interval(y, pred, g, n_boot=500)
  assert d["n_redrawn"] > 100 and d["n_dropped"] == 0 and d["n_boot"] == 500
  assert np.isfinite(d["low"]) and np.isfinite(d["high"])
  assert d["low"] <= d["value"] <= d["high"]


def test_one_unit_is_flagged_and_degenerate():
  y = np.array([0, 0, 1, 1, 1])
  pred = np.array([0, 1, 1, 1, 0])
  d = iv.balanced_accuracy_interval(y, pred, groups=["p1"] * 5, n_boot=100)
  assert d["few_units"] is True and d["n_units"] == 1
  assert d["low"] == d["high"] == d["value"]
  assert iv.balanced_accuracy_interval(y, pred, n_boot=100)["few_units"] is False


def test_bad_input_names_the_field():
  with pytest.raises(ValueError, match="y_pred"):
    iv.balanced_accuracy_interval([0, 1, 1], [0, 1])
  with pytest.raises(ValueError, match="groups"):
    iv.balanced_accuracy_interval([0, 1, 1], [0, 1, 1], groups=[1, 2])
  with pytest.raises(ValueError, match="level"):
    iv.balanced_accuracy_interval([0, 1], [0, 1], level=95)
  with pytest.raises(ValueError, match="method"):
    iv.paired_difference_interval([0, 1], [0, 1], [1, 1], method="normal")
  with pytest.raises(ValueError, match="same seeds"):
    iv.paired_seed_differences({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})
  with pytest.raises(ValueError, match="one value per seed"):
    iv.paired_seed_differences([1.0, 2.0], [1.0])


def test_mean_sd_matches_numpy():
  v = [0.81, 0.74, 0.79, 0.66]
  d = iv.mean_sd(v)
  assert d["mean"] == pytest.approx(np.mean(v))
  assert d["sd"] == pytest.approx(np.std(v, ddof=1))
  assert d["n"] == 4
  assert math.isnan(iv.mean_sd([0.5])["sd"])
  assert iv.format_mean_sd(d) == "0.750 ± 0.067 (n=4)"


def test_mean_interval_matches_closed_form():
  v = [0.70, 0.62, 0.81]
  d = iv.mean_interval(v)
  # t_{0.975, 2} = 4.302652729911275 (tables); half-width t * sd / sqrt(n).
  half = 4.302652729911275 * np.std(v, ddof=1) / math.sqrt(3)
  assert d["mean"] == pytest.approx(np.mean(v))
  assert (d["low"], d["high"]) == pytest.approx((np.mean(v) - half,
                                                 np.mean(v) + half))
  assert d["n"] == 3 and d["level"] == 0.95
  one = iv.mean_interval([0.5])
  assert one["mean"] == 0.5 and math.isnan(one["low"])
  with pytest.raises(ValueError, match="level"):
    iv.mean_interval(v, level=95)


def test_paired_seed_differences_match_scipy_t():
  a = {0: 0.81, 1: 0.74, 2: 0.79, 3: 0.70}
  b = {3: 0.61, 2: 0.72, 1: 0.69, 0: 0.70}   # paired by seed, not order
  d = iv.paired_seed_differences(a, b)
  diffs = np.array([a[s] - b[s] for s in range(4)])
  lo, hi = stats.t.interval(0.95, 3, loc=diffs.mean(),
                            scale=stats.sem(diffs))
  assert d["diff"] == pytest.approx(diffs.mean())
  assert d["sd"] == pytest.approx(diffs.std(ddof=1))
  assert (d["low"], d["high"]) == pytest.approx((lo, hi))
  # The interval excludes 0 exactly when the paired t-test rejects.
  p = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)]).pvalue
  assert d["no_difference"] == (p > 0.05)
  assert d["no_difference"] is False
  # A noisy difference over three seeds: the interval contains 0.
  e = iv.paired_seed_differences([0.1, 0.5, -0.2], [0.0, 0.0, 0.0])
  assert e["no_difference"] is True and e["low"] < 0 < e["high"]
  one = iv.paired_seed_differences([0.8], [0.7])
  assert one["no_difference"] is True and math.isnan(one["low"])


def test_format_interval():
  assert iv.format_interval({"value": 0.8123, "low": 0.7412,
                             "high": 0.8812}) == "0.812 [0.74, 0.88]"
  assert iv.format_interval({"diff": 0.05, "low": -0.021, "high": 0.12}
                            ) == "+0.050 [-0.02, 0.12]"
  assert iv.format_interval({"diff": -0.1, "low": -0.2, "high": 0.0}
                            ) == "-0.100 [-0.20, 0.00]"
  assert iv.format_interval({"value": 0.5, "low": math.nan,
                             "high": math.nan}) == "0.500"
  with pytest.raises(ValueError, match="value"):
    iv.format_interval({"low": 0.1})


def test_expanded_widens_with_few_units_only():
  rng = np.random.default_rng(6)
  y, g, p = _plates(rng, 5)
  pred = _predict(y, rng.random(len(y)) < p)
  kw = dict(groups=g, n_boot=4000, seed=1)
  pct = iv.balanced_accuracy_interval(y, pred, method="percentile", **kw)
  exp = iv.balanced_accuracy_interval(y, pred, **kw)
  assert exp["method"] == "expanded"
  # 5 units: z' = sqrt(5/4) t_4 = 3.10 against 1.96, so clearly wider.
  assert exp["low"] < pct["low"] and exp["high"] > pct["high"]
  assert (exp["high"] - exp["low"]) > 1.3 * (pct["high"] - pct["low"])
  # 200 sites as units: the two agree.
  kw["groups"] = None
  pct = iv.balanced_accuracy_interval(y, pred, method="percentile", **kw)
  exp = iv.balanced_accuracy_interval(y, pred, **kw)
  assert exp["high"] - exp["low"] == pytest.approx(pct["high"] - pct["low"],
                                                   rel=0.05)
