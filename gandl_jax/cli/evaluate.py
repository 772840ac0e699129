"""gandl-evaluate: downstream evaluation of site embeddings (GAN-DL protocol).

  gandl-evaluate --embeddings emb.parquet --metadata RxRx19a/metadata.csv \
      --output eval/ [--tasks control,cell_model,dose_response,rxrx1,truth] \
      [--baseline recursion/embeddings.csv --baseline_name recursion] \
      [--rxrx1_embeddings rx1.parquet --rxrx1_metadata RxRx1/metadata.csv] \
      [--compounds "Remdesivir (GS-5734),GS-441524"] [--whiten] \
      [--aggregate well] [--extra_set classical=cl.parquet,cl_rx1.parquet ...] \
      [--normalization robust_plate|tvn|none] [--annotation_column target] \
      [--table_columns plate=Metadata_Plate,...] \
      [--collapsed_data shards/rxrx19a-256]

Writes OUTPUT/metrics.json, OUTPUT/report.md, OUTPUT/figures/*.png and the
dose-response tables. See docs/evaluation.md.
"""
from __future__ import annotations

import csv
import io

from absl import flags

from gandl_jax import cli

from gandl_jax.evaluate import classify, dose_response, retrieval
from gandl_jax.evaluate.io import TableSpec
from gandl_jax.evaluate.pipeline import (ALL_TASKS, NORMALIZATIONS,
                                         EmbeddingSet, Options, evaluate)
from gandl_jax.evaluate import registry

FLAGS = flags.FLAGS
flags.DEFINE_string("embeddings", None, "Embeddings: our Parquet/CSV, Recursion's "
                    "embeddings.csv, a per-experiment CSV, a directory of "
                    "them or a comma-separated list.")
flags.DEFINE_string("metadata", None, "metadata.csv to join by site_id "
                    "(default: the metadata columns inside the embeddings).")
flags.DEFINE_string("output", None, "Output directory.")
flags.DEFINE_list("tasks", list(ALL_TASKS), "Tasks, any of "
                  f"{registry.selectable_tasks()} (the tasks they need run "
                  "too; consistency runs with activity).")
flags.DEFINE_string("name", "embeddings", "Name of the embeddings in the report.")
flags.DEFINE_string("baseline", None, "Second embeddings set evaluated side by "
                    "side (e.g. Recursion's embeddings, a random-init model).")
flags.DEFINE_string("baseline_name", "baseline", "Name of the baseline.")
flags.DEFINE_string("baseline_metadata", None, "Metadata for the baseline "
                    "(default: --metadata).")
flags.DEFINE_multi_string("extra_set", [], "More embeddings sets side by "
                          "side, each NAME=FILE or NAME=FILE,RXRX1_FILE "
                          "(repeat the flag): e.g. classical features, a "
                          "DenseNet baseline.")
flags.DEFINE_string("rxrx1_embeddings", None, "RxRx1 embeddings for the "
                    "zero-shot cell-type task.")
flags.DEFINE_string("rxrx1_metadata", None, "RxRx1 metadata.csv.")
flags.DEFINE_string("rxrx1_baseline", None, "RxRx1 embeddings of the baseline.")
flags.DEFINE_string("truth", None, "synthetic_truth.csv (default: found next "
                    "to the metadata or embeddings).")
flags.DEFINE_string("compounds", "", "Comma-separated compound names to plot "
                    "(CSV-quoted if a name holds a comma).")
flags.DEFINE_enum("normalization", "plate", list(NORMALIZATIONS),
                  "Normalization of every embeddings set: plate = per-plate "
                  "mean/std of controls; robust_plate = per-plate median/MAD "
                  "(pycytominer mad_robustize); tvn = PCA whitening on "
                  "controls + per-batch CORAL; none.")
flags.DEFINE_bool("normalize", True, "Old spelling: --nonormalize is "
                  "--normalization=none.")
flags.DEFINE_enum("tvn_batch", "plate", ["plate", "experiment"],
                  "Batches of TVN's CORAL alignment.")
flags.DEFINE_float("tvn_shrinkage", None, "Covariance shrinkage of TVN's "
                   "CORAL step (default: Ledoit-Wolf; 0 = exact CORAL).")
flags.DEFINE_string("table_columns", None, "Column mapping for tables from "
                    "other tools: ours=theirs,... e.g. plate=Metadata_Plate,"
                    "well=Metadata_Well,treatment=Metadata_broad_sample "
                    "(CellProfiler Metadata_ columns are mapped by default).")
flags.DEFINE_string("feature_regex", None, "Feature columns of such tables "
                    "(a regular expression; default: CellProfiler "
                    "compartments Cells_|Cytoplasm_|Nuclei_).")
flags.DEFINE_string("negative_control", None, "Treatment value marking "
                    "negative-control rows (e.g. DMSO) in such tables.")
flags.DEFINE_string("annotation_column", None, "Metadata column (target, "
                    "mechanism) for phenotypic consistency.")
flags.DEFINE_enum("retrieval_level", "well", ["well", "site"], "Profiles of "
                  "the retrieval metrics: well means or sites.")
flags.DEFINE_enum("map_negatives", "plate", ["plate", "all"], "Negatives of "
                  "the activity mAP: controls of the query's plate, or all.")
flags.DEFINE_bool("exclude_same_plate", False, "Activity mAP: replicate pairs "
                  "must come from different plates.")
flags.DEFINE_integer("null_size", 10000, "Permutation null size of the mAP "
                     "p-values.")
flags.DEFINE_bool("center_on_reference", True, "Retrieval metrics: center "
                  "each plate's profiles on its reference wells (the origin "
                  "of the cosine similarity).")
flags.DEFINE_enum("consistency_on", "active", ["active", "all"], "Compound "
                  "consensus for consistency: its active doses or all.")
flags.DEFINE_bool("whiten", False, "PCA whitening fitted on control sites.")
flags.DEFINE_integer("whiten_components", None, "Keep this many components.")
flags.DEFINE_enum("aggregate", "site", ["site", "well"], "Evaluate sites or "
                  "well means.")
flags.DEFINE_enum("cell_type_features", "raw", ["raw", "normalized"],
                  "Features for the cell-type tasks (see docs).")
flags.DEFINE_integer("seed", 0, "Seed of splits and subsets.")
flags.DEFINE_integer("task_threads", None, "Threads running independent "
                     "tasks side by side (a thread pool; default: one per "
                     "CPU core, at most 4; 1: one after another). The "
                     "results do not depend on it; memory grows with it.",
                     lower_bound=1)
flags.DEFINE_list("c_grid", ["0.001", "0.01", "0.1", "1"], "SVM C values.")
flags.DEFINE_integer("cv_folds", 3, "Folds of the C search.")
flags.DEFINE_integer("cv_max_rows", 4000, "Max training rows in the C search.")
flags.DEFINE_integer("max_train_rows", 60000, "Max rows of the final fit.")
flags.DEFINE_float("svm_tol", 1e-3, "LinearSVC stopping tolerance.")
flags.DEFINE_float("hit_threshold", 0.5, "Efficacy (rescue units) for a hit.")
flags.DEFINE_integer("top_compounds", 6, "Compounds plotted from the ranking.")
flags.DEFINE_string("collapsed_data", None, "Run the collapsed DenseNet-121 "
                    "baseline (a per-task classifier that sees labels; see "
                    "docs/baselines.md) on the images of these RxRx19a shards "
                    "(those the embeddings were computed from). Opt-in: it "
                    "trains through DenseNet-121, slow without an accelerator.")
flags.DEFINE_string("collapsed_rxrx1_data", None, "RxRx1 shards for the "
                    "collapsed DenseNet on the rxrx1 task.")
flags.DEFINE_string("collapsed_weights", "imagenet", "Its DenseNet-121 weights: "
                    "'imagenet', a weights file or 'none' (random).")
flags.DEFINE_integer("collapsed_epochs", 5, "Its maximum epochs.")
flags.DEFINE_integer("collapsed_patience", 1, "Epochs without a better "
                     "validation loss before it stops.")
flags.DEFINE_float("collapsed_val_fraction", 0.2, "Validation part carved from "
                   "each training part.")
flags.DEFINE_float("collapsed_lr", 1e-3, "Its Adam learning rate.")
flags.DEFINE_integer("collapsed_batch", 32, "Its batch (sites).")
flags.DEFINE_integer("collapsed_image_size", None, "Resize sites to this size "
                     "before DenseNet (default: the shards' resolution).")


def parse_extra_sets(values) -> list:
  """['name=a.parquet,b.parquet', ...] -> EmbeddingSet list."""
  out = []
  for v in values:
    name, sep, files = v.partition("=")
    paths = [p.strip() for p in files.split(",") if p.strip()]
    if not sep or not name.strip() or not 1 <= len(paths) <= 2:
      raise cli.usage(f"--extra_set {v!r}: expected NAME=FILE or "
                      f"NAME=FILE,RXRX1_FILE")
    out.append(EmbeddingSet(name.strip(), paths[0],
                            paths[1] if len(paths) > 1 else None))
  return out


def parse_compounds(text: str):
  if not text.strip():
    return []
  row = next(csv.reader(io.StringIO(text), skipinitialspace=True))
  return [c.strip() for c in row if c.strip()]


def exit_status(metrics) -> int:
  """0 when no task failed; 3 when some failed (named in metrics.json and
  the report); 1 when every task that ran failed."""
  statuses = [t["status"] for e in metrics["embeddings"].values()
              for k, t in e.items()
              if k not in ("input", "postprocessing") and isinstance(t, dict)
              and "status" in t]
  failed = statuses.count("failed")
  if failed and failed == len([s for s in statuses if s != "skipped"]):
    return cli.EXIT_ERROR
  return cli.EXIT_PARTIAL if failed else cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  if not FLAGS.embeddings or not FLAGS.output:
    raise cli.usage("--embeddings and --output are required")
  try:
    c_grid = tuple(float(c) for c in FLAGS.c_grid)
  except ValueError as e:
    raise cli.usage(f"--c_grid must be numbers: {e}") from e
  per_task = ()
  if FLAGS.collapsed_data:
    from gandl_jax.baselines import collapsed  # pylint: disable=import-outside-toplevel
    per_task = (collapsed.CollapsedMethod(collapsed.CollapsedConfig(
        data=FLAGS.collapsed_data, rxrx1_data=FLAGS.collapsed_rxrx1_data or "",
        weights=FLAGS.collapsed_weights, seed=FLAGS.seed,
        image_size=FLAGS.collapsed_image_size, batch=FLAGS.collapsed_batch,
        max_epochs=FLAGS.collapsed_epochs, patience=FLAGS.collapsed_patience,
        learning_rate=FLAGS.collapsed_lr,
        val_fraction=FLAGS.collapsed_val_fraction)),)
  elif FLAGS.collapsed_rxrx1_data:
    raise cli.usage("--collapsed_rxrx1_data needs --collapsed_data")
  opts = Options(
      normalization=FLAGS.normalization, normalize=FLAGS.normalize,
      tvn_batch=FLAGS.tvn_batch, tvn_shrinkage=FLAGS.tvn_shrinkage,
      retrieval=retrieval.RetrievalConfig(
          level=FLAGS.retrieval_level, negatives=FLAGS.map_negatives,
          exclude_same_plate=FLAGS.exclude_same_plate,
          null_size=FLAGS.null_size, annotation=FLAGS.annotation_column,
          consistency_on=FLAGS.consistency_on,
          center_on_reference=FLAGS.center_on_reference),
      whiten=FLAGS.whiten,
      whiten_components=FLAGS.whiten_components, aggregate=FLAGS.aggregate,
      cell_type_features=FLAGS.cell_type_features,
      protocol=classify.ProtocolConfig(
          seed=FLAGS.seed, c_grid=c_grid, cv_folds=FLAGS.cv_folds,
          cv_max_rows=FLAGS.cv_max_rows, max_train_rows=FLAGS.max_train_rows,
          tol=FLAGS.svm_tol),
      fit=dose_response.FitConfig(), hit_threshold=FLAGS.hit_threshold,
      top_compounds=FLAGS.top_compounds, per_task=per_task,
      threads=FLAGS.task_threads)
  extra = parse_extra_sets(FLAGS.extra_set)
  spec = None
  if FLAGS.table_columns or FLAGS.feature_regex or FLAGS.negative_control:
    try:
      spec = TableSpec.parse(FLAGS.table_columns, FLAGS.feature_regex,
                             FLAGS.negative_control)
    except ValueError as e:
      raise cli.usage(str(e)) from e
  cli.run("gandl-evaluate", lambda: evaluate_command(opts, extra, spec))


def embedding_sets(extra) -> list:
  """The sets of the flags: --embeddings, --baseline, then --extra_set."""
  sets = [EmbeddingSet(FLAGS.name, FLAGS.embeddings, FLAGS.rxrx1_embeddings,
                       FLAGS.metadata, FLAGS.rxrx1_metadata)]
  if FLAGS.baseline:
    sets.append(EmbeddingSet(FLAGS.baseline_name, FLAGS.baseline,
                             FLAGS.rxrx1_baseline, FLAGS.baseline_metadata))
  return sets + list(extra)


def evaluate_command(opts: Options, extra, spec=None) -> int:
  metrics = evaluate(
      embedding_sets(extra), FLAGS.output, tasks=FLAGS.tasks,
      truth=FLAGS.truth, compounds=parse_compounds(FLAGS.compounds),
      options=opts, table=spec)
  return exit_status(metrics)


def run():
  cli.start(main)


if __name__ == "__main__":
  run()
