"""What the experiments share: the evaluation protocol's metrics (a row of
gandl-evaluate's metrics.json per embedding set) and --set value parsing."""
from __future__ import annotations

import math
from typing import Any, Dict, List

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


def summarize(rows: List[Dict[str, Any]], labels: List[str]
              ) -> List[Dict[str, Any]]:
  """Mean and standard deviation over seeds per (set, kimg) of `labels`."""
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["set"], round(float(r["kimg"]), 3)), []).append(r)
  out = []
  for (name, kimg), rs in sorted(groups.items()):
    agg = {"set": name, "kimg": kimg, "n": len(rs)}
    for label in labels:
      vals = [r[label] for r in rs if isinstance(r.get(label), (int, float))
              and math.isfinite(r[label])]
      if vals:
        mean = sum(vals) / len(vals)
        sd = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
              if len(vals) > 1 else 0.0)
        agg[label] = (mean, sd)
    out.append(agg)
  return out


def table(summary: List[Dict[str, Any]], labels: List[str]) -> str:
  lines = ["| set | kimg | seeds | " + " | ".join(labels) + " |",
           "|---|---:|---:|" + "---:|" * len(labels)]
  for s in summary:
    cells = []
    for label in labels:
      if label in s:
        m, sd = s[label]
        cells.append(f"{m:.3f} ± {sd:.3f}" if s["n"] > 1 else f"{m:.3f}")
      else:
        cells.append("n/a")
    lines.append(f"| {s['set']} | {s['kimg']:g} | {s['n']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def prepare_data(stages, workdir: str, size: int, seed: int, plates: int,
                 difficulty: str, resolution: int):
  """The synthetic RxRx19a and RxRx1 trees and their shards (resumable
  stages): (roots, shards, data globs, metadata paths, truth path)."""
  import os  # pylint: disable=import-outside-toplevel
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


def stage_seconds(workdir: str) -> float:
  """Compute time summed over WORKDIR/stages/*.done (a resumed stage keeps
  the time it took when it ran)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  done = os.path.join(workdir, "stages")
  total = 0.0
  for name in os.listdir(done):
    with open(os.path.join(done, name), encoding="utf-8") as fh:
      total += float(json.load(fh).get("seconds", 0.0))
  return total
