"""The linear-SVM classification tasks on RxRx19a: control (Mock vs Active
SARS-CoV-2) and cell model (HRCE vs VERO), each on a random and a plate
split (`tasks.py` holds the rows and the protocol's use)."""
from __future__ import annotations

from gandl_jax.evaluate import normalize, report
from gandl_jax.evaluate import tasks as task_lib
from gandl_jax.evaluate.io import Embeddings
from gandl_jax.evaluate.registry import Context, register_task


def _control_section(sets, r: report.ReportContext) -> str:
  return report.classification_section(
      "Control classification (Mock vs Active SARS-CoV-2)", task_lib.CONTROL,
      sets, r.figures["confusion"].get(task_lib.CONTROL, {}),
      "Untreated sites; positive class for F1 / ROC AUC: Active SARS-CoV-2.")


@register_task(task_lib.CONTROL, section=_control_section,
               description="the control classifier")
def control(ctx: Context) -> dict:
  """Both splits; the random split's fitted model goes to dose-response."""
  out, fitted = task_lib.control_classification(
      ctx.emb, ctx.options.protocol,
      ctx.predictions.setdefault(task_lib.CONTROL, {}))
  ctx.shared[task_lib.CONTROL] = fitted
  return out


def cell_type_rows(emb: Embeddings, options) -> Embeddings:
  """The cell model's rows before post-processing (per-plate normalization
  centers every plate on its own controls and so erases cell-type means:
  each plate holds one cell type); well means with --aggregate well."""
  sub = emb.subset(task_lib.control_rows(emb.meta, task_lib.CELL_MODEL))
  if options.aggregate == "well":
    m, x = normalize.aggregate_wells(sub.meta, sub.features)
    sub = Embeddings(m, x, sub.source)
  return sub


def _cell_model_section(sets, r: report.ReportContext) -> str:
  return report.classification_section(
      "Cell model classification (HRCE vs VERO)", task_lib.CELL_MODEL, sets,
      r.figures["confusion"].get(task_lib.CELL_MODEL, {}),
      "Untreated Mock and Active sites; positive class: VERO.")


def _raw_rows(emb: Embeddings, options):
  if options.cell_type_features == "raw":
    return cell_type_rows(emb, options)
  return None


@register_task(task_lib.CELL_MODEL, section=_cell_model_section,
               before_postprocess=_raw_rows)
def cell_model(ctx: Context) -> dict:
  """On the raw features (`Options.cell_type_features`, default) or the
  post-processed ones."""
  raw = ctx.options.cell_type_features == "raw"
  emb = ctx.raw_value(task_lib.CELL_MODEL) if raw else ctx.emb
  out = task_lib.cell_model_classification(
      emb, ctx.options.protocol,
      ctx.predictions.setdefault(task_lib.CELL_MODEL, {}))
  out["features"] = ("before per-plate normalization" if raw else
                     "post-processed (" + ctx.postprocessing["summary"] + ")")
  return out
