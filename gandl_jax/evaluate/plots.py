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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def set_colors(n: int) -> List:
  """`n` distinct colours, one per set: matplotlib's qualitative tab10
  (then tab20's lighter shades, then evenly spaced hues): never the same
  colour twice."""
  base = list(plt.cm.tab10.colors)
  if n <= len(base):
    return base[:n]
  extra = list(plt.cm.tab20.colors[1::2])
  if n <= len(base) + len(extra):
    return (base + extra)[:n]
  return [plt.cm.hsv(i / n) for i in range(n)]


def dose_response_figure(path: str, keys: Sequence[Tuple[str, str]],
                         sets: Sequence[Tuple[str, pd.DataFrame, pd.DataFrame]],
                         ncols: int = 3,
                         planted_ec50: Optional[Dict[str, float]] = None
                         ) -> None:
  """Panels per (cell type, compound): mean rescue +- CI and the 4PL fit.

  sets: (name, points, fits) per embeddings set, in the report's order (the
  headline sets first), each in its own colour and marker. Every text lies
  outside the axes: each set's fitted EC50 / efficacy / flag below its
  panel, one legend for the whole figure at the bottom.
  planted_ec50: treatment -> the true EC50 in uM (synthetic data), marked as
  a solid black vertical line where known.
  """
  n = max(1, len(keys))
  ncols = min(ncols, n)
  nrows = int(np.ceil(n / ncols))
  colors = set_colors(len(sets))
  # Below each panel: the x label and one line of fit results per set (and
  # the planted EC50), in panel heights.
  panel_h = 2.8
  step = 1.4 * 6.5 / 72.0 / panel_h
  below = 0.26 + step * (len(sets) + 1)
  fig_h = nrows * panel_h * (1.0 + below) + 0.5 + 0.25 * (
      1 + len(sets) // 3)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, fig_h),
                           squeeze=False)
  legend_h = (0.5 + 0.25 * (1 + len(sets) // 3)) / fig_h
  fig.subplots_adjust(left=0.07, right=0.98, top=1.0 - 0.35 / fig_h,
                      bottom=legend_h + below * panel_h / fig_h,
                      hspace=below + 0.2, wspace=0.3)
  for ax in axes.flat[n:]:
    ax.axis("off")
  planted_drawn = False
  for ax, (group, treatment) in zip(axes.flat, keys):
    lines = []
    for k, (name, points, fits) in enumerate(sets):
      color = colors[k]
      p = points[(points["group"] == group) & (points["treatment"] == treatment)]
      if p.empty:
        lines.append((f"{name}: not measured", color))
        continue
      err = np.vstack([p["mean"] - p["ci_low"], p["ci_high"] - p["mean"]])
      err = np.nan_to_num(err, nan=0.0)
      ax.errorbar(p["conc"], p["mean"], yerr=err, fmt=_MARKERS[k % len(
          _MARKERS)], color=color, ms=4, capsize=2, label=name)
      f = fits[(fits["group"] == group) & (fits["treatment"] == treatment)]
      label = f"{name}: no fit"
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
      lines.append((label, color))
    true_ec50 = (planted_ec50 or {}).get(treatment)
    if true_ec50 is not None and np.isfinite(true_ec50) and true_ec50 > 0:
      ax.axvline(true_ec50, color="black", lw=1.2, label="planted EC50")
      planted_drawn = True
      lines.insert(0, (f"planted EC50 {true_ec50:.3g} uM", "black"))
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.axhline(1, color="gray", lw=0.8, ls="-.")
    ax.set_xscale("log")
    ax.set_xlabel("concentration (uM)", fontsize=8)
    ax.set_ylabel("rescue (0 infected, 1 Mock)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"{treatment} [{group}]", fontsize=9)
    # Fit results under the panel, below its x label.
    for i, (text, color) in enumerate(lines):
      ax.text(0.0, -0.24 - step * i, text, transform=ax.transAxes,
              fontsize=6.5, va="top", ha="left", color=color, clip_on=False)
  handles = [plt.Line2D([], [], color=colors[k], marker=_MARKERS[k % len(
      _MARKERS)], ls="-", ms=5, label=name)
             for k, (name, _, _) in enumerate(sets)]
  if planted_drawn:
    handles.append(plt.Line2D([], [], color="black", lw=1.2,
                              label="planted EC50"))
  handles += [plt.Line2D([], [], color="gray", lw=0.8, ls="--",
                         label="infected controls (0)"),
              plt.Line2D([], [], color="gray", lw=0.8, ls="-.",
                         label="Mock (1)"),
              plt.Line2D([], [], color="gray", lw=1, ls=":",
                         label="fitted EC50 (set colour)")]
  fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4),
             fontsize=7.5, frameon=False, bbox_to_anchor=(0.5, 0.0))
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
