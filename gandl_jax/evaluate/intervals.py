"""Intervals for headline figures: bootstrap balanced accuracy, paired
differences, and means over seeds (± sd, or a t interval).

Pure numpy (and scipy.stats for the t quantile); no JAX.

Bootstrap (`balanced_accuracy_interval`, `paired_difference_interval`): the
resampled unit is a whole group when `groups` is given (held-out plates: a
cluster bootstrap, which carries the plate-to-plate variation of accuracy
into the interval) and a single site otherwise (valid only when sites are
independent; with plate effects it is too narrow). Each replicate draws as
many units as there are, with replacement, and recomputes balanced accuracy
on the pooled sites of the drawn units.

Interval (`method`): 'expanded' (default) is the percentile interval taken
at more extreme levels, z_{a'/2} = sqrt(n / (n - 1)) t_{a/2, n - 1} for n
units (Hesterberg's expanded percentile), which corrects the narrowness of
the plain percentile interval with few units and tends to it as n grows;
'percentile' and 'bca' (bias-corrected and accelerated, jackknife over
units) are the textbook ones. Coverage of a nominal 95% interval measured
by simulation (plates with a Beta plate effect on per-class accuracy,
16 + 24 sites per plate, 300 data sets; tests/evaluate/test_intervals.py
checks the same model):

    held-out plates      3     5     10    20    40
    plate, expanded      0.75  0.92  0.91  0.95  0.95
    plate, percentile    0.74  0.83  0.89  0.93  0.94
    plate, bca           0.72  0.83  0.89  0.94  0.94
    site, percentile     0.62  0.69  0.64  0.68  0.66

With fewer than MIN_UNITS units no bootstrap interval reaches its level
(`few_units` in the result says so).

Degenerate replicates: a replicate whose drawn units hold no site of one of
the classes present in `y_true` has no balanced accuracy over the same
classes. Such replicates are redrawn (up to `_MAX_REDRAWS` rounds), so the
interval is conditional on every class being present; the number redrawn is
returned as `n_redrawn`, and any left after the last round are dropped and
counted in `n_dropped`.

Paired comparisons draw the same units for both prediction sets in each
replicate, so the interval of the difference reflects only where the two
sets disagree: identical predictions give exactly [0, 0].
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import stats

METHODS = ("percentile", "expanded", "bca")
MIN_UNITS = 5  # below this many units no bootstrap interval reaches its level
_MAX_REDRAWS = 100


def _as_labels(name: str, values, n: Optional[int] = None) -> np.ndarray:
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array of labels, got shape "
                     f"{arr.shape}")
  if n is not None and len(arr) != n:
    raise ValueError(f"{name}: expected {n} labels (one per site, as "
                     f"y_true), got {len(arr)}")
  return arr


def _check_options(level: float, n_boot: int, method: str) -> None:
  if not 0.0 < level < 1.0:
    raise ValueError(f"level: expected a value in (0, 1), got {level}")
  if int(n_boot) < 1:
    raise ValueError(f"n_boot: expected a positive number of replicates, "
                     f"got {n_boot}")
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def _tables(y_true, preds: Sequence, groups) -> Dict:
  """Per-unit class counts and hits, collapsed to distinct unit types.

  Units with the same class counts and the same hits of every prediction set
  are exchangeable: drawing n_units units with replacement gives each type a
  Multinomial(n_units, mult / n_units) count, which is how replicates are
  drawn (exact, and fast for the site bootstrap, whose types number at most
  2**len(preds) per class).

  Returns a dict with counts (T, K), hits [(T, K) per prediction set], mult
  (T,) units per type, n_units and unit ('group' or 'site').
  """
  y_true = _as_labels("y_true", y_true)
  n = len(y_true)
  if n == 0:
    raise ValueError("y_true: expected at least one site, got none")
  preds = [_as_labels(f"y_pred[{i}]" if len(preds) > 1 else "y_pred", p, n)
           for i, p in enumerate(preds)]
  _, cls = np.unique(y_true, return_inverse=True)
  k = int(cls.max()) + 1
  if groups is None:
    unit = np.arange(n)
    n_units = n
    unit_name = "site"
  else:
    groups = _as_labels("groups", groups, n)
    _, unit = np.unique(groups, return_inverse=True)
    n_units = int(unit.max()) + 1
    unit_name = "group"
  cell = unit * k + cls
  table = [np.bincount(cell, minlength=n_units * k)]
  table += [np.bincount(cell, weights=(p == y_true),
                        minlength=n_units * k).astype(np.int64)
            for p in preds]
  rows = np.concatenate([t.reshape(n_units, k) for t in table], axis=1)
  types, mult = np.unique(rows, axis=0, return_counts=True)
  types = types.astype(np.float64)
  return {"counts": types[:, :k],
          "hits": [types[:, (i + 1) * k:(i + 2) * k] for i in range(len(preds))],
          "mult": mult, "n_units": n_units, "unit": unit_name}


def _balanced(counts: np.ndarray, hits: np.ndarray) -> np.ndarray:
  """Balanced accuracy of pooled tables (..., K): mean per-class recall."""
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.mean(hits / counts, axis=-1)


def _replicate_weights(tab: Dict, n_boot: int, seed: int
                       ) -> Tuple[np.ndarray, int, int]:
  """(replicates, types) unit multiplicities with every class present;
  degenerate replicates are redrawn.

  Returns (weights, n_redrawn, n_dropped).
  """
  rng = np.random.default_rng(seed)
  counts, n_units = tab["counts"], tab["n_units"]
  pvals = tab["mult"] / n_units

  def draw(size):
    return rng.multinomial(n_units, pvals, size=size).astype(np.float64)

  weights = draw(n_boot)
  bad = np.flatnonzero((weights @ counts == 0).any(axis=1))
  n_redrawn = 0
  for _ in range(_MAX_REDRAWS):
    if not len(bad):
      break
    n_redrawn += len(bad)
    weights[bad] = draw(len(bad))
    bad = bad[(weights[bad] @ counts == 0).any(axis=1)]
  if len(bad):
    weights = np.delete(weights, bad, axis=0)
  if not len(weights):
    raise ValueError("bootstrap: every replicate lacks a class; a class "
                     "occurs in too few units to resample")
  return weights, n_redrawn, int(len(bad))


def _jackknife(tab: Dict, stat) -> Tuple[np.ndarray, np.ndarray]:
  """Leave-one-unit-out values of stat per unit type, and the number of
  units of each type; units whose removal drops a class are skipped."""
  counts, hits = tab["counts"], tab["hits"]
  tot_c = tab["mult"] @ counts
  keep = ~((tot_c[None, :] - counts) == 0).any(axis=1)
  loo_c = tot_c[None, :] - counts[keep]
  loo_h = [(tab["mult"] @ h)[None, :] - h[keep] for h in hits]
  return stat(loo_c, loo_h), tab["mult"][keep].astype(np.float64)


def _interval(reps: np.ndarray, point: float, level: float, method: str,
              n_units: int, jack=None) -> Tuple[float, float]:
  """Interval from the replicates.

  percentile: the alpha/2 and 1 - alpha/2 quantiles of the replicates.
  expanded: the percentile interval at the more extreme levels alpha' with
    z_{alpha'/2} = sqrt(n / (n - 1)) * t_{alpha/2, n - 1}, n = number of
    units (Hesterberg's expanded percentile: corrects the narrowness of the
    bootstrap with few units; tends to the percentile interval as n grows).
  bca: bias-corrected and accelerated (acceleration from the jackknife over
    units).
  """
  alpha = (1.0 - level) / 2.0
  if np.all(reps == reps[0]):
    return float(reps[0]), float(reps[0])
  if method == "percentile":
    q = np.array([alpha, 1.0 - alpha])
  elif method == "expanded":
    if n_units < 2:
      q = np.array([0.0, 1.0])
    else:
      z = math.sqrt(n_units / (n_units - 1.0)) * stats.t.ppf(
          1.0 - alpha, n_units - 1)
      a2 = float(stats.norm.sf(z))
      q = np.array([a2, 1.0 - a2])
  else:
    # Bias correction from the share of replicates below the point value
    # (ties count half), acceleration from the jackknife's skewness.
    below = (np.sum(reps < point) + 0.5 * np.sum(reps == point)) / len(reps)
    below = min(max(below, 0.5 / len(reps)), 1.0 - 0.5 / len(reps))
    z0 = stats.norm.ppf(below)
    acc = 0.0
    if jack is not None and len(jack[0]) > 0:
      vals, w = jack
      d = np.sum(w * vals) / np.sum(w) - vals
      den = 6.0 * np.sum(w * d ** 2) ** 1.5
      acc = float(np.sum(w * d ** 3) / den) if den > 0 else 0.0
    za = stats.norm.ppf([alpha, 1.0 - alpha])
    q = stats.norm.cdf(z0 + (z0 + za) / (1.0 - acc * (z0 + za)))
  lo, hi = np.quantile(reps, q)
  return float(lo), float(hi)


def balanced_accuracy(y_true, y_pred) -> float:
  """Mean recall over the classes present in y_true (as scikit-learn's
  `balanced_accuracy_score`)."""
  tab = _tables(y_true, [y_pred], None)
  return float(_balanced(tab["mult"] @ tab["counts"],
                         tab["mult"] @ tab["hits"][0]))


def balanced_accuracy_interval(y_true, y_pred, groups=None,
                               level: float = 0.95, n_boot: int = 2000,
                               seed: int = 0, method: str = "expanded"
                               ) -> Dict:
  """Balanced accuracy with a bootstrap interval.

  Args:
    y_true: true class labels, one per site.
    y_pred: predicted labels, one per site.
    groups: optional unit labels (e.g. plate ids), one per site; when given,
      whole groups are resampled (cluster bootstrap), else single sites.
    level: coverage of the interval.
    n_boot: number of bootstrap replicates.
    seed: seed of the replicates.
    method: 'expanded' (default), 'percentile' or 'bca' (see `_interval`).

  Returns:
    dict with value, low, high, level, method, n_boot (replicates used),
    unit ('group' or 'site'), n_units, few_units (fewer than MIN_UNITS
    units: the interval is too narrow, see the module docstring),
    n_redrawn, n_dropped.
  """
  _check_options(level, n_boot, method)
  tab = _tables(y_true, [y_pred], groups)
  counts, (hits,), mult = tab["counts"], tab["hits"], tab["mult"]
  value = float(_balanced(mult @ counts, mult @ hits))
  weights, n_redrawn, n_dropped = _replicate_weights(tab, int(n_boot), seed)
  reps = _balanced(weights @ counts, weights @ hits)
  jack = (_jackknife(tab, lambda c, h: _balanced(c, h[0]))
          if method == "bca" else None)
  low, high = _interval(reps, value, level, method, tab["n_units"], jack)
  return {"value": value, "low": low, "high": high, "level": level,
          "method": method, "n_boot": int(len(reps)), "unit": tab["unit"],
          "n_units": tab["n_units"],
          "few_units": tab["n_units"] < MIN_UNITS, "n_redrawn": n_redrawn,
          "n_dropped": n_dropped}


def paired_difference_interval(y_true, pred_a, pred_b, groups=None,
                               level: float = 0.95, n_boot: int = 2000,
                               seed: int = 0, method: str = "expanded"
                               ) -> Dict:
  """Balanced accuracy of set a minus that of set b, paired bootstrap.

  Both prediction sets are scored on the same resampled units in every
  replicate. Arguments as `balanced_accuracy_interval`.

  Returns:
    dict with diff (a - b), value_a, value_b, low, high, no_difference (the
    interval contains 0), level, method, n_boot, unit, n_units, few_units,
    n_redrawn, n_dropped.
  """
  _check_options(level, n_boot, method)
  tab = _tables(y_true, [pred_a, pred_b], groups)
  counts, (hits_a, hits_b), mult = tab["counts"], tab["hits"], tab["mult"]
  unit = tab["unit"]
  tot = mult @ counts
  value_a = float(_balanced(tot, mult @ hits_a))
  value_b = float(_balanced(tot, mult @ hits_b))
  diff = value_a - value_b
  weights, n_redrawn, n_dropped = _replicate_weights(tab, int(n_boot), seed)
  wc = weights @ counts
  reps = _balanced(wc, weights @ hits_a) - _balanced(wc, weights @ hits_b)
  jack = (_jackknife(tab, lambda c, h: _balanced(c, h[0]) - _balanced(c, h[1]))
          if method == "bca" else None)
  low, high = _interval(reps, diff, level, method, tab["n_units"], jack)
  return {"diff": diff, "value_a": value_a, "value_b": value_b, "low": low,
          "high": high, "no_difference": bool(low <= 0.0 <= high),
          "level": level, "method": method, "n_boot": int(len(reps)),
          "unit": unit, "n_units": tab["n_units"],
          "few_units": tab["n_units"] < MIN_UNITS, "n_redrawn": n_redrawn,
          "n_dropped": n_dropped}


def mean_sd(values) -> Dict:
  """Mean and sample standard deviation (ddof=1) over seeds.

  Non-finite values are an error, not skipped. sd is NaN for one value.
  """
  arr = np.asarray(values, dtype=np.float64).ravel()
  if not len(arr):
    raise ValueError("values: expected at least one value, got none")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"values: expected finite numbers, got {arr.tolist()}")
  sd = float(np.std(arr, ddof=1)) if len(arr) > 1 else math.nan
  return {"mean": float(arr.mean()), "sd": sd, "n": int(len(arr))}


def mean_interval(values, level: float = 0.95) -> Dict:
  """Mean over seeds with a Student t interval: `mean_sd`'s dict plus low,
  high and level. With one value low and high are NaN (one seed gives no
  interval)."""
  if not 0.0 < level < 1.0:
    raise ValueError(f"level: expected a value in (0, 1), got {level}")
  ms = mean_sd(values)
  n = ms["n"]
  if n > 1:
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1) * ms["sd"] /
                 math.sqrt(n))
    low, high = ms["mean"] - half, ms["mean"] + half
  else:
    low = high = math.nan
  return dict(ms, low=low, high=high, level=level)


SeedValues = Union[Mapping, Sequence[float], np.ndarray]


def _pair(a: SeedValues, b: SeedValues) -> Tuple[np.ndarray, np.ndarray,
                                                   list]:
  if isinstance(a, Mapping) or isinstance(b, Mapping):
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
      raise ValueError("a_by_seed, b_by_seed: expected both mappings of "
                       "seed -> value or both sequences")
    if set(a) != set(b):
      raise ValueError(f"a_by_seed, b_by_seed: expected the same seeds, got "
                       f"{sorted(a, key=str)} and {sorted(b, key=str)}")
    seeds = sorted(a, key=str)
    return (np.array([a[s] for s in seeds], dtype=np.float64),
            np.array([b[s] for s in seeds], dtype=np.float64), seeds)
  va = np.asarray(a, dtype=np.float64).ravel()
  vb = np.asarray(b, dtype=np.float64).ravel()
  if len(va) != len(vb):
    raise ValueError(f"a_by_seed, b_by_seed: expected one value per seed in "
                     f"each, got {len(va)} and {len(vb)}")
  return va, vb, list(range(len(va)))


def paired_seed_differences(a_by_seed: SeedValues, b_by_seed: SeedValues,
                            level: float = 0.95) -> Dict:
  """Paired differences a - b by seed with a Student t interval.

  Args:
    a_by_seed, b_by_seed: mappings seed -> value (paired by key) or
      sequences in the same seed order.
    level: coverage of the t interval.

  Returns:
    dict with diff (mean of a - b), sd (of the differences), n, low, high,
    level, no_difference (the interval contains 0), diffs (by seed), seeds.
    With one seed, sd/low/high are NaN and no_difference is True (one seed
    cannot show a difference).
  """
  va, vb, seeds = _pair(a_by_seed, b_by_seed)
  d = va - vb
  m = mean_interval(d, level)
  no_diff = bool(m["n"] < 2 or m["low"] <= 0.0 <= m["high"])
  return {"diff": m["mean"], "sd": m["sd"], "n": m["n"], "low": m["low"],
          "high": m["high"], "level": level, "no_difference": no_diff,
          "diffs": d.tolist(), "seeds": seeds}


def format_interval(d: Mapping, digits: int = 3) -> str:
  """'0.812 [0.74, 0.88]': the point value with `digits` decimals, the
  bounds with one fewer; differences ('diff' key) carry a sign."""
  for key in ("value", "diff", "mean"):
    if key in d:
      break
  else:
    raise ValueError(f"format_interval: expected a 'value', 'diff' or "
                     f"'mean' key, got {sorted(d)}")
  sign = "+" if key == "diff" else ""
  bd = max(digits - 1, 0)
  low, high = d.get("low", math.nan), d.get("high", math.nan)
  point = f"{d[key]:{sign}.{digits}f}"
  if low is None or high is None or not (np.isfinite(low) and
                                         np.isfinite(high)):
    return point
  return f"{point} [{low:.{bd}f}, {high:.{bd}f}]"


def format_mean_sd(d: Mapping, digits: int = 3) -> str:
  """'0.812 ± 0.034 (n=3)' from `mean_sd`'s dict."""
  sd = d["sd"]
  sd_text = f"{sd:.{digits}f}" if np.isfinite(sd) else "n/a"
  return f"{d['mean']:.{digits}f} ± {sd_text} (n={d['n']})"
