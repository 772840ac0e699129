"""Dose-response of every compound on the control classifier's score, and
its comparison with the planted truth of simulated data."""
from __future__ import annotations

from gandl_jax import schema
from gandl_jax.evaluate import report
from gandl_jax.evaluate import tasks as task_lib
from gandl_jax.evaluate import truth as truth_lib
from gandl_jax.evaluate.registry import Context, Skip, register_task


def _dose_response_section(sets, r: report.ReportContext) -> str:
  return report.dose_response_section(sets, r.figures.get("dose_response"),
                                      r.options.table_rows)


@register_task(task_lib.DOSE_RESPONSE, requires=(task_lib.CONTROL,),
               section=_dose_response_section, description="dose-response")
def dose_response(ctx: Context) -> dict:
  """4PL fits of the rescue score per compound and cell type; the fits and
  points go to CSV tables and to the next tasks (`ctx.shared`)."""
  o = ctx.options
  dr = task_lib.dose_response_task(ctx.emb, ctx.shared[task_lib.CONTROL],
                                   o.fit, o.hit_threshold, ctx.compounds,
                                   o.table_rows)
  ctx.shared[task_lib.DOSE_RESPONSE] = dr
  files = [ctx.save_csv("dose_response_fits", dr.fits),
           ctx.save_csv("dose_response_points", dr.points)]
  return {**dr.summary, "files": files}


@register_task(task_lib.TRUTH, requires=(task_lib.DOSE_RESPONSE,),
               section=lambda sets, r: report.truth_section(sets))
def truth(ctx: Context) -> dict:
  """Hits found and EC50s against the simulator's synthetic_truth.csv."""
  if ctx.truth is None:
    if ctx.truth_error:
      raise ValueError(ctx.truth_error)
    raise Skip(f"no {schema.SYNTHETIC_TRUTH_FILE} given or found next to the "
               f"metadata / embeddings")
  return truth_lib.compare(ctx.shared[task_lib.DOSE_RESPONSE].fits, ctx.truth)
