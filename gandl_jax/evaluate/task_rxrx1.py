"""Zero-shot RxRx1 cell type: a 4-class linear SVM on the RxRx1 embeddings
of the same model (HEPG2, HUVEC, RPE, U2OS)."""
from __future__ import annotations

import dataclasses

from gandl_jax.evaluate import inputs, plots, report
from gandl_jax.evaluate import tasks as task_lib
from gandl_jax.evaluate.registry import Context, Skip, register_task


def _section(sets, r: report.ReportContext) -> str:
  return report.classification_section(
      "Zero-shot RxRx1 cell type (HEPG2, HUVEC, RPE, U2OS)", task_lib.RXRX1,
      sets, r.figures["confusion"].get(task_lib.RXRX1, {}),
      "4-class linear SVM on embeddings of RxRx1 sites (w1-w5); ROC AUC = "
      "macro one-vs-rest.")


@register_task(task_lib.RXRX1, section=_section)
def rxrx1(ctx: Context) -> dict:
  """Loads the set's RxRx1 embeddings; raw features (no per-plate
  normalization or whitening) unless `cell_type_features` is "normalized".
  Its rows and 2-D projection go to `ctx.shared` (per-task methods, the
  report's figure)."""
  src = ctx.source
  if src is None or src.rxrx1 is None:
    raise Skip("no RxRx1 embeddings given (--rxrx1_embeddings)")
  o = ctx.options
  raw = o.cell_type_features == "raw"
  e1, owned = inputs.load(src.rxrx1, src.rxrx1_metadata, ctx.log)
  e1, pp1 = inputs.postprocess(
      e1, dataclasses.replace(o, normalize=False, whiten=False) if raw else o,
      owned)
  shared = {"meta": e1.meta}
  ctx.shared[task_lib.RXRX1] = shared
  out = task_lib.rxrx1_cell_type(e1, o.protocol,
                                 ctx.predictions.setdefault(task_lib.RXRX1,
                                                            {}))
  out["input"] = {"source": e1.source, "rows": int(len(e1.meta)),
                  "issues": e1.issues}
  out["postprocessing"] = pp1
  out["features"] = ("before per-plate normalization" if raw else
                     "post-processed (" + pp1["summary"] + ")")
  idx, coords = plots.projection(e1.features, o.projection_points,
                                 o.protocol.seed)
  shared["projection"] = (coords, {
      "cell type": e1.meta["cell_type"].astype(str).to_numpy()[idx]})
  return out
