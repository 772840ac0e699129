"""Embedding sets that do not come from a GAN discriminator (gandl-features).

`METHODS` maps a method name to its `Method`: a pure function from uint8
sites (N, H, W, C) to float32 features (N, F), and the names of those
features. `gandl-features --method NAME` computes it for every site of a set
of shards and writes the embeddings layout of gandl-export
(`gandl_jax.baselines.run.compute_embeddings`), so gandl-evaluate takes it as
one more set. Register a new method by adding an entry here.

Also here: the ConvAE baseline (convae/, a model family trained and exported
by the core's gandl-train / gandl-export, which find it by name through
`gandl_jax.families`), the ResNet-50 of its perceptual loss
(resnet50.py), DenseNet-121 (densenet.py, collapsed.py) and the Keras
weights they load (keras_weights.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import numpy as np

from gandl_jax.baselines import classical


@dataclasses.dataclass(frozen=True)
class Method:
  """features: uint8 (N, H, W, C) -> float32 (N, F), a picklable module-level
  function (it runs in worker processes); names: C -> F feature names (None:
  only f0000...); parallel: whether sites may be split over processes."""
  features: Callable[[np.ndarray], np.ndarray]
  names: Optional[Callable[[int], List[str]]] = None
  description: str = ""
  parallel: bool = True


METHODS: Dict[str, Method] = {
    "classical": Method(
        classical.features, classical.feature_names,
        "CellProfiler-style image features: per-channel intensity "
        "statistics, GLCM (Haralick) texture, granularity, cross-channel "
        "correlation, nuclei count/size/shape/spacing"),
}


def method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown feature method {name!r}; available: "
                     f"{sorted(METHODS)}")
  return METHODS[name]
