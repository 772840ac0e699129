"""Intervals on the headline figures and paired comparisons between sets.

Every balanced accuracy of a classification task gets a 95% bootstrap
interval (`intervals.balanced_accuracy_interval`): on the plate split the
held-out plates are resampled (a cluster bootstrap: plate-to-plate
variation enters the interval); on the random split single sites are,
which ignores plate effects and is labelled so. With fewer than
`intervals.MIN_UNITS` units no bootstrap interval reaches its level: the
record says so (`flag`) and the report shows the flag instead of calling it
a 95% interval.

Each set after the first is compared with the first on the same test sites
(`paired_comparisons`): the split is seeded on the sites in site_id order
(`tasks.classification_rows`), so sets of the same sites share it, and the
test predictions are paired by site_id. A difference whose interval holds 0
is "no difference".

`headline_lines(metrics)`: the sets' headline figures with their intervals
and the paired differences, as text lines (the demo prints them).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import pandas as pd

from gandl_jax.evaluate import intervals

LEVEL = 0.95
N_BOOT = 2000
CLASSIFICATION_TASKS = ("control", "cell_model", "rxrx1")
SPLITS = ("random", "plate")
RESAMPLED = {"plate": "held-out plates resampled",
             "random": "sites resampled: ignores plate effects"}
FEW_FLAG = {"plate": "few plates: interval too narrow",
            "random": "few sites: interval too narrow"}
NO_DIFFERENCE = "no difference"


def _record(iv: Dict, split: str) -> Dict:
  out = {k: iv[k] for k in ("low", "high", "level", "method", "n_boot",
                            "n_units", "few_units")}
  out["unit"] = "plate" if split == "plate" else "site"
  out["resampled"] = RESAMPLED[split]
  if iv["few_units"]:
    out["flag"] = (f"{FEW_FLAG[split]} ({iv['n_units']} < "
                   f"{intervals.MIN_UNITS}); not a {iv['level']:.0%} interval")
  return out


def accuracy_interval(y_true, y_pred, plates, split: str, seed: int = 0
                      ) -> Dict:
  """The bootstrap interval of one split's balanced accuracy: held-out
  plates resampled on the plate split, sites on the random split."""
  iv = intervals.balanced_accuracy_interval(
      y_true, y_pred, plates if split == "plate" else None, level=LEVEL,
      n_boot=N_BOOT, seed=seed)
  return {"value": iv["value"], **_record(iv, split)}


def pair(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
  """Test predictions of two sets on their common sites (by site_id):
  columns site_id, y, plate, pred_a, pred_b. ValueError when a shared site
  has two labels."""
  m = a.merge(b, on="site_id", suffixes=("_a", "_b"))
  if (m["y_a"] != m["y_b"]).any():
    n = int((m["y_a"] != m["y_b"]).sum())
    raise ValueError(f"{n} shared test site(s) have different labels in the "
                     f"two sets (different metadata?)")
  return pd.DataFrame({"site_id": m["site_id"], "y": m["y_a"],
                       "plate": m["plate_a"], "pred_a": m["pred_a"],
                       "pred_b": m["pred_b"]})


def paired_comparisons(predictions: Dict[str, Dict[str, Dict[str, pd.DataFrame]]],
                       names: Sequence[str], seed: int = 0) -> Dict:
  """Each set after the first minus the first, per task and split, on the
  test sites both hold.

  predictions: set -> task -> split -> DataFrame(site_id, y, pred, plate).
  Returns task -> split -> list of records (set, versus, diff, low, high,
  no_difference, verdict, n_paired, unit, n_units, few_units, ...), or a
  record with a reason where the sets share no test site.
  """
  out: Dict = {}
  if not names:
    return out
  first = names[0]
  for task in CLASSIFICATION_TASKS:
    for split in SPLITS:
      base = predictions.get(first, {}).get(task, {}).get(split)
      if base is None:
        continue
      rows = []
      for other in names[1:]:
        p = predictions.get(other, {}).get(task, {}).get(split)
        if p is None:
          continue
        rec = {"set": other, "versus": first, "n_test": int(len(p)),
               "n_test_versus": int(len(base))}
        try:
          pr = pair(p, base)
          if not len(pr):
            raise ValueError("the two sets share no test site")
          iv = intervals.paired_difference_interval(
              pr["y"].to_numpy(), pr["pred_a"].to_numpy(),
              pr["pred_b"].to_numpy(),
              pr["plate"].to_numpy() if split == "plate" else None,
              level=LEVEL, n_boot=N_BOOT, seed=seed)
        except ValueError as e:
          rec.update({"status": "failed", "reason": str(e)})
          rows.append(rec)
          continue
        rec.update({"status": "ok", "diff": iv["diff"],
                    "value": iv["value_a"], "value_versus": iv["value_b"],
                    "n_paired": int(len(pr)), **_record(iv, split),
                    "no_difference": iv["no_difference"]})
        rec["verdict"] = (NO_DIFFERENCE if iv["no_difference"] else
                          "higher" if iv["diff"] > 0 else "lower")
        if len(pr) < max(len(p), len(base)):
          rec["note"] = (f"paired on the {len(pr)} test sites both sets "
                         f"hold ({len(p)} and {len(base)})")
        rows.append(rec)
      if rows:
        out.setdefault(task, {})[split] = rows
  return out


def format_accuracy(d: Optional[Dict], digits: int = 3) -> str:
  """'0.812 [0.74, 0.88]' from a split's metrics (its balanced accuracy and
  interval); a few-units interval is marked with '†'; 'n/a' without one."""
  if not d or d.get("status") != "ok" or d.get("balanced_accuracy") is None:
    return "n/a"
  iv = d.get("balanced_accuracy_interval")
  if not iv or iv.get("low") is None:
    return f"{d['balanced_accuracy']:.{digits}f}"
  text = intervals.format_interval(
      {"value": d["balanced_accuracy"], "low": iv["low"],
       "high": iv["high"]}, digits)
  return text + ("†" if iv.get("few_units") else "")


def format_difference(rec: Dict, digits: int = 3) -> str:
  """'+0.070 [-0.05, 0.19] no difference' (or 'higher' / 'lower')."""
  if rec.get("status") != "ok":
    return f"n/a ({rec.get('reason', '')})"
  text = intervals.format_interval(
      {"diff": rec["diff"], "low": rec["low"], "high": rec["high"]}, digits)
  return (text + ("†" if rec.get("few_units") else "") + " " +
          rec["verdict"])


# The headline: (label, task, split) of balanced accuracies; plate splits
# (held-out plates) except RxRx1, whose plates each hold one cell type.
HEADLINE = (("Mock/Active", "control", "plate"),
            ("HRCE/VERO", "cell_model", "plate"),
            ("RxRx1 0-shot", "rxrx1", "random"))


def headline_lines(metrics: Dict, columns=HEADLINE) -> List[str]:
  """The sets' headline balanced accuracies with 95% intervals, then each
  set minus the first (paired, same test sites), as text lines. The EC50
  rank correlation is left out: over a few planted compounds it has no
  interval that means anything."""
  sets = metrics.get("embeddings", {})
  width = max([len(n) for n in sets] + [10])
  cells = {n: [format_accuracy(_split(s, task, split))
               for _, task, split in columns] for n, s in sets.items()}
  colw = max([len(c[0]) for c in columns] +
             [len(v) for row in cells.values() for v in row])
  lines = ["balanced accuracy [95% interval]:",
           " " * width + "  " + "  ".join(f"{c[0]:>{colw}}" for c in columns)]
  for n, row in cells.items():
    lines.append(f"{n:<{width}}  " + "  ".join(f"{v:>{colw}}" for v in row))
  comps = metrics.get("comparisons", {})
  diff_lines = []
  for label, task, split in columns:
    for rec in comps.get(task, {}).get(split, []):
      diff_lines.append(f"  {label} ({split} split), {rec['set']} - "
                        f"{rec['versus']}: {format_difference(rec)}")
  if diff_lines:
    lines.append("paired differences (same test sites):")
    lines += diff_lines
  notes = []
  if any("†" in v for row in cells.values() for v in row) or any(
      "†" in line for line in diff_lines):
    notes.append(f"† fewer than {intervals.MIN_UNITS} held-out plates: "
                 f"the interval is too narrow, not a 95% interval")
  if any(split == "random" for _, _, split in columns):
    notes.append("random splits: sites resampled, which ignores plate "
                 "effects")
  return lines + notes


def _split(s: Dict, task: str, split: str) -> Dict:
  t = s.get(task, {})
  if t.get("status") != "ok" and not t.get("partial"):
    return {}
  return t.get(split, {})
