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
