"""The retrieval tasks: phenotypic activity and consistency (copairs mAP),
percent replicating and energy distance, on well (or site) profiles
centered on each plate's reference wells."""
from __future__ import annotations

import dataclasses

from gandl_jax.evaluate import classify, normalize, report, retrieval
from gandl_jax.evaluate.io import Embeddings
from gandl_jax.evaluate.registry import Context, Skip, register_task

CONSISTENCY = "consistency"


def _profiles(ctx: Context):
  """(config, profiles, centering note), computed once per set."""
  cfg = dataclasses.replace(ctx.options.retrieval,
                            seed=ctx.options.protocol.seed)

  def compute():
    prof = ctx.emb
    if cfg.level not in ("well", "site"):
      raise ValueError(f"retrieval level must be 'well' or 'site', got "
                       f"{cfg.level!r}")
    if cfg.level == "well" and "well_id" in prof.meta and \
        prof.meta["well_id"].duplicated().any():
      m, x = normalize.aggregate_wells(prof.meta, prof.features)
      prof = Embeddings(m, x, prof.source)
    centering = {"centered_on": "none (--nocenter_on_reference)"}
    if cfg.center_on_reference:
      try:
        x, centering = retrieval.center_on_reference(prof.meta, prof.features)
        prof = Embeddings(prof.meta, x, prof.source)
      except classify.TaskError as e:
        centering = {"centered_on": f"none ({e})"}
    return prof, centering

  prof, centering = ctx.cached("retrieval_profiles", compute)
  return cfg, prof, centering


_ACTIVITY_COLUMNS = ["key", "treatment", "treatment_conc", "cell_type",
                     "n_replicates", "mean_average_precision", "p_value",
                     "corrected_p_value", "below_corrected_p"]


@register_task(retrieval.ACTIVITY, section=lambda sets, r: (
    report.retrieval_section(sets, r.options.table_rows)))
def activity(ctx: Context) -> dict:
  """mAP of each compound-dose's replicates against the reference wells."""
  cfg, prof, centering = _profiles(ctx)
  summary, table = retrieval.phenotypic_activity(prof.meta, prof.features, cfg)
  ctx.shared[retrieval.ACTIVITY] = table
  summary["centering"] = centering
  summary["top"] = retrieval.records(table, _ACTIVITY_COLUMNS,
                                     ctx.options.table_rows)
  if ctx.compounds:
    named = table[table["treatment"].isin(list(ctx.compounds))]
    summary["named"] = retrieval.records(named, _ACTIVITY_COLUMNS, len(named))
  summary["files"] = [ctx.save_csv("map_activity", table)]
  return summary


@register_task(CONSISTENCY, follows=retrieval.ACTIVITY)
def consistency(ctx: Context) -> dict:
  """mAP of compounds sharing an annotation (--annotation_column); on the
  active doses it uses the activity table."""
  cfg, prof, _ = _profiles(ctx)
  if not cfg.annotation:
    raise Skip("no annotation column given (--annotation_column)")
  summary, table = retrieval.phenotypic_consistency(
      prof.meta, prof.features, ctx.shared.get(retrieval.ACTIVITY), cfg)
  summary["top"] = retrieval.records(
      table, ["annotation", "cell", "n_compounds", "mean_average_precision",
              "p_value", "corrected_p_value", "below_corrected_p"],
      ctx.options.table_rows)
  summary["files"] = [ctx.save_csv("map_consistency", table)]
  return summary


@register_task(retrieval.REPLICATES)
def replicates(ctx: Context) -> dict:
  """Percent replicating, and the energy distance of the named compounds
  to the reference (shown in the activity section)."""
  cfg, prof, _ = _profiles(ctx)
  summary, table = retrieval.percent_replicating(prof.meta, prof.features, cfg)
  summary["files"] = [ctx.save_csv("replicates", table)]
  ed, _ = retrieval.treatment_vs_control(prof.meta, prof.features,
                                         ctx.compounds, cfg)
  summary["energy_distance"] = ed
  return summary
