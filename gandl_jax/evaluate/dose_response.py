"""Dose-response: classifier scores of treated sites, 4PL fits, EC50, ranking.

Scale: the control classifier's decision score of each treated, infected site
is mapped to a *rescue* scale, 0 = mean score of the untreated `Active
SARS-CoV-2` controls and 1 = mean of the `Mock` controls (per cell type when
both controls exist there). Per compound and concentration we report the mean
rescue with a t confidence interval and the fraction of sites classified
healthy (Mock) with a Wilson interval. A four-parameter logistic

    y(c) = bottom + (top - bottom) / (1 + (EC50 / c) ** hill),  hill > 0

is fitted per compound (and cell type) to the per-concentration means,
weighted by the number of sites, in log10 concentration, by a batched
box-constrained Levenberg-Marquardt (all compounds at once, best of three
starts). Efficacy = the fitted rescue
at the highest tested concentration (no extrapolation beyond the data).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

FLAG_OK = "ok"
FLAG_OUTSIDE = "ec50_outside_range"
FLAG_FLAT = "flat"
FLAG_POOR = "poor_fit"
FLAG_FEW = "too_few_points"
FLAG_FAILED = "fit_failed"


def four_pl(conc, bottom, top, ec50, hill):
  """The 4PL curve (increasing in conc when top > bottom, hill > 0)."""
  conc = np.asarray(conc, dtype=np.float64)
  return bottom + (top - bottom) / (1.0 + (ec50 / conc) ** hill)


def _four_pl_log(logc, bottom, top, log_ec50, hill):
  return bottom + (top - bottom) / (1.0 + 10.0 ** (hill * (log_ec50 - logc)))


@dataclasses.dataclass(frozen=True)
class FitConfig:
  min_points: int = 4          # distinct concentrations needed for a fit
  min_effect: float = 0.1      # |top - bottom| below this (rescue units): flat
  min_r2: float = 0.7
  hill_bounds: Tuple[float, float] = (0.3, 8.0)
  level_bounds: Tuple[float, float] = (-3.0, 4.0)
  log_ec50_margin: float = 2.0  # decades beyond the tested range allowed


def _bounds(lo: np.ndarray, hi: np.ndarray, cfg: FitConfig
            ) -> Tuple[np.ndarray, np.ndarray]:
  b = len(lo)
  lb = np.stack([np.full(b, cfg.level_bounds[0]), np.full(b, cfg.level_bounds[0]),
                 lo - cfg.log_ec50_margin, np.full(b, cfg.hill_bounds[0])], 1)
  ub = np.stack([np.full(b, cfg.level_bounds[1]), np.full(b, cfg.level_bounds[1]),
                 hi + cfg.log_ec50_margin, np.full(b, cfg.hill_bounds[1])], 1)
  return lb, ub


def _model_b(x: np.ndarray, P: np.ndarray) -> np.ndarray:
  """4PL in log10 conc for a batch: x (B, M), P (B, 4) -> (B, M)."""
  e = np.power(10.0, np.clip(P[:, 3:4] * (P[:, 2:3] - x), -300, 300))
  return P[:, 0:1] + (P[:, 1:2] - P[:, 0:1]) / (1.0 + e)


def _jac_b(x: np.ndarray, P: np.ndarray) -> np.ndarray:
  """d model / d (bottom, top, log_ec50, hill): (B, M, 4)."""
  u = np.clip(P[:, 3:4] * (P[:, 2:3] - x), -300, 300)
  e = np.power(10.0, u)
  g = 1.0 / (1.0 + e)
  d = P[:, 1:2] - P[:, 0:1]
  dg = -g * g * e * math.log(10.0)
  return np.stack([1.0 - g, g, d * dg * P[:, 3:4], d * dg * (P[:, 2:3] - x)],
                  axis=2)


def lm_fit_batch(x: np.ndarray, y: np.ndarray, w: np.ndarray, P0: np.ndarray,
                 lb: np.ndarray, ub: np.ndarray, max_iter: int = 300
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Box-constrained (projected) Levenberg-Marquardt for many 4PL fits at once.

  x, y, w: (B, M) log10 conc, response, weights (0 = padding). Minimizes
  sum w * (model - y)^2 per row. Returns (params (B, 4), weighted SSE (B,)).
  """
  sw = np.sqrt(w)
  P = np.clip(P0.astype(np.float64), lb, ub)
  r = sw * (_model_b(x, P) - y)
  cost = np.sum(r * r, axis=1)
  lam = np.full(len(P), 1e-3)
  eye = np.eye(4)
  done = np.zeros(len(P), dtype=bool)
  for _ in range(max_iter):
    J = sw[:, :, None] * _jac_b(x, P)
    A = np.einsum("bmi,bmj->bij", J, J)
    g = np.einsum("bmi,bm->bi", J, r)
    diag = np.einsum("bii->bi", A)
    damp = lam[:, None] * np.maximum(diag, 1e-9) + 1e-12 * (1.0 + diag.sum(1,
                                                                 keepdims=True))
    delta = -np.linalg.solve(A + damp[:, :, None] * eye, g[:, :, None])[:, :, 0]
    Pn = np.clip(P + delta, lb, ub)
    rn = sw * (_model_b(x, Pn) - y)
    cn = np.sum(rn * rn, axis=1)
    better = np.isfinite(cn) & (cn < cost)
    gain = np.where(better, (cost - cn) / np.maximum(cost, 1e-300), 0.0)
    P[better] = Pn[better]
    r[better] = rn[better]
    cost[better] = cn[better]
    lam = np.clip(np.where(better, lam / 3.0, lam * 4.0), 1e-12, 1e12)
    done |= (better & (gain < 1e-12)) | (lam >= 1e10) | (cost < 1e-28)
    if done.all():
      break
  return P, cost


def _starts(x: np.ndarray, y: np.ndarray, w: np.ndarray, lo: np.ndarray,
            hi: np.ndarray) -> List[np.ndarray]:
  """Three starting points per row: EC50 at mid, lower and upper quarter."""
  order = np.argsort(np.where(w > 0, x, np.inf), axis=1)
  ys = np.take_along_axis(y, order, 1)
  n = (w > 0).sum(1)
  k = np.maximum(1, n // 4)
  idx = np.arange(x.shape[1])[None, :]
  first = (idx < k[:, None])
  last = (idx >= (n - k)[:, None]) & (idx < n[:, None])
  y_lo = (ys * first).sum(1) / first.sum(1)
  y_hi = (ys * last).sum(1) / last.sum(1)
  out = []
  for f in (0.5, 0.25, 0.75):
    out.append(np.stack([y_lo, y_hi, lo + f * (hi - lo), np.ones_like(lo)], 1))
  return out


def fit_4pl_arrays(x: np.ndarray, y: np.ndarray, w: np.ndarray,
                   cfg: FitConfig) -> Tuple[np.ndarray, np.ndarray]:
  """Best-of-three-starts fits for padded rows; returns (params, SSE)."""
  big = np.where(w > 0, x, np.inf)
  lo = big.min(1)
  hi = np.where(w > 0, x, -np.inf).max(1)
  lb, ub = _bounds(lo, hi, cfg)
  best_p, best_c = None, None
  for P0 in _starts(x, y, w, lo, hi):
    with np.errstate(all="ignore"):
      P, c = lm_fit_batch(x, y, w, P0, lb, ub)
    if best_p is None:
      best_p, best_c = P, c
    else:
      take = c < best_c
      best_p[take], best_c[take] = P[take], c[take]
  return best_p, best_c


def _assess(p: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray,
            cfg: FitConfig) -> Dict:
  """Quality numbers and flag of one fit (x in log10 conc, no padding)."""
  lo, hi = x.min(), x.max()
  out = {"n_points": int(len(x)), "bottom": None, "top": None, "ec50": None,
         "log10_ec50": None, "hill": None, "efficacy": None, "r2": None,
         "rmse": None}
  if not np.all(np.isfinite(p)):
    out.update(flag=FLAG_FAILED, reason="least squares produced no finite fit")
    return out
  bottom, top, log_ec50, hill = (float(v) for v in p)
  pred = _four_pl_log(x, *p)
  r2 = _r2(y, pred, w)
  out.update(bottom=bottom, top=top, hill=hill,
             efficacy=float(_four_pl_log(hi, *p)),
             rmse=float(np.sqrt(np.mean((pred - y) ** 2))), r2=r2)
  if abs(top - bottom) < cfg.min_effect or np.ptp(y) < cfg.min_effect:
    out.update(flag=FLAG_FLAT, reason=f"effect below {cfg.min_effect} rescue "
               f"units: EC50 undefined")
    return out
  out["log10_ec50"] = log_ec50
  out["ec50"] = float(10.0 ** log_ec50)
  if not lo <= log_ec50 <= hi:
    out.update(flag=FLAG_OUTSIDE, reason="EC50 outside the tested "
               "concentration range (extrapolated)")
  elif r2 is None or r2 < cfg.min_r2:
    out.update(flag=FLAG_POOR, reason=f"weighted R^2 {r2} < {cfg.min_r2}")
  else:
    out.update(flag=FLAG_OK, reason="")
  return out


def _few(n_conc: int, n_points: int, cfg: FitConfig) -> Dict:
  return {"n_points": n_points, "bottom": None, "top": None, "ec50": None,
          "log10_ec50": None, "hill": None, "efficacy": None, "r2": None,
          "rmse": None, "flag": FLAG_FEW,
          "reason": f"{n_conc} distinct concentration(s); a 4PL fit needs >= "
                    f"{cfg.min_points}"}


def _clean(conc, response, weights):
  c = np.asarray(conc, dtype=np.float64)
  y = np.asarray(response, dtype=np.float64)
  w = (np.ones_like(y) if weights is None else
       np.asarray(weights, dtype=np.float64))
  ok = np.isfinite(c) & np.isfinite(y) & (c > 0) & np.isfinite(w) & (w > 0)
  return c[ok], y[ok], w[ok]


def fit_4pl(conc: Sequence[float], response: Sequence[float],
            weights: Optional[Sequence[float]] = None,
            cfg: FitConfig = FitConfig()) -> Dict:
  """Fits the 4PL to one curve; returns parameters, quality and a flag.

  Keys: bottom, top, ec50, log10_ec50, hill, efficacy, r2, rmse, n_points,
  flag, reason. EC50 is None (with `reason`) when not meaningful.
  """
  return fit_4pl_many([(conc, response, weights)], cfg)[0]


def fit_4pl_many(curves: Sequence[Tuple], cfg: FitConfig = FitConfig()
                 ) -> List[Dict]:
  """fit_4pl over many (conc, response, weights) curves, solved as one batch."""
  results: List[Optional[Dict]] = [None] * len(curves)
  rows = []
  for i, (c, y, w) in enumerate(curves):
    c, y, w = _clean(c, y, w)
    n_conc = len(np.unique(c))
    if n_conc < cfg.min_points:
      results[i] = _few(n_conc, len(c), cfg)
    else:
      rows.append((i, np.log10(c), y, w))
  if rows:
    m = max(len(r[1]) for r in rows)
    X = np.zeros((len(rows), m))
    Y = np.zeros((len(rows), m))
    W = np.zeros((len(rows), m))
    for k, (_, x, y, w) in enumerate(rows):
      X[k, :len(x)], Y[k, :len(x)], W[k, :len(x)] = x, y, w
      X[k, len(x):] = x.min()
    P, _ = fit_4pl_arrays(X, Y, W, cfg)
    for k, (i, x, y, w) in enumerate(rows):
      results[i] = _assess(P[k], x, y, w, cfg)
  return results


def _r2(y, pred, w) -> Optional[float]:
  ybar = np.sum(w * y) / np.sum(w)
  sst = float(np.sum(w * (y - ybar) ** 2))
  if sst <= 0:
    return None
  return float(1.0 - np.sum(w * (y - pred) ** 2) / sst)


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = 1.959964
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Wilson score interval for a binomial proportion k / n."""
  k = np.asarray(k, dtype=np.float64)
  n = np.asarray(n, dtype=np.float64)
  p = k / n
  den = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / den
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
  return center - half, center + half


def rescue_scale(healthy_score: np.ndarray, is_mock: np.ndarray,
                 is_active: np.ndarray) -> Tuple[float, float]:
  """(mean score of Active controls, mean of Mock controls)."""
  if not is_mock.any() or not is_active.any():
    raise ValueError("rescue scale needs both Mock and Active control sites")
  a = float(healthy_score[is_active].mean())
  m = float(healthy_score[is_mock].mean())
  if not m > a:
    raise ValueError(f"Mock controls do not score healthier than Active ones "
                     f"(means {m:.4g} vs {a:.4g}): the classifier has no "
                     f"signal for dose-response")
  return a, m


def summarize_points(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
  """Per (group, treatment, conc): n, mean rescue + CI, fraction healthy + CI.

  `df` columns: group, treatment, conc, rescue, healthy (bool), optionally
  score (the raw classifier score, averaged into `score_mean`).
  """
  g = df.groupby(["group", "treatment", "conc"], sort=True)
  aggs = dict(n=("rescue", "size"), mean=("rescue", "mean"),
              sd=("rescue", "std"), k=("healthy", "sum"))
  if "score" in df:
    aggs["score_mean"] = ("score", "mean")
  out = g.agg(**aggs).reset_index()
  n = out["n"].to_numpy(np.float64)
  tq = np.where(n > 1, stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)), np.nan)
  half = tq * out["sd"].to_numpy() / np.sqrt(n)
  out["ci_low"] = out["mean"] - half
  out["ci_high"] = out["mean"] + half
  out["frac_healthy"] = out["k"] / n
  lo, hi = wilson_interval(out["k"].to_numpy(), n)
  out["frac_ci_low"] = lo
  out["frac_ci_high"] = hi
  return out.drop(columns=["k"])


def fit_all(points: pd.DataFrame, cfg: FitConfig = FitConfig(),
            hit_threshold: float = 0.5) -> pd.DataFrame:
  """One 4PL fit per (group, treatment); ranked, with a `hit` column.

  Rank: acceptable fits (flag ok) by efficacy, descending, then by EC50; then
  the others by their best observed mean rescue.
  """
  # Per-curve arrays and summaries in one grouped pass (a Python loop over
  # 3,340 pandas sub-frames took most of this function at RxRx19a size).
  grouped = points.groupby(["group", "treatment"], sort=True)
  agg = grouped.agg(n_sites=("n", "sum"), n_concentrations=("conc", "nunique"),
                    max_mean_rescue=("mean", "max"), conc_min=("conc", "min"),
                    conc_max=("conc", "max"))
  codes = grouped.ngroup().to_numpy()
  order = np.argsort(codes, kind="stable")
  order = order[codes[order] >= 0]          # rows with a missing key: no curve
  bounds = np.cumsum(grouped.size().to_numpy())[:-1]
  conc, mean, n = (np.split(points[c].to_numpy()[order], bounds)
                   for c in ("conc", "mean", "n"))
  curves = list(zip(conc, mean, n)) if len(agg) else []
  rows = [{"group": g, "treatment": t, "n_sites": int(r.n_sites),
           "n_concentrations": int(r.n_concentrations),
           "max_mean_rescue": float(r.max_mean_rescue),
           "conc_min": float(r.conc_min), "conc_max": float(r.conc_max)}
          for (g, t), r in zip(agg.index, agg.itertuples(index=False))]
  for row, fit in zip(rows, fit_4pl_many(curves, cfg)):
    row.update(fit)
  cols = ["group", "treatment", "flag", "ec50", "log10_ec50", "efficacy",
          "bottom", "top", "hill", "r2", "rmse", "n_points", "n_concentrations",
          "n_sites", "max_mean_rescue", "conc_min", "conc_max", "reason"]
  fits = pd.DataFrame(rows, columns=cols)
  if fits.empty:
    fits["hit"] = []
    fits["rank"] = []
    return fits
  good = (fits["flag"] == FLAG_OK).to_numpy()
  eff = pd.to_numeric(fits["efficacy"], errors="coerce").to_numpy(np.float64)
  top = pd.to_numeric(fits["top"], errors="coerce").to_numpy(np.float64)
  bot = pd.to_numeric(fits["bottom"], errors="coerce").to_numpy(np.float64)
  fits["hit"] = good & (eff >= hit_threshold) & (top > bot)
  ec = pd.to_numeric(fits["ec50"], errors="coerce").fillna(np.inf)
  key1 = np.where(good, 0, 1)
  key2 = np.where(good, -np.nan_to_num(eff, nan=-np.inf),
                  -fits["max_mean_rescue"].to_numpy())
  order = np.lexsort((ec.to_numpy(), key2, key1))
  fits = fits.iloc[order].reset_index(drop=True)
  fits["rank"] = np.arange(1, len(fits) + 1)
  return fits
