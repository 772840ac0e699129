"""D's features as a data-parallel jitted function over a mesh.

The one home of "images -> D features" for whole batches spread over every
device: `gandl-export` (inference/export.py) and training's representation
probe (train/probe.py) both call `data_parallel_features`, so the probe's
features are exactly those `gandl-export --batch B` writes for the same
weights and batch.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp

from gandl_jax import images as image_lib
from gandl_jax import sharding
from gandl_jax.model import networks


def data_parallel_features(D: networks.Discriminator, mesh: Any,
                           layer: str = "fc") -> Callable[[Any, Any], Any]:
  """`fn(d_variables, images) -> features`, jitted on `mesh`.

  `d_variables` ({'params': ...}) replicated on the mesh; `images` a global
  (B, R, R, C) array sharded on the mesh's `data` axis, uint8 in [0, 255] or
  float in [-1, 1]; `features` (B, F) float32 with the same sharding.
  Minibatch-stddev groups are formed over the whole global batch (D's default
  `mbstd_shards=1`, as `Model.embed` forms them for one batch of B images), so
  the features do not depend on the number of devices; B must be a multiple
  of the mesh size and of min(mbstd_group_size, B) (`sharding.check_batch`
  with `group_slices=1`).
  """
  fn = data_parallel_layer_features(D, mesh, (layer,))
  return lambda variables, images: fn(variables, images)[layer]


def data_parallel_layer_features(D: networks.Discriminator, mesh: Any,
                                 layers: Sequence[str]
                                 ) -> Callable[[Any, Any], Dict[str, Any]]:
  """As `data_parallel_features`, for several layers of one forward pass:
  `fn(d_variables, images) -> {layer: (B, F_layer) features}`."""
  layers = tuple(layers)
  for layer in layers:
    networks.check_embedding_layer(layer, D.resolution)
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

  def features(variables, images):
    x = image_lib.to_float(images)
    logits, feats = D.apply(variables, x, return_features=True)
    feats = dict(feats, logit=logits)
    return {layer: feats[layer].astype(jnp.float32).reshape(x.shape[0], -1)
            for layer in layers}

  return jax.jit(features, in_shardings=(repl, data),
                 out_shardings={layer: data for layer in layers})
