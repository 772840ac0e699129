"""What the experiments share: the evaluation protocol's metrics (a row of
gandl-evaluate's metrics.json per embedding set) and --set value parsing."""
from __future__ import annotations

from typing import Any, Dict

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
