"""Dose-response: classifier scores of treated sites, 4PL fits, EC50, ranking.

Scale: the control classifier's decision score of each treated, infected site
is mapped to a *rescue* scale, 0 = mean score of the untreated `Active
SARS-CoV-2` controls and 1 = mean of the `Mock` controls (per cell type when
both controls exist there). Per compound and concentration we report the mean
rescue with a t confidence interval and the fraction of sites classified
healthy (Mock) with a Wilson interval. A four-parameter logistic

    y(c) = bottom + (top - bottom) / (1 + (EC50 / c) ** hill),  hill > 0

is fitted per compound (and cell type) to the per-concentration means,
weighted by sqrt(sites), in log10 concentration. Efficacy = the fitted rescue
at the highest tested concentration (no extrapolation beyond the data).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import optimize, stats

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


def _jac_log(logc, bottom, top, log_ec50, hill):
  e = 10.0 ** (hill * (log_ec50 - logc))
  g = 1.0 / (1.0 + e)
  d = top - bottom
  dg = -g * g * e * math.log(10.0)      # d g / d (hill * (log_ec50 - logc))
  return np.stack([1.0 - g, g, d * dg * hill, d * dg * (log_ec50 - logc)],
                  axis=1)


@dataclasses.dataclass(frozen=True)
class FitConfig:
  min_points: int = 4          # distinct concentrations needed for a fit
  min_effect: float = 0.1      # |top - bottom| below this (rescue units): flat
  min_r2: float = 0.7
  hill_bounds: Tuple[float, float] = (0.3, 8.0)
  level_bounds: Tuple[float, float] = (-3.0, 4.0)
  log_ec50_margin: float = 2.0  # decades beyond the tested range allowed


def fit_4pl(conc: Sequence[float], response: Sequence[float],
            weights: Optional[Sequence[float]] = None,
            cfg: FitConfig = FitConfig()) -> Dict:
  """Fits the 4PL; returns parameters, quality numbers and a flag.

  Keys: bottom, top, ec50, log10_ec50, hill, efficacy, r2, rmse, n_points,
  flag, reason. EC50 is None (with `reason`) when not meaningful.
  """
  c = np.asarray(conc, dtype=np.float64)
  y = np.asarray(response, dtype=np.float64)
  w = (np.ones_like(y) if weights is None else
       np.asarray(weights, dtype=np.float64))
  ok = np.isfinite(c) & np.isfinite(y) & (c > 0) & np.isfinite(w) & (w > 0)
  c, y, w = c[ok], y[ok], w[ok]
  out = {"n_points": int(len(c)), "bottom": None, "top": None, "ec50": None,
         "log10_ec50": None, "hill": None, "efficacy": None, "r2": None,
         "rmse": None}
  n_conc = len(np.unique(c))
  if n_conc < cfg.min_points:
    out.update(flag=FLAG_FEW, reason=f"{n_conc} distinct concentration(s); "
               f"a 4PL fit needs >= {cfg.min_points}")
    return out
  x = np.log10(c)
  lo, hi = x.min(), x.max()
  order = np.argsort(x)
  y_lo = y[order][:max(1, len(y) // 4)].mean()
  y_hi = y[order][-max(1, len(y) // 4):].mean()
  lb = [cfg.level_bounds[0], cfg.level_bounds[0], lo - cfg.log_ec50_margin,
        cfg.hill_bounds[0]]
  ub = [cfg.level_bounds[1], cfg.level_bounds[1], hi + cfg.log_ec50_margin,
        cfg.hill_bounds[1]]
  sw = np.sqrt(w)

  def resid(p):
    return sw * (_four_pl_log(x, *p) - y)

  def jac(p):
    return sw[:, None] * _jac_log(x, *p)

  best = None
  starts = [(lo + hi) / 2.0, lo + (hi - lo) / 4.0, hi - (hi - lo) / 4.0]
  for s in starts:
    p0 = np.clip([y_lo, y_hi, s, 1.0], np.add(lb, 1e-9), np.subtract(ub, 1e-9))
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = optimize.least_squares(resid, p0, jac=jac, bounds=(lb, ub),
                                   method="trf", max_nfev=300)
    except (ValueError, np.linalg.LinAlgError):
      continue
    if not np.all(np.isfinite(r.x)):
      continue
    sse = float(np.sum(r.fun ** 2))
    if best is None or sse < best[1]:
      best = (r.x, sse)
    r2_try = _r2(y, _four_pl_log(x, *r.x), w)
    if r2_try is not None and r2_try > 0.95:
      break
  if best is None:
    out.update(flag=FLAG_FAILED, reason="least squares failed from every start")
    return out
  p = best[0]
  bottom, top, log_ec50, hill = (float(v) for v in p)
  pred = _four_pl_log(x, *p)
  r2 = _r2(y, pred, w)
  out.update(bottom=bottom, top=top, hill=hill,
             efficacy=float(_four_pl_log(hi, *p)),
             rmse=float(np.sqrt(np.mean((pred - y) ** 2))), r2=r2)
  if abs(top - bottom) < cfg.min_effect or np.ptp(y) < cfg.min_effect:
    out.update(flag=FLAG_FLAT, reason=f"effect below {cfg.min_effect} rescue "
               f"units: EC50 undefined")
    out["r2"] = r2
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

  `df` columns: group, treatment, conc, rescue, healthy (bool).
  """
  g = df.groupby(["group", "treatment", "conc"], sort=True)
  out = g.agg(n=("rescue", "size"), mean=("rescue", "mean"),
              sd=("rescue", "std"), k=("healthy", "sum")).reset_index()
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
  rows = []
  for (group, treatment), sub in points.groupby(["group", "treatment"],
                                                sort=True):
    fit = fit_4pl(sub["conc"].to_numpy(), sub["mean"].to_numpy(),
                  weights=sub["n"].to_numpy(), cfg=cfg)
    fit["group"] = group
    fit["treatment"] = treatment
    fit["n_sites"] = int(sub["n"].sum())
    fit["n_concentrations"] = int(sub["conc"].nunique())
    fit["max_mean_rescue"] = float(sub["mean"].max())
    fit["conc_min"] = float(sub["conc"].min())
    fit["conc_max"] = float(sub["conc"].max())
    rows.append(fit)
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
