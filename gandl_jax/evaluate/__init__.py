"""Downstream evaluation of site embeddings (GAN-DL paper protocol).

Entry point: `evaluate(embeddings, output_dir, metadata=None, tasks=None,
baseline=None, baseline_name='baseline', ...)`; see pipeline.py. Modules:
io (reads every embeddings layout and the profile tables of other tools),
normalize (per-plate, robust, TVN, whitening, wells, compound-doses),
classify (linear-SVM protocol), dose_response (4PL), retrieval (copairs mAP,
percent replicating, energy distance), truth (planted truth), tasks, plots,
report. The file format itself is `gandl_jax.embeddings`.
"""
from gandl_jax.evaluate.io import Embeddings, TableSpec, load_embeddings
from gandl_jax.evaluate.pipeline import (EmbeddingSet, Options, evaluate,
                                         postprocess)
from gandl_jax.evaluate.retrieval import RetrievalConfig
from gandl_jax.evaluate.tasks import ALL_TASKS

__all__ = ["evaluate", "EmbeddingSet", "Options", "postprocess", "Embeddings",
           "load_embeddings", "ALL_TASKS", "TableSpec", "RetrievalConfig"]
