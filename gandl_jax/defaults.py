"""The one definition of the training config's keys and their defaults.

Config files under `configs/` start from `base_config()` and override values;
`validate()` rejects unknown keys (typos) and bad values with a clear message
before anything is compiled. Training-loop keys (`config.data.path`,
`config.batch_size`, `config.total_kimg`, `config.checkpoint_every_kimg`,
`config.seed`, `config.compute_dtype`) are part of the public interface.
"""
from __future__ import annotations

from typing import Any, Iterable, List

import ml_collections
from ml_collections import config_dict

from gandl_jax import networks


def model_config(**overrides) -> ml_collections.ConfigDict:
  """GAN-DL's architecture: 5 channels, mapping 3, latents 512, 256x256."""
  cfg = ml_collections.ConfigDict(dict(
      resolution=256,
      img_channels=5,             # Hoechst, ConA, Phalloidin, Syto14, WGA
      z_dim=512,
      w_dim=512,
      mapping_layers=3,           # GAN-DL: 3 (StyleGAN2: 8)
      mapping_lr_multiplier=0.01,
      w_avg_beta=0.995,
      channel_base=16384,
      channel_max=512,
      mbstd_group_size=4,
      mbstd_num_channels=1,
      conv_clamp=config_dict.FieldReference(None, field_type=float),  # None: no clamping
  ))
  cfg.update(overrides)
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Every training key with a sensible default."""
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.compute_dtype = "float32"     # or bfloat16 (params stay float32)
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      path="",                 # shard dir or glob, local or gs://
      filter="",               # metadata filter expression (docs/data.md)
      shuffle_buffer=4096,
      x_flip=True,
      rot90=True,              # microscopy has no orientation
      num_parallel_calls=-1,   # -1: tf.data.AUTOTUNE
      prefetch=2,
  ))

  config.batch_size = 64               # global, over all devices and hosts
  config.total_kimg = 15000.0          # thousands of real images shown to D
  config.checkpoint_every_kimg = 50.0
  config.keep_checkpoints = 3          # keep the last N ...
  config.keep_checkpoint_every_kimg = 1000.0   # ... and one every K kimg
  config.log_every_kimg = 4.0
  config.image_grid_every_kimg = 100.0
  config.image_grid_size = 8           # samples per side of the grid
  config.mbstd_shards = 0              # 0: one per device (groups stay local)

  config.optim = ml_collections.ConfigDict(dict(
      g_lr=0.0025, d_lr=0.0025, beta1=0.0, beta2=0.99, eps=1e-8))
  config.loss = ml_collections.ConfigDict(dict(
      r1_gamma=1.0,
      r1_interval=16,
      pl_weight=2.0,
      pl_interval=4,
      pl_decay=0.01,
      pl_batch_shrink=2,
      style_mixing_prob=0.9,
  ))
  config.ema = ml_collections.ConfigDict(dict(
      half_life_kimg=20.0,
      rampup=config_dict.FieldReference(None, field_type=float),  # e.g. 0.05; None: no ramp-up
  ))
  return config


def _keys(cfg: Any, prefix: str = "") -> List[str]:
  out = []
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out += _keys(v, name + ".")
    else:
      out.append(name)
  return out


def _fail(errors: Iterable[str]) -> None:
  errors = list(errors)
  if errors:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


def validate(config: ml_collections.ConfigDict, num_devices: int = 1,
             num_hosts: int = 1) -> None:
  """Raises ValueError listing every problem: unknown or missing keys, bad
  resolution, batch sizes that do not split over devices, bad schedules."""
  known, given = set(_keys(base_config())), set(_keys(config))
  errors = [f"unknown key 'config.{k}'" for k in sorted(given - known)]
  errors += [f"missing key 'config.{k}'" for k in sorted(known - given)]
  _fail(errors)
  m, l = config.model, config.loss
  try:
    networks.check_resolution(int(m.resolution))
  except ValueError as e:
    errors.append(f"config.model.resolution: {e}")
  if config.compute_dtype not in ("float32", "bfloat16"):
    errors.append(f"config.compute_dtype must be 'float32' or 'bfloat16', got "
                  f"{config.compute_dtype!r}")
  b = int(config.batch_size)
  if b <= 0 or b % num_devices:
    errors.append(f"config.batch_size={b} must be a positive multiple of the "
                  f"number of devices ({num_devices})")
  elif b % num_hosts:
    errors.append(f"config.batch_size={b} must be a multiple of the number of "
                  f"hosts ({num_hosts})")
  shards = int(config.mbstd_shards) or num_devices
  if b % shards == 0:
    per_shard = b // shards
    g = min(int(m.mbstd_group_size), per_shard)
    if per_shard % g:
      errors.append(
          f"batch per device {per_shard} must be a multiple of "
          f"config.model.mbstd_group_size={m.mbstd_group_size}")
  else:
    errors.append(f"config.batch_size={b} must be a multiple of "
                  f"config.mbstd_shards={shards}")
  if l.pl_weight > 0:
    pl_batch = b // max(int(l.pl_batch_shrink), 1)
    if pl_batch == 0 or pl_batch % num_devices:
      errors.append(
          f"config.batch_size // config.loss.pl_batch_shrink = {pl_batch} must "
          f"be a positive multiple of the number of devices ({num_devices})")
  for key in ("r1_interval", "pl_interval", "pl_batch_shrink"):
    if int(l[key]) < 1:
      errors.append(f"config.loss.{key} must be >= 1, got {l[key]}")
  for key in ("total_kimg", "checkpoint_every_kimg", "log_every_kimg",
              "image_grid_every_kimg"):
    if not config[key] > 0:
      errors.append(f"config.{key} must be > 0, got {config[key]}")
  if not 0 <= l.style_mixing_prob <= 1:
    errors.append("config.loss.style_mixing_prob must be in [0, 1]")
  _fail(errors)


def check_dataset(config: ml_collections.ConfigDict, info: dict,
                  source: str) -> None:
  """The shards' resolution and channels must match the model's."""
  errors = []
  res, ch = info.get("resolution"), info.get("num_channels",
                                             len(info.get("channels", [])))
  if res != config.model.resolution:
    errors.append(f"dataset {source} has resolution {res} but "
                  f"config.model.resolution={config.model.resolution}; "
                  f"convert at {config.model.resolution} or change the config")
  if ch != config.model.img_channels:
    errors.append(f"dataset {source} has {ch} channels but "
                  f"config.model.img_channels={config.model.img_channels}")
  _fail(errors)
