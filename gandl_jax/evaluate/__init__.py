"""Downstream evaluation of site embeddings (GAN-DL paper protocol).

Entry point: `evaluate([EmbeddingSet(name, embeddings, ...), ...],
output_dir, tasks=None, ...)`; see pipeline.py. Modules: io (reads every
embeddings layout and the profile tables of other tools), inputs (sets,
options, post-processing), normalize (per-plate, robust, TVN, whitening,
wells, compound-doses), classify (linear-SVM protocol), dose_response (4PL),
retrieval (copairs mAP, percent replicating, energy distance), truth
(planted truth), tasks (the classification and dose-response computations),
registry (`@register_task`), task_* (the registered tasks), runner (runs
them), plots, report. The file format itself is `gandl_jax.embeddings`.
"""
from gandl_jax.evaluate.io import Embeddings, TableSpec, load_embeddings
from gandl_jax.evaluate.pipeline import (ALL_TASKS, EmbeddingSet, Options,
                                         evaluate, postprocess)
from gandl_jax.evaluate.registry import register_task
from gandl_jax.evaluate.retrieval import RetrievalConfig

__all__ = ["evaluate", "EmbeddingSet", "Options", "postprocess", "Embeddings",
           "load_embeddings", "ALL_TASKS", "TableSpec", "RetrievalConfig",
           "register_task"]
