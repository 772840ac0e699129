"""metrics.json (finite numbers or null with a reason), the figures and
report.md: its fixed parts here, one section per registered task (each
task's `section`; the shared table helpers below)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gandl_jax import io as gio
from gandl_jax.evaluate import compare, intervals, plots, registry


def sanitize(obj: Any, reasons: Dict[str, str], path: str = "") -> Any:
  """JSON-ready copy: numpy -> Python, NaN/inf -> None (reason recorded).

  A None without a sibling `<key>_reason` / `reason` gets a generic reason.
  """
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      p = f"{path}.{k}" if path else str(k)
      sv = sanitize(v, reasons, p)
      if sv is None and v is None and f"{k}_reason" not in obj and \
          "reason" not in obj and p not in reasons:
        reasons[p] = "not available for this input"
      out[str(k)] = sv
    return out
  if isinstance(obj, (list, tuple)):
    return [sanitize(v, reasons, f"{path}[{i}]") for i, v in enumerate(obj)]
  if isinstance(obj, np.ndarray):
    return sanitize(obj.tolist(), reasons, path)
  if isinstance(obj, (np.bool_, bool)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    v = float(obj)
    if not math.isfinite(v):
      reasons[path] = f"non-finite value ({v})"
      return None
    return v
  return obj


def write_metrics(path: str, metrics: Dict) -> Dict:
  reasons: Dict[str, str] = {}
  clean = sanitize(metrics, reasons)
  clean["null_reasons"] = reasons
  text = json.dumps(clean, indent=2, allow_nan=False)
  gio.atomic_write(path, lambda f: f.write(text + "\n"))
  return clean


# ---------------------------------------------------------------------------
# Markdown.


def _fmt(v: Any, digits: int = 3) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    if not math.isfinite(float(v)):
      return "n/a"
    return f"{float(v):.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else \
        f"{float(v):.{digits}f}"
  return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(v).replace("|", "/") for v in r) + " |")
  return "\n".join(lines)


def _done(t: Dict) -> bool:
  """A task result holding figures: ok, or failed in part (`partial`)."""
  return t.get("status") == "ok" or bool(t.get("partial"))


def _not_computed(name: str, t: Dict) -> str:
  """The report line of a task that did not run or failed for `name`."""
  return f"- **{name}**: {t.get('status', 'not run')}: {t.get('reason', '')}"


def _split(t: Dict, split: str) -> Dict:
  """The `split` part of a classification task's result ({} where the task
  holds no figures)."""
  return t.get(split, {}) if _done(t) else {}


_CLS_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy",
                                           "balanced accuracy"),
                ("f1", "F1 (positive class)"), ("f1_macro", "F1 (macro)"),
                ("roc_auc", "ROC AUC"), ("C", "C (chosen by CV)"),
                ("n_train", "train sites"), ("n_train_used", "train sites used"),
                ("n_test", "test sites"))


def classification_section(title: str, task: str, sets: Dict[str, Dict],
                           figures: Dict[str, str], note: str = "") -> str:
  names = list(sets)
  out = [f"## {title}", ""]
  if note:
    out += [note, ""]
  rows = []
  failures = []
  for split in ("random", "plate"):
    for key, label in _CLS_METRICS:
      vals = []
      for n in names:
        s = _split(sets[n].get(task, {}), split)
        vals.append(s.get(key) if s.get("status") == "ok" else None)
      if any(v is not None for v in vals):
        rows.append([f"{split} split", label] + vals)
  per_class_rows = []
  for n in names:
    t = sets[n].get(task, {})
    if not _done(t):
      failures.append(_not_computed(n, t))
      continue
    for split in ("random", "plate"):
      s = t.get(split, {})
      if s.get("status") != "ok":
        failures.append(f"- **{n}**, {split} split: {s.get('reason', '')}")
        continue
      for c, acc in s.get("per_class_accuracy", {}).items():
        per_class_rows.append([n, f"{split} split", c, acc])
  for split in ("random", "plate"):
    cells = [compare.format_accuracy(_split(sets[n].get(task, {}), split))
             for n in names]
    if any(c != "n/a" for c in cells):
      pos = next((i for i, r in enumerate(rows) if r[0] == f"{split} split"
                  and r[1] == "balanced accuracy"), None)
      if pos is not None:
        rows.insert(pos + 1, [f"{split} split", "balanced accuracy [95% "
                              f"interval; {compare.RESAMPLED[split]}]"]
                    + cells)
  if rows:
    out += [table(["split", "metric"] + names, rows), ""]
  if per_class_rows:
    out += ["Per-class accuracy (recall):", "",
            table(["embeddings", "split", "class", "accuracy"], per_class_rows),
            ""]
  if failures:
    out += ["Not computed:", ""] + failures + [""]
  for n, fig in figures.items():
    out += [f"![{title}: confusion matrices, {n}]({fig})", ""]
  return "\n".join(out)


def dose_response_section(sets: Dict[str, Dict], figure: Optional[str],
                          top_n: int) -> str:
  out = ["## Dose-response", "",
         "The control classifier (random split) scores every treated, infected "
         "site. Rescue scale: 0 = mean score of untreated Active SARS-CoV-2 "
         "sites, 1 = mean of Mock sites (per cell type). A 4-parameter logistic "
         "is fitted per compound and cell type; efficacy = fitted rescue at the "
         "highest tested concentration.", ""]
  rows = []
  for n, s in sets.items():
    t = s.get("dose_response", {})
    if t.get("status") != "ok":
      out.append(_not_computed(n, t))
      continue
    flags = t.get("flags", {})
    rows.append([n, t["n_treated_sites"], t["n_compounds"], t["n_hits"],
                 flags.get("ok", 0), flags.get("flat", 0),
                 flags.get("ec50_outside_range", 0), flags.get("poor_fit", 0)])
  if rows:
    out += ["", table(["embeddings", "treated sites", "compounds", "hits",
                       "fit ok", "flat", "EC50 outside range", "poor fit"],
                      rows), ""]
  for n, s in sets.items():
    t = s.get("dose_response", {})
    if t.get("status") != "ok":
      continue
    out += [f"Top {min(top_n, len(t['top']))} compounds, **{n}**:", "",
            table(["rank", "compound", "cell type", "EC50 (uM)", "efficacy",
                   "hill", "R^2", "flag"],
                  [[r["rank"], r["treatment"], r["group"], r["ec50"],
                    r["efficacy"], r["hill"], r["r2"], r["flag"]]
                   for r in t["top"][:top_n]]), ""]
    if t.get("named"):
      out += [f"Named compounds, **{n}**:", "",
              table(["rank", "compound", "cell type", "EC50 (uM)", "efficacy",
                     "R^2", "flag"],
                    [[r["rank"], r["treatment"], r["group"], r["ec50"],
                      r["efficacy"], r["r2"], r["flag"]] for r in t["named"]]),
              ""]
    if t.get("named_not_found"):
      out += [f"Not among the treated sites ({n}): "
              f"{', '.join(t['named_not_found'])}", ""]
  if figure:
    out += [f"![dose-response curves]({figure})", ""]
  return "\n".join(out)


def truth_section(sets: Dict[str, Dict]) -> str:
  out = ["## Planted truth (synthetic data)", ""]
  rows = []
  for n, s in sets.items():
    t = s.get("truth", {})
    if t.get("status") != "ok":
      out.append(_not_computed(n, t))
      continue
    rows.append([n, t["true_hits"], t["hits_found"], t["predicted_hits"],
                 t["hit_recall"], t["hit_precision"], t["n_ec50_pairs"],
                 t["ec50_spearman"], t["ec50_median_abs_log10_error"]])
  if rows:
    out += ["", table(["embeddings", "true hits", "hits found",
                       "called hits", "recall", "precision", "EC50 pairs",
                       "EC50 Spearman", "median abs log10 EC50 error"], rows),
            "", "The EC50 Spearman is a rank correlation over the EC50 pairs "
            "counted here: over a few planted compounds it takes a few "
            "values only and swings between seeds, so it carries no "
            "interval and is left out of the summary.", ""]
  return "\n".join(out)


# (column, task, split or None, metric) of the summary table. The EC50
# rank correlation with the planted EC50s is not among them: over the few
# planted compounds of a simulation it swings between seeds and has no
# interval that means anything (the planted-truth section shows it).
SUMMARY_COLUMNS = (
    ("Mock vs Active (random)", "control", "random", "balanced_accuracy"),
    ("Mock vs Active (plate)", "control", "plate", "balanced_accuracy"),
    ("HRCE vs VERO (random)", "cell_model", "random", "balanced_accuracy"),
    ("HRCE vs VERO (plate)", "cell_model", "plate", "balanced_accuracy"),
    ("RxRx1 zero-shot (random)", "rxrx1", "random", "balanced_accuracy"),
    ("RxRx1 zero-shot (plate)", "rxrx1", "plate", "balanced_accuracy"),
    ("planted hits found", "truth", None, "hits_found"),
    ("activity mAP", "activity", None, "mean_map"),
    ("fraction retrieved", "activity", None, "fraction_retrieved"),
    ("consistency mAP", "consistency", None, "mean_map"),
    ("percent replicating", "replicates", None, "percent_replicating"),
)


def summary_value(s: Dict, task: str, split: Optional[str], key: str) -> Any:
  """One headline figure of a set's metrics, or None."""
  t = s.get(task, {})
  if split is not None:
    t = _split(t, split)
  if t.get("status") != "ok":
    return None
  return t.get(key)


def _summary_cell(s: Dict, task: str, split: Optional[str], key: str) -> Any:
  if key == "balanced_accuracy" and split is not None:
    v = summary_value(s, task, split, key)
    return None if v is None else compare.format_accuracy(
        _split(s.get(task, {}), split))
  return summary_value(s, task, split, key)


def differences_table(comparisons: Dict) -> str:
  """Each set minus the first, per classification task and split: the paired
  difference of balanced accuracy with its interval and verdict."""
  rows = []
  for task, per in comparisons.items():
    for split, recs in per.items():
      for r in recs:
        rows.append([task, split, f"{r['set']} - {r['versus']}",
                     compare.format_difference(r), r.get("n_paired"),
                     r.get("resampled", "")])
  if not rows:
    return ""
  return table(["task", "split", "sets", "difference [95% interval]",
                "paired test sites", "resampled"], rows)


def summary_section(sets: Dict[str, Dict], comparisons: Optional[Dict] = None
                    ) -> str:
  """One table, set by task, the headline metric of each (balanced accuracy
  with its 95% interval for the classification tasks), then the paired
  differences between sets, before the detailed sections."""
  cols = [c for c in SUMMARY_COLUMNS
          if any(summary_value(s, *c[1:]) is not None for s in sets.values())]
  rows = [[n] + [_summary_cell(s, *c[1:]) for c in cols]
          for n, s in sets.items()]
  few = any(isinstance(v, str) and "†" in v for r in rows for v in r)
  out = [
      "## Summary", "",
      table(["embeddings"] + [c[0] for c in cols], rows), "",
      "Balanced accuracy of a linear SVM (details below) with a 95% "
      "bootstrap interval: the plate split holds out whole plates and its "
      "interval resamples the held-out plates; the random split's interval "
      "resamples sites, which ignores plate effects (too narrow where "
      "plates differ)."
      + (f" † fewer than {intervals.MIN_UNITS} held-out plates: few plates, "
         f"the interval is too narrow and is not a 95% interval." if few
         else "")
      + " Activity mAP, fraction retrieved, consistency mAP and percent "
      "replicating: see the retrieval section. The EC50 rank correlation "
      "with the planted EC50s is not a summary figure: over a few planted "
      "compounds it swings between seeds and has no meaningful interval "
      "(see the planted-truth section).", ""]
  diffs = differences_table(comparisons or {})
  if diffs:
    out += ["Paired differences of balanced accuracy, each set minus the "
            "first on the same test sites (paired by site_id; the same "
            f"bootstrap units). \"{compare.NO_DIFFERENCE}\": the interval "
            "contains 0.", "", diffs, ""]
  return "\n".join(out)


def inputs_section(sets: Dict[str, Dict]) -> str:
  rows = []
  notes = []
  for n, s in sets.items():
    inp = s.get("input", {})
    pp = s.get("postprocessing", {})
    rows.append([n, inp.get("source", ""), inp.get("rows"), inp.get("dim"),
                 pp.get("summary", "")])
    fm = inp.get("file_metadata") or {}
    if fm.get("gandl.weights"):
      w = fm["gandl.weights"]
      notes.append(f"- **{n}**: {fm.get('gandl.layer', 'features')}, "
                   f"weights: " + ("**random initialisation, not ImageNet**"
                                   if w == "random" else w))
    for i in inp.get("issues", []):
      notes.append(f"- **{n}**: {i}")
  out = ["## Inputs", "", table(["embeddings", "file", "rows used", "dim",
                                 "post-processing"], rows), ""]
  if notes:
    out += ["Notes (weights; rows dropped or repaired):", ""] + notes + [""]
  return "\n".join(out)


def write_report(path: str, text: str) -> None:
  gio.atomic_write(path, lambda f: f.write(text))


def _activity_table(rows) -> str:
  """Compound-doses of the activity mAP: compound, dose, mAP, corrected p."""
  return table(["compound", "conc", "cell type", "replicates", "mAP",
                "corrected p", "retrieved"],
               [[t.get("treatment"), t.get("treatment_conc"),
                 t.get("cell_type"), t.get("n_replicates"),
                 t.get("mean_average_precision"), t.get("corrected_p_value"),
                 t.get("below_corrected_p")] for t in rows])


def retrieval_section(sets: Dict[str, Dict], top_n: int) -> str:
  """Phenotypic activity / consistency (mAP), percent replicating, energy."""
  out = ["## Phenotypic activity and consistency (mAP)", "",
         "Average precision (copairs, cosine similarity) of each compound-dose's "
         "replicate profiles retrieved against the reference profiles; mAP = "
         "mean over the replicates; p-value from copairs' permutation null, "
         "Benjamini-Hochberg corrected; *retrieved* = corrected p < 0.05. "
         "Consistency: compounds sharing an annotation retrieve each other.",
         ""]
  rows, notes = [], []
  for n, s in sets.items():
    a = s.get("activity", {})
    c = s.get("consistency", {})
    r = s.get("replicates", {})
    if not a and not r:
      continue
    for key, t in (("activity", a), ("consistency", c), ("replicates", r)):
      if t and t.get("status") not in ("ok", None):
        notes.append(f"- **{n}**, {key}: {t.get('status')}: "
                     f"{t.get('reason', '')}")
      elif t.get("without_replicates"):
        lack = t["without_replicates"]
        notes.append(f"- **{n}**, {key}: {t.get('n_without_replicates')} "
                     f"compound-dose(s) without replicates, not scored: "
                     f"{', '.join(map(str, lack[:10]))}"
                     + (" ..." if len(lack) > 10 else ""))
    ok = lambda t: t.get("status") == "ok"  # noqa: E731
    rows.append([
        n,
        a.get("n_scored") if ok(a) else None,
        a.get("mean_map") if ok(a) else None,
        a.get("fraction_retrieved") if ok(a) else None,
        c.get("mean_map") if ok(c) else None,
        c.get("fraction_retrieved") if ok(c) else None,
        r.get("percent_replicating") if ok(r) else None,
        r.get("median_replicate_cosine") if ok(r) else None])
  if not rows:
    return ""
  first = next((s.get("activity") for s in sets.values()
                if s.get("activity", {}).get("status") == "ok"), None)
  if first:
    out += [f"Reference: {first['reference']}. Negatives: "
            f"{first['negatives']} (median {_fmt(first.get('median_negatives_per_query'))}"
            f" per query, against {_fmt(first.get('median_positives_per_query'))}"
            f" positives). Guards: {first['guards']}. Profiles: "
            f"{first['profiles']}. With few negatives per query an mAP of 1 "
            f"is common by chance, yet gets the smallest p (copairs counts "
            f"null values strictly above the observed mAP).", ""]
  out += [table(["embeddings", "compound-doses scored", "activity mAP",
                 "fraction retrieved", "consistency mAP",
                 "annotations retrieved", "percent replicating",
                 "median replicate cosine"], rows), ""]
  for n, s in sets.items():
    a = s.get("activity", {})
    for key, title, rows in (("top", "Most active compound-doses", top_n),
                             ("named", "Named compounds", None)):
      if a.get("status") == "ok" and a.get(key):
        out += [f"{title}, **{n}**:", "",
                _activity_table(a[key][:rows]), ""]
    ed = s.get("replicates", {}).get("energy_distance", {})
    if ed.get("rows"):
      out += [f"Treatment vs reference energy distance, **{n}**:", "",
              table(["compound", "conc", "cell type", "profiles",
                     "reference", "energy distance", "permutation p"],
                    [[t["treatment"], t["treatment_conc"], t["cell_type"],
                      t["n_profiles"], t["n_reference"], t["energy_distance"],
                      t["p_value"]] for t in ed["rows"]]), ""]
  if notes:
    out += ["Not computed:", ""] + notes + [""]
  return "\n".join(out)


@dataclasses.dataclass
class ReportContext:
  """What a task's section sees besides the sets' metrics."""
  options: Any                     # pipeline.Options
  figures: Dict                    # metrics.json's "figures"


# Confusion-matrix figures: classification tasks and their titles.
_CONFUSION = (("control", "control"), ("cell_model", "cell model"),
              ("rxrx1", "RxRx1 cell type"))


def write_figures(results: Dict[str, Dict], extras: Dict[str, Dict],
                  fig_dir: str, compounds: Sequence[str], opts,
                  planted_ec50: Dict[str, float],
                  record: Callable[[str], Any] = lambda rel: rel) -> Dict:
  """Confusion matrices, 2-D projections and the dose-response curves as
  PNGs in `fig_dir`; returns their paths relative to the output directory.
  `extras[set]`: "projection" / "projection_rxrx1" ((coords, colours)),
  "dose" (`tasks.DoseResponseResult`). `record(rel)` is called before each
  file is written (the run's manifest)."""
  figs: Dict = {"confusion": {}, "projection": {}}
  for n, r in results.items():
    safe = registry.safe_name(n)
    for task, title in _CONFUSION:
      t = r["tasks"].get(task, {})
      if not _done(t):
        continue
      panels = [(f"{n}: {title}, {split} split", t[split]["confusion_matrix"],
                 t[split]["classes"]) for split in ("random", "plate")
                if t.get(split, {}).get("status") == "ok"]
      if panels:
        rel = record(f"figures/confusion_{task}_{safe}.png")
        plots.confusion_figure(os.path.join(fig_dir, os.path.basename(rel)),
                               panels)
        figs["confusion"].setdefault(task, {})[n] = rel
    for key, label in (("projection", "RxRx19a"), ("projection_rxrx1", "RxRx1")):
      if key in extras[n]:
        coords, col = extras[n][key]
        rel = record(f"figures/{key}_{safe}.png")
        plots.projection_figure(os.path.join(fig_dir, os.path.basename(rel)),
                                coords, col, f"{n} ({label})")
        figs["projection"].setdefault(label, {})[n] = rel
  # Dose-response: the top compounds of each set plus the named ones.
  keys: List[Tuple[str, str]] = []
  dose_sets = []
  for n in results:
    dr = extras[n].get("dose")
    if dr is None:
      continue
    dose_sets.append((n, dr.points, dr.fits))
    for r in dr.fits.head(opts.top_compounds).itertuples():
      if (r.group, r.treatment) not in keys:
        keys.append((r.group, r.treatment))
    for r in dr.fits[dr.fits["treatment"].isin(list(compounds))].itertuples():
      if (r.group, r.treatment) not in keys:
        keys.append((r.group, r.treatment))
  if dose_sets and keys:
    rel = record("figures/dose_response.png")
    plots.dose_response_figure(os.path.join(fig_dir, "dose_response.png"),
                               keys, dose_sets, planted_ec50=planted_ec50)
    figs["dose_response"] = rel
  return figs


def markdown(m: Dict, opts, notes: Sequence[str] = ()) -> str:
  """report.md from the written metrics: protocol, summary, inputs, then
  each registered task's section (in registration order), projections and
  the values not computed. `notes`: paragraphs after the summary (per-task
  methods)."""
  sets = m["embeddings"]
  names = m["names"]
  figs = m["figures"]
  cfg = opts.protocol
  lines = [
      "# GAN-DL evaluation report", "",
      f"Embeddings: {', '.join(f'**{n}**' for n in names)}. Tasks: "
      f"{', '.join(m['tasks_requested'])}. Elapsed {m['elapsed_s']} s.", "",
      f"Protocol: seeded (seed {cfg.seed}) stratified {1 - cfg.test_size:.0%}/"
      f"{cfg.test_size:.0%} split; class weights inversely proportional to "
      f"class frequency; standardization + linear SVM (LinearSVC, squared "
      f"hinge, L2; tol {cfg.tol}), C "
      f"in {list(cfg.c_grid)} chosen by {cfg.cv_folds}-fold CV (balanced "
      f"accuracy) on the training part only (at most {cfg.cv_max_rows} rows); "
      f"final fit on at most {cfg.max_train_rows} training rows. The plate "
      f"split holds out whole plates (random site splits leak plate "
      f"identity).", "",
      summary_section(sets, m.get("comparisons")),
      *notes,
      inputs_section(sets),
  ]
  rctx = ReportContext(opts, figs)
  ran = {k for s in sets.values() for k in s}
  for task in registry.TASKS.values():
    if task.section is not None and task.name in ran:
      lines.append(task.section(sets, rctx))
  lines += [
      "## 2-D projection", "",
      "PCA of a random subset of post-processed embeddings; untreated sites "
      "coloured by disease condition, treated sites grey.", "",
  ]
  for label, per in figs["projection"].items():
    for n, rel in per.items():
      lines += [f"![{label} projection, {n}]({rel})", ""]
  nulls = m.get("null_reasons", {})
  if nulls:
    lines += ["## Values not computed", "",
              table(["metric", "reason"],
                    [[k, v] for k, v in list(nulls.items())[:60]]), ""]
  return "\n".join(lines) + "\n"
