"""Figures for the evaluation report (matplotlib, Agg backend, PNG files).

Every figure is written atomically (temp file, then rename).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from gandl_jax.evaluate import dose_response
from gandl_jax import io as gio

_SET_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def _save(fig, path: str) -> None:
  gio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110,
                                           bbox_inches="tight"), mode="wb")
  plt.close(fig)


def confusion_figure(path: str, panels: Sequence[Tuple[str, List[List[int]],
                                                       Sequence[str]]]) -> None:
  """One heat map per (title, confusion matrix, class names); row-normalized."""
  n = len(panels)
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
  for ax, (title, cm, classes) in zip(axes[0], panels):
    cm = np.asarray(cm, dtype=np.float64)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
    short = [c.replace(" SARS-CoV-2", "") for c in classes]
    ax.set_xticks(range(len(classes)), short, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), short)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(cm.shape[0]):
      for j in range(cm.shape[1]):
        ax.text(j, i, f"{int(cm[i, j])}\n{frac[i, j]:.2f}", ha="center",
                va="center", fontsize=8,
                color="white" if frac[i, j] > 0.6 else "black")
  fig.tight_layout()
  _save(fig, path)


def dose_response_figure(path: str, keys: Sequence[Tuple[str, str]],
                         sets: Sequence[Tuple[str, pd.DataFrame, pd.DataFrame]],
                         ncols: int = 3,
                         planted_ec50: Optional[Dict[str, float]] = None
                         ) -> None:
  """Panels per (cell type, compound): mean rescue +- CI and the 4PL fit.

  sets: (name, points, fits) per embeddings set, overlaid in each panel.
  planted_ec50: treatment -> the true EC50 in uM (synthetic data), marked as
  a solid black vertical line where known.
  """
  n = max(1, len(keys))
  ncols = min(ncols, n)
  nrows = int(np.ceil(n / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows),
                           squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  for ax, (group, treatment) in zip(axes.flat, keys):
    for k, (name, points, fits) in enumerate(sets):
      color = _SET_COLORS[k % len(_SET_COLORS)]
      p = points[(points["group"] == group) & (points["treatment"] == treatment)]
      if p.empty:
        continue
      err = np.vstack([p["mean"] - p["ci_low"], p["ci_high"] - p["mean"]])
      err = np.nan_to_num(err, nan=0.0)
      ax.errorbar(p["conc"], p["mean"], yerr=err, fmt="o", color=color,
                  ms=4, capsize=2, label=name)
      f = fits[(fits["group"] == group) & (fits["treatment"] == treatment)]
      if not f.empty and f.iloc[0]["top"] is not None and \
          np.isfinite(float(f.iloc[0]["top"])):
        r = f.iloc[0]
        ec50 = 10 ** float(r["log10_ec50"]) if r["log10_ec50"] is not None \
            and np.isfinite(float(r["log10_ec50"])) else None
        cc = np.geomspace(p["conc"].min() / 1.5, p["conc"].max() * 1.5, 100)
        if ec50 is not None:
          ax.plot(cc, dose_response.four_pl(cc, r["bottom"], r["top"], ec50,
                                            r["hill"]), color=color, lw=1.5)
          ax.axvline(ec50, color=color, ls=":", lw=1)
        label = (f"{name}: EC50 {ec50:.3g} uM, eff {r['efficacy']:.2f}, "
                 f"{r['flag']}" if ec50 is not None else
                 f"{name}: {r['flag']}")
        ax.text(0.02, 0.97 - 0.09 * k, label, transform=ax.transAxes,
                fontsize=7, va="top", color=color)
    true_ec50 = (planted_ec50 or {}).get(treatment)
    if true_ec50 is not None and np.isfinite(true_ec50) and true_ec50 > 0:
      ax.axvline(true_ec50, color="black", lw=1.2,
                 label=f"planted EC50 {true_ec50:.3g} uM")
      ax.text(0.98, 0.03, f"planted EC50 {true_ec50:.3g} uM",
              transform=ax.transAxes, fontsize=7, ha="right", va="bottom")
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.axhline(1, color="gray", lw=0.8, ls="-.")
    ax.set_xscale("log")
    ax.set_xlabel("concentration (uM)")
    ax.set_ylabel("rescue (0 infected, 1 Mock)")
    ax.set_title(f"{treatment} [{group}]", fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def projection(X: np.ndarray, max_points: int, seed: int
               ) -> Tuple[np.ndarray, np.ndarray]:
  """(row indices, 2-D PCA coordinates) of a seeded random subset."""
  rng = np.random.default_rng(seed)
  idx = np.arange(len(X))
  if len(X) > max_points:
    idx = np.sort(rng.choice(len(X), max_points, replace=False))
  coords = PCA(n_components=2, svd_solver="randomized",
               random_state=seed).fit_transform(X[idx].astype(np.float32))
  return idx, coords


def projection_figure(path: str, coords: np.ndarray,
                      colourings: Dict[str, np.ndarray], title: str) -> None:
  """Scatter of the 2-D projection, one panel per colouring."""
  n = len(colourings)
  fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 4.4), squeeze=False)
  for ax, (name, labels) in zip(axes[0], colourings.items()):
    labels = np.asarray(labels).astype(str)
    cats = list(pd.unique(labels))
    # Plot the largest group first so small groups stay visible.
    cats.sort(key=lambda c: -(labels == c).sum())
    for k, c in enumerate(cats):
      m = labels == c
      color = "lightgray" if c == "treated" else plt.cm.tab10(k % 10)
      ax.scatter(coords[m, 0], coords[m, 1], s=3, alpha=0.5, color=color,
                 label=f"{c} ({int(m.sum())})", rasterized=True)
    ax.set_title(f"{title}: by {name}", fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=3, loc="best")
  fig.tight_layout()
  _save(fig, path)
