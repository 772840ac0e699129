"""What the experiments share: the evaluation protocol's metrics (a row of
gandl-evaluate's metrics.json per embedding set), --set value parsing, and
the tables: means over seeds and differences paired by seed, each with its
95% Student t interval over seeds (gandl_jax.evaluate.intervals)."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import numpy as np

from gandl_jax.evaluate import intervals
from gandl_jax.model import networks

METRICS = (
    ("control/random", ("control", "random", "balanced_accuracy")),
    ("control/plate", ("control", "plate", "balanced_accuracy")),
    ("cell_type/random", ("cell_model", "random", "balanced_accuracy")),
    ("cell_type/plate", ("cell_model", "plate", "balanced_accuracy")),
    ("rxrx1/random", ("rxrx1", "random", "balanced_accuracy")),
    ("rxrx1/plate", ("rxrx1", "plate", "balanced_accuracy")),
    ("ec50_spearman", ("truth", "ec50_spearman")),
    ("hits_found", ("truth", "hits_found")),
)
NAMED_COMPOUNDS = ("Remdesivir (GS-5734)", "GS-441524")
LEVEL = 0.95  # of every interval in the experiments' tables


def _find(tree: Any, keys) -> Any:
  for k in keys:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def metric_row(metrics: Dict[str, Any], name: str) -> Dict[str, Any]:
  """{label: value} of `METRICS` for embedding set `name`."""
  res = metrics["embeddings"][name]
  return {label: _find(res, path) for label, path in METRICS}


def parse_value(text: str) -> Any:
  """A --set KEY=VALUE value: int, float, bool, None or the string."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def summarize(rows: List[Dict[str, Any]], labels: List[str],
              level: float = LEVEL) -> List[Dict[str, Any]]:
  """Per (set, kimg): each label's mean over seeds with its Student t
  interval (`intervals.mean_interval`; non-finite values left out)."""
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["set"], round(float(r["kimg"]), 3)), []).append(r)
  out = []
  for (name, kimg), rs in sorted(groups.items()):
    agg = {"set": name, "kimg": kimg, "n": len(rs)}
    for label in labels:
      vals = [r[label] for r in rs if _finite(r.get(label))]
      if vals:
        agg[label] = intervals.mean_interval(vals, level)
    out.append(agg)
  return out


def table(summary: List[Dict[str, Any]], labels: List[str]) -> str:
  """Markdown: mean [low, high] per cell (the mean alone for one seed)."""
  lines = ["| set | kimg | seeds | " + " | ".join(labels) + " |",
           "|---|---:|---:|" + "---:|" * len(labels)]
  for s in summary:
    cells = [intervals.format_interval(s[label]) if label in s else "n/a"
             for label in labels]
    lines.append(f"| {s['set']} | {s['kimg']:g} | {s['n']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def paired_differences(rows: List[Dict[str, Any]], label: str,
                       baseline: str, level: float = LEVEL
                       ) -> List[Dict[str, Any]]:
  """`label` of every other set minus `baseline`'s, paired by seed, per
  (set, kimg), with the t interval of `intervals.paired_seed_differences`.

  The baseline's row of the same seed and kimg is used, or, when the
  baseline was measured at one kimg only (the untrained D), that one. Sets
  with no seed in common with the baseline (seed -1: the seedless
  baselines) are left out.
  """
  base = [r for r in rows if r["set"] == baseline and _finite(r.get(label))]
  single = len({round(float(r["kimg"]), 3) for r in base}) == 1
  ref = {(None if single else round(float(r["kimg"]), 3), r["seed"]):
         r[label] for r in base}
  groups: Dict[tuple, Dict[Any, float]] = {}
  for r in rows:
    if r["set"] == baseline or not _finite(r.get(label)):
      continue
    kimg = round(float(r["kimg"]), 3)
    key = (None if single else kimg, r["seed"])
    if key in ref:
      groups.setdefault((r["set"], kimg), {})[r["seed"]] = r[label]
  out = []
  for (name, kimg), a in sorted(groups.items()):
    b = {seed: ref[(None if single else kimg, seed)] for seed in a}
    out.append(dict(intervals.paired_seed_differences(a, b, level),
                    set=name, kimg=kimg))
  return out


def difference_table(diffs: List[Dict[str, Any]], title: str) -> str:
  """Markdown of `paired_differences`: '+0.051 [-0.02, 0.12]' per row,
  'no difference' where the interval holds 0 (one seed has no interval)."""
  lines = [f"| set | kimg | seeds | {title} |", "|---|---:|---:|---|"]
  for d in diffs:
    cell = intervals.format_interval(d)
    if d["n"] < 2:
      cell += " (one seed: no interval)"
    elif d["no_difference"]:
      cell += " (no difference)"
    lines.append(f"| {d['set']} | {d['kimg']:g} | {d['n']} | {cell} |")
  return "\n".join(lines)


def _runs(rows: List[Dict[str, Any]], label: str
          ) -> Dict[tuple, List[tuple]]:
  """{(set, seed): [(kimg, value), ...] in kimg order} of the finite values
  of `label`: each training run's curve."""
  runs: Dict[tuple, List[tuple]] = {}
  for r in rows:
    if _finite(r.get(label)):
      runs.setdefault((r["set"], r["seed"]), []).append(
          (float(r["kimg"]), r[label]))
  return {key: sorted(points) for key, points in runs.items()}


def peak_and_last(rows: List[Dict[str, Any]], label: str,
                  level: float = LEVEL) -> List[Dict[str, Any]]:
  """Per set, over seeds: the best value of `label` along each run, the
  last one, last minus best (what training wore away) and the run's trend
  (least-squares slope per 10 kimg; the best of many noisy values exceeds
  the last even without a trend, the slope does not), each a mean with its
  t interval; also the mean kimg of the best."""
  by_set: Dict[str, List[tuple]] = {}
  for (name, _), points in sorted(_runs(rows, label).items()):
    best_kimg, best = max(points, key=lambda p: p[1])
    k, v = np.array(points).T
    slope = (10.0 * float(np.polyfit(k, v, 1)[0]) if len(set(k)) > 1
             else float("nan"))
    by_set.setdefault(name, []).append((best, points[-1][1], best_kimg,
                                        slope))
  out = []
  for name, vals in sorted(by_set.items()):
    best, last, kimg, slope = (list(v) for v in zip(*vals))
    out.append({"set": name, "n": len(vals),
                "best": intervals.mean_interval(best, level),
                "last": intervals.mean_interval(last, level),
                "drop": intervals.mean_interval(
                    [l - b for l, b in zip(last, best)], level),
                "trend": intervals.mean_interval(slope, level),
                "best_kimg": sum(kimg) / len(kimg)})
  return out


def _signed(x: Dict[str, Any]) -> str:
  """A mean interval formatted with its sign: '+0.024 [-0.09, 0.14]'."""
  return intervals.format_interval(dict(x, diff=x["mean"]))


def layer_set(name: str, layer: str) -> str:
  """The set name of `name`'s embeddings at D layer `layer`: NAME for 'fc'
  (GAN-DL's embedding), 'NAME [LAYER]' for the others."""
  return name if layer == "fc" else f"{name} [{layer}]"


def trend_table(rows: List[Dict[str, Any]], labels: List[str],
                level: float = LEVEL) -> str:
  """Markdown: per set (rows) and label (columns), the mean over seeds of
  each run's trend (`peak_and_last`) with its t interval."""
  trends: Dict[str, Dict[str, Any]] = {}
  for label in labels:
    for p in peak_and_last(rows, label, level):
      trends.setdefault(p["set"], {"n": p["n"]})[label] = p["trend"]
  lines = ["| set | seeds | " + " | ".join(labels) + " |",
           "|---|---:|" + "---:|" * len(labels)]
  for name, t in sorted(trends.items()):
    cells = [_signed(t[label]) if label in t else "n/a" for label in labels]
    lines.append(f"| {name} | {t['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def peak_table(peaks: List[Dict[str, Any]]) -> str:
  lines = ["| set | seeds | best | kimg of best (mean) | last | last - best "
           "| trend per 10 kimg |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for p in peaks:
    lines.append(
        f"| {p['set']} | {p['n']} | {intervals.format_interval(p['best'])} | "
        f"{p['best_kimg']:.0f} | {intervals.format_interval(p['last'])} | "
        f"{_signed(p['drop'])} | {_signed(p['trend'])} |")
  return "\n".join(lines)


def plot(summary: List[Dict[str, Any]], labels: List[str], out_dir: str,
         suffix: str = "", rows: Optional[List[Dict[str, Any]]] = None
         ) -> List[str]:
  """OUT_DIR/<label><suffix>.png per label: each set's mean against kimg
  with its interval as error bars, or, given the result `rows`, with each
  seed's curve as a thin line instead; a set measured at one kimg only (no
  training) as a dashed horizontal line. Returns the paths."""
  # pylint: disable=import-outside-toplevel
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from gandl_jax import io as gio
  paths = []
  sets = sorted({s["set"] for s in summary})
  for label in labels:
    runs = _runs(rows, label) if rows is not None else {}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, name in enumerate(sets):
      pts = sorted((s["kimg"], s[label]) for s in summary
                   if s["set"] == name and label in s)
      if not pts:
        continue
      xs = [k for k, _ in pts]
      ys = [d["mean"] for _, d in pts]
      err = [[0.0 if math.isnan(d["low"]) else d["mean"] - d["low"]
              for _, d in pts],
             [0.0 if math.isnan(d["high"]) else d["high"] - d["mean"]
              for _, d in pts]]
      if len(pts) == 1:
        # axhline does not advance the colour cycle: one colour per set.
        ax.axhline(ys[0], linestyle="--", label=name, color=f"C{i % 10}")
      elif rows is not None:
        for (set_name, _), run in sorted(runs.items()):
          if set_name != name:
            continue
          ax.plot([k for k, _ in run], [v for _, v in run], linewidth=0.7,
                  alpha=0.5, color=f"C{i % 10}")
        ax.plot(xs, ys, marker="o", linewidth=2, label=f"{name} (mean)",
                color=f"C{i % 10}")
      else:
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name,
                    color=f"C{i % 10}")
    ax.set_xlabel("training kimg")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    path = os.path.join(out_dir, label.replace("/", "_") + suffix + ".png")
    gio.atomic_write(path, lambda f, fig=fig: fig.savefig(
        f, format="png", dpi=110, bbox_inches="tight"), mode="wb")
    plt.close(fig)
    paths.append(path)
  return paths


# The forgetting experiment's headline metrics.
HEADLINE = "control/plate"  # Mock vs Active, whole plates held out
PROBE_HEADLINE = "probe/control_bacc"


def forgetting_probe_labels(probed: List[Dict[str, Any]]) -> List[str]:
  """The probe columns: Mock/Active per layer (the selection layer's is
  PROBE_HEADLINE), the selection layer's cell-type task where it ran, and
  ADA's p."""
  keys = {k for r in probed for k in r}
  order = networks.embedding_layers(1024)  # every layer, in D's order
  labels = sorted((k for k in keys if k.startswith("probe/control/")),
                  key=lambda k: order.index(k.rsplit("/", 1)[-1]))
  labels += [k for k in ("probe/cell_type_bacc", "augment_p")
             if any(isinstance(r.get(k), (int, float)) for r in probed)]
  return labels


def forgetting_sections(rows: List[Dict[str, Any]], out_dir: str) -> str:
  """forgetting.py's summary.md tables of the result rows, and its figures
  in OUT_DIR."""
  evaluated = [r for r in rows if r["source"] == "evaluate"]
  probed = [r for r in rows if r["source"] == "probe"]
  eval_labels = [label for label, _ in METRICS]
  # The figures show GAN-DL's embedding (`fc`); other layers are in tables.
  drawn = [r for r in evaluated if r.get("layer", "fc") == "fc"] + probed
  figures = plot(summarize(drawn, [HEADLINE, PROBE_HEADLINE]),
                 [HEADLINE, PROBE_HEADLINE], out_dir, rows=drawn)
  labels = forgetting_probe_labels(probed)
  layers = list(dict.fromkeys(r.get("layer", "fc") for r in evaluated
                              if r["seed"] >= 0))
  minus_untrained, minus_off = [], []
  for layer in layers:
    at = [r for r in evaluated if r.get("layer", "fc") == layer]
    minus_untrained += paired_differences(
        at, HEADLINE, layer_set("untrained D", layer))
    minus_off += [d for d in paired_differences(at, HEADLINE,
                                                layer_set("off", layer))
                  if not d["set"].startswith("untrained D")]
  layer_labels = [l for l in labels if l.startswith("probe/control/")]
  return "\n".join([
      "Every cell: the mean over training seeds [its 95% Student t "
      "interval over seeds]; one seed (the seedless baselines) has no "
      "interval. Differences are paired by seed.",
      "",
      "## gandl-evaluate per checkpoint",
      "",
      table(summarize(evaluated, eval_labels), eval_labels),
      "",
      f"## {HEADLINE}: differences paired by seed",
      "",
      difference_table(minus_untrained,
                       "minus the untrained D (same layer)"),
      "",
      difference_table(minus_off, "minus off (same seed, kimg, layer)"),
      "",
      "## Probe curves (probe plates)",
      "",
      table(summarize(probed, labels), labels)
      if probed else "(no probe: --probe_every_kimg 0)",
      "",
      f"## Kept or worn away: {PROBE_HEADLINE} along each run",
      "",
      peak_table(peak_and_last(probed, PROBE_HEADLINE))
      if probed else "(no probe)",
      "",
      "## Probe trend per layer (least-squares slope per 10 kimg)",
      "",
      trend_table(probed, layer_labels) if layer_labels else "(no probe)",
      "",
      "Figures: " + ", ".join(os.path.basename(p) for p in figures),
      ""])


def prepare_data(stages, workdir: str, size: int, seed: int, plates: int,
                 difficulty: str, resolution: int):
  """The synthetic RxRx19a and RxRx1 trees and their shards (resumable
  stages): (roots, shards, data globs, metadata paths, truth path)."""
  from gandl_jax.data import convert, synthetic  # pylint: disable=import-outside-toplevel
  raw = os.path.join(workdir, "raw")
  shards = {d: os.path.join(workdir, "shards", d) for d in ("rxrx19a", "rxrx1")}
  roots = stages.run("synthetic", lambda: {"roots": {
      d: synthetic.generate(raw, dataset=d, size=size, seed=seed,
                            plates=plates, difficulty=difficulty)
      for d in ("rxrx19a", "rxrx1")}})["roots"]
  stages.run("convert", lambda: {
      d: convert.convert(d, roots[d], shards[d], resolution,
                         workers=max(1, os.cpu_count() or 1))
      for d in ("rxrx19a", "rxrx1")})
  data = {d: os.path.join(shards[d], "*.tfrecord") for d in shards}
  metadata = {d: os.path.join(roots[d], "metadata.csv") for d in roots}
  truth = os.path.join(roots["rxrx19a"], "synthetic_truth.csv")
  return roots, shards, data, metadata, truth


def train_stage(stages, name: str, config, train_dir: str, mesh) -> Dict:
  """gandl-train's loop as resumable stage `name`: marked done only when
  the training finished. A preempted one (SIGTERM: its checkpoint saved)
  ends the experiment with gandl-train's status 143; rerunning the same
  command resumes it."""
  from gandl_jax.train import loop  # pylint: disable=import-outside-toplevel
  summary = stages.run(name, lambda: loop.train(config, train_dir, mesh=mesh),
                       complete=lambda s: s.get("reason") != "preempted")
  if summary.get("reason") == "preempted":
    raise SystemExit(143)
  return summary


def stage_seconds(workdir: str) -> float:
  """Compute time summed over WORKDIR/stages/*.done (a resumed stage keeps
  the time it took when it ran)."""
  import json  # pylint: disable=import-outside-toplevel
  done = os.path.join(workdir, "stages")
  total = 0.0
  for name in os.listdir(done):
    with open(os.path.join(done, name), encoding="utf-8") as fh:
      total += float(json.load(fh).get("seconds", 0.0))
  return total
