"""The ConvAE baseline's config keys and defaults (`config.family = 'convae'`).

A ConvAE run has its own key set, `base_config()`: the GAN's data, schedule
and checkpoint keys (`gandl_jax.config`), Adam and the loss. It is
validated and resumed by `gandl_jax.config`'s functions through the family
record (gandl_jax/baselines/convae/__init__.py). Also here: the layout of a
ConvAE checkpoint's `model` item and the name of its embedding layer, facts
the trainer, the inference model and the export share.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import ml_collections
from ml_collections import config_dict

from gandl_jax import config as config_lib
from gandl_jax import sharding

FAMILY = "convae"
# A ConvAE checkpoint's model item: {MODEL_KEY: {'params': ...}}.
MODEL_KEY = "convae"
# The one embedding layer of a ConvAE (gandl-export --layer).
BOTTLENECK = "bottleneck"
EMBEDDING_LAYERS = (BOTTLENECK,)
# Config keys that change parameter shapes (never changed on resume).
SHAPE_KEYS = ("model.resolution", "model.img_channels", "model.channel_base",
              "model.channel_max", "model.bottleneck_dim")


def model_config(**overrides) -> ml_collections.ConfigDict:
  """The architecture (baselines/convae/model.py): the GAN's feature maps per
  resolution, a 1024-d bottleneck."""
  cfg = ml_collections.ConfigDict(dict(
      resolution=256,
      img_channels=5,
      channel_base=16384,
      channel_max=512,
      bottleneck_dim=1024,        # the embedding
      conv_clamp=config_dict.FieldReference(None, field_type=float),
  ))
  cfg.update(overrides)
  return cfg


def full_model_config(given: Any) -> Dict[str, Any]:
  """A ConvAE model config (dict or ConfigDict, e.g. a checkpoint's meta)
  with every key of `model_config()`; missing keys take their defaults."""
  out = model_config().to_dict()
  out.update(dict(given.items()))
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every key of a ConvAE training run (gandl-train with `family` 'convae')
  with its default: the GAN's data, schedule and checkpoint keys, Adam, and
  the loss (pixel L2 plus `loss.perceptual_weight` times the perceptual
  term named by `loss.perceptual_weights`, off by default)."""
  config = ml_collections.ConfigDict()
  config.family = FAMILY
  config.model = model_config()
  config.compute_dtype = "float32"
  config.seed = 0
  config.data = config_lib.data_config()
  config.batch_size = 64
  config.total_kimg = 2000.0
  config.checkpoint_every_kimg = 50.0
  config.keep_checkpoints = 3
  config.keep_checkpoint_every_kimg = 1000.0
  config.log_every_kimg = 4.0
  config.image_grid_every_kimg = 100.0
  config.image_grid_size = 8           # real / reconstruction pairs per side
  config.optim = ml_collections.ConfigDict(dict(
      lr=0.002, beta1=0.9, beta2=0.99, eps=1e-8))
  config.loss = ml_collections.ConfigDict(dict(
      perceptual_weight=0.0,           # 0: pixel L2 only
      perceptual_weights="none",       # imagenet / file / random / none:
                                       # model.py `perceptual_loss`
  ))
  return config


def demo_config(data_path: str = "", resolution: int = 32
                ) -> ml_collections.ConfigDict:
  """The demo-sized ConvAE (`configs/convae_rxrx19a.py:demo`): 32x32x5, the
  GAN demo's feature maps (64), a 128-d bottleneck (the paper's 1024 scaled
  as the GAN's embedding is, 512 -> 64), batch 16, Adam lr 0.005, 2 kimg.
  `resolution`: the shards' (any power of two from 8; the same layers)."""
  config = base_config()
  config.model = model_config(
      resolution=int(resolution), channel_base=1024, channel_max=64,
      bottleneck_dim=128)
  config.data.path = data_path
  # 0.005 rather than the full config's 0.002: after 1 kimg on the demo
  # shards L2 0.0635 vs 0.0676 (lr 0.01: 0.0603; 0.0005: 0.086),
  # docs/baselines.md.
  config.optim.lr = 0.005
  config_lib.demo_schedule(config)
  config.image_grid_size = 4
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int,
             num_hosts: int) -> List[str]:
  """The problems of a ConvAE config's values (its keys are checked by
  `gandl_jax.config.validate` against `base_config()`)."""
  errors = []
  try:
    config_lib.check_resolution(int(config.model.resolution))
  except ValueError as e:
    errors.append(f"config.model.resolution: {e}")
  if config.compute_dtype not in ("float32", "bfloat16"):
    errors.append(f"config.compute_dtype must be 'float32' or 'bfloat16', got "
                  f"{config.compute_dtype!r}")
  if int(config.model.bottleneck_dim) < 1:
    errors.append(f"config.model.bottleneck_dim must be >= 1, got "
                  f"{config.model.bottleneck_dim}")
  try:
    sharding.check_batch(int(config.batch_size), num_devices, num_hosts, 1,
                         name="config.batch_size")
  except ValueError as e:
    errors.append(str(e))
  for key in ("total_kimg", "checkpoint_every_kimg", "log_every_kimg",
              "image_grid_every_kimg"):
    if not config[key] > 0:
      errors.append(f"config.{key} must be > 0, got {config[key]}")
  if not config.optim.lr > 0:
    errors.append(f"config.optim.lr must be > 0, got {config.optim.lr}")
  if not config.loss.perceptual_weight >= 0:
    errors.append(f"config.loss.perceptual_weight must be >= 0, got "
                  f"{config.loss.perceptual_weight}")
  return errors


def check_model(model: Mapping[str, Any]) -> None:
  """A ConvAE checkpoint's `model` item is {MODEL_KEY: {'params': ...}}."""
  if set(model) != {MODEL_KEY} or "params" not in model[MODEL_KEY]:
    raise ValueError(f"a ConvAE checkpoint's model must be "
                     f"{{{MODEL_KEY!r}: {{'params': ...}}}}, got keys "
                     f"{sorted(model)}")


def check_embedding_layer(layer: str) -> None:
  if layer not in EMBEDDING_LAYERS:
    raise ValueError(f"unknown layer {layer!r}; a ConvAE's embedding layers "
                     f"are {list(EMBEDDING_LAYERS)}")
