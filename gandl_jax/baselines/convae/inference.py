"""A trained ConvAE for inference (`gandl_jax.load` on a ConvAE workdir) and
its embedding for the one export path (gandl-export).

  model = gandl_jax.load("runs/convae")       # a ConvAEModel
  z = model.embed(images)                     # (N, bottleneck_dim) float32
  recon = model.reconstruct(images)           # uint8 NHWC

`images` are uint8 NHWC, normalized inside as in training. A site's outputs
depend on that site alone (no minibatch statistics), so batch sizes change
speed, not results.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gandl_jax import images as image_lib
from gandl_jax import sharding
from gandl_jax.baselines.convae import config as convae_config
from gandl_jax.baselines.convae import model as convae
from gandl_jax.inference import api
from gandl_jax.inference import export


class ConvAEModel:
  """A trained ConvAE baseline (configs/convae_rxrx19a.py) with batched,
  jitted inference: `embed` (the bottleneck, its embedding) and
  `reconstruct`.

  Attributes: `config` (model config dict), `step`, `kimg`, `meta`,
  `resolution`, `img_channels`, `bottleneck_dim`, `embedding_layers`
  (('bottleneck',)), `variables` ({'params': ...}), `ae` (the Flax module).
  """

  def __init__(self, variables: Mapping[str, Any], meta: Mapping[str, Any],
               compute_dtype: str = "float32", batch_size: int = 64):
    if "model" not in meta:
      raise ValueError("meta must hold the model config under 'model'")
    key = convae_config.MODEL_KEY
    if key not in variables:
      raise ValueError(f"model variables lack {key!r} (have "
                       f"{sorted(variables)})")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.meta = dict(meta)
    self.config: Dict[str, Any] = convae_config.full_model_config(
        meta["model"])
    self.step = int(meta.get("step", 0))
    self.kimg = float(meta.get("kimg", 0.0))
    self.ae = convae.build(self.config, compute_dtype)
    self.resolution = int(self.config["resolution"])
    self.img_channels = int(self.config["img_channels"])
    self.bottleneck_dim = int(self.config["bottleneck_dim"])
    self.embedding_layers = convae_config.EMBEDDING_LAYERS
    self.batch_size = int(batch_size)
    self.variables = jax.device_put({"params": variables[key]["params"]},
                                    jax.local_devices()[0])
    ae = self.ae
    self._encode = jax.jit(lambda v, x: ae.apply(
        v, image_lib.to_float(x), method=ae.encode).astype(jnp.float32))
    self._recon = jax.jit(lambda v, x: ae.apply(v, image_lib.to_float(x))[0])

  def __repr__(self) -> str:
    c = self.config
    return (f"ConvAEModel(resolution={c['resolution']}, img_channels="
            f"{c['img_channels']}, bottleneck_dim={c['bottleneck_dim']}, "
            f"step={self.step}, kimg={self.kimg:g})")

  _check_images = api.Model._check_images

  def _batched(self, fn, images: Any) -> np.ndarray:
    images = self._check_images(images)
    bs, out = self.batch_size, []
    for i in range(0, len(images), bs):
      chunk = images[i:i + bs]
      m = len(chunk)
      if m < bs and len(images) > bs:   # keep one compiled shape
        chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:],
                                                np.uint8)])
      out.append(np.asarray(fn(self.variables, jnp.asarray(chunk)),
                            np.float32)[:m])
    return np.concatenate(out)

  def embed(self, images: np.ndarray,
            layer: str = convae_config.BOTTLENECK) -> np.ndarray:
    """float32 (N, bottleneck_dim) embeddings of uint8 NHWC images."""
    convae_config.check_embedding_layer(layer)
    return self._batched(self._encode, images)

  def reconstruct_float(self, images: np.ndarray) -> np.ndarray:
    """float32 reconstructions in the network's [-1, 1] range."""
    return self._batched(self._recon, images)

  def reconstruct(self, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC reconstructions of uint8 NHWC images."""
    return image_lib.to_uint8(self.reconstruct_float(images))


def data_parallel_bottleneck(ae: convae.ConvAE, mesh: Any
                             ) -> Callable[[Any, Any], Any]:
  """`fn(variables, images) -> (B, bottleneck_dim)` float32, jitted on
  `mesh` like `model.embed.data_parallel_features` (`variables`
  {'params': ...} replicated; `images` data-sharded, uint8 or float in
  [-1, 1]). A site's embedding depends on that site alone, so any batch that
  splits over the mesh gives the same rows."""
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

  def features(variables, images):
    x = image_lib.to_float(images)
    z = ae.apply(variables, x, method=ae.encode)
    return z.astype(jnp.float32)

  return jax.jit(features, in_shardings=(repl, data), out_shardings=data)


def embedding(model: ConvAEModel, layer: Optional[str], batch: int,
              num_hosts: int) -> export.Embedding:
  """The bottleneck as the one export path writes it (the family record's
  `embedding`): `gandl.layer` 'bottleneck', `gandl.family` 'convae'."""
  del num_hosts
  layer = layer or convae_config.BOTTLENECK
  convae_config.check_embedding_layer(layer)

  def make_fn(mesh):
    jitted = data_parallel_bottleneck(model.ae, mesh)
    variables = sharding.replicate(model.variables, mesh)
    return lambda images: jitted(variables, images)

  return export.Embedding(
      layer=layer, group=1, make_fn=make_fn,
      metadata={export.META_FAMILY: convae_config.FAMILY,
                export.META_BATCHING: (
                    f"batches of {batch} sites in shard order; a site's row "
                    f"depends on that site alone")})
