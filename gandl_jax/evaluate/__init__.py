"""Downstream evaluation of site embeddings (GAN-DL paper protocol).

Entry point: `evaluate(embeddings, output_dir, metadata=None, tasks=None,
baseline=None, baseline_name='baseline', ...)`; see pipeline.py. Modules:
io (all embedding layouts, the `f0000` feature naming), normalize (per-plate,
whitening, wells), classify (linear-SVM protocol), dose_response (4PL),
truth (planted truth), tasks, plots, report.
"""
from gandl_jax.evaluate.io import (FEATURE_PREFIX, Embeddings, feature_name,
                                   feature_names, load_embeddings,
                                   write_embeddings)
from gandl_jax.evaluate.pipeline import Options, evaluate, postprocess
from gandl_jax.evaluate.tasks import ALL_TASKS

__all__ = ["evaluate", "Options", "postprocess", "Embeddings",
           "load_embeddings", "write_embeddings", "feature_name",
           "feature_names", "FEATURE_PREFIX", "ALL_TASKS"]
