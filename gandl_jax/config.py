"""The one definition of the training config's keys and their defaults.

Config files under `configs/` start from `base_config()` and override values;
`validate()` rejects unknown keys (typos) and bad values with a clear message
before anything is compiled. Modules take their values from here: the model
builder fills a checkpoint's model config with `model_config()`'s defaults
(`full_model_config`), the input pipeline its data config likewise. Training-loop keys (`config.data.path`,
`config.batch_size`, `config.total_kimg`, `config.checkpoint_every_kimg`,
`config.seed`, `config.num_bf16_res`) are part of the public interface.
Another model family's configs (`config.family`, e.g. 'convae' for the
ConvAE baseline) have their own key set, defined by the family
(`gandl_jax.families`) and validated and resumed by the same functions.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import ml_collections
from ml_collections import config_dict

from gandl_jax import families
from gandl_jax import sharding

# `config.augment` and `config.augment_pipe` (the pipelines are in
# gandl_jax/model/augment.py, `PIPELINES`).
AUGMENT_MODES = ("none", "fixed", "ada")
AUGMENT_PIPES = ("bg", "bgc", "blit", "color", "geom")

# `config.remat`: which G/D block activations gradients keep (the policies
# are in gandl_jax/model/networks.py, `REMAT_POLICIES`).
REMAT_OPTIONS = ("none", "blocks", "blocks_dots")


def check_resolution(resolution: int) -> int:
  """Returns log2(resolution); raises unless it is a power of two in [8, 1024]."""
  log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
  if resolution < 8 or resolution > 1024 or 2**log2 != resolution:
    raise ValueError(f"resolution must be a power of two from 8 to 1024, "
                     f"got {resolution}")
  return log2


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


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The input pipeline's keys (`config.data`)."""
  cfg = ml_collections.ConfigDict(dict(
      path="",                 # shard dir or glob, local or gs://
      filter="",               # metadata filter expression (docs/data.md)
      shuffle_buffer=4096,
      x_flip=True,
      rot90=True,              # microscopy has no orientation
      num_parallel_calls=-1,   # -1: tf.data.AUTOTUNE
      prefetch=2,
  ))
  cfg.update(overrides)
  return cfg


def _filled(defaults: ml_collections.ConfigDict, given: Any) -> Dict[str, Any]:
  out = defaults.to_dict()
  out.update(dict(given.items()))
  return out


def full_model_config(given: Any) -> Dict[str, Any]:
  """A model config (dict or ConfigDict, e.g. from a checkpoint's metadata)
  with every key of `model_config()`; missing keys take their defaults."""
  return _filled(model_config(), given)


def full_data_config(given: Any) -> Dict[str, Any]:
  """`config.data` (dict or ConfigDict) with every key of `data_config()`."""
  return _filled(data_config(), given)


# ---------------------------------------------------------------- families


def family_base_config(config: Any) -> ml_collections.ConfigDict:
  """The base config (every key and default) of `config`'s family."""
  plugin = families.plugin(config)
  return base_config() if plugin is None else plugin.base_config()


def shape_keys(config: Any) -> Tuple[str, ...]:
  """The keys of `config`'s family that change parameter shapes."""
  plugin = families.plugin(config)
  return SHAPE_KEYS if plugin is None else tuple(plugin.shape_keys)


def pl_enabled(config: Any) -> bool:
  """Whether the path-length regularizer (G reg phase) runs."""
  return float(config.loss.pl_weight) > 0


def r1_enabled(config: Any) -> bool:
  """Whether the R1 regularizer (D reg phase) runs."""
  return float(config.loss.r1_gamma) > 0


def demo_schedule(config):
  """The demo's CPU-sized schedule, in place, for every model family (the
  GAN demo and the baselines trained beside it see the same images): batch 16,
  2 kimg, checkpoints every 0.5 kimg (every 1 kimg kept), log every 0.128,
  grids every 0.5, shuffle buffer 512. Returns `config`."""
  config.batch_size = 16
  config.total_kimg = 2.0
  config.checkpoint_every_kimg = 0.5
  config.keep_checkpoint_every_kimg = 1.0
  config.log_every_kimg = 0.128
  config.image_grid_every_kimg = 0.5
  config.data.shuffle_buffer = 512
  return config


def base_config() -> ml_collections.ConfigDict:
  """Every training key with a sensible default."""
  config = ml_collections.ConfigDict()
  config.model = model_config()
  # Mixed precision (stylegan2-ada-pytorch's num_fp16_res, in bfloat16): the
  # number of highest resolutions whose G and D blocks compute in bfloat16;
  # 0: float32 throughout; -1: every block from 8x8 up. Parameters, losses,
  # regularizer reductions and the optimizer stay float32
  # (gandl_jax/model/networks.py, docs/training.md "Precision").
  config.num_bf16_res = 0
  # Rematerialization of G/D blocks in gradients (networks.REMAT_OPTIONS):
  # "none", "blocks" or "blocks_dots"; memory for compute, same numbers.
  config.remat = "none"
  config.seed = 0

  config.data = data_config()

  config.batch_size = 64               # global, over all devices and hosts
  config.total_kimg = 15000.0          # thousands of real images shown to D
  config.checkpoint_every_kimg = 50.0
  config.keep_checkpoints = 3          # keep the last N ...
  config.keep_checkpoint_every_kimg = 1000.0   # ... and one every K kimg
  config.log_every_kimg = 4.0
  config.image_grid_every_kimg = 100.0
  config.image_grid_size = 8           # samples per side of the grid
  config.mbstd_shards = 0              # 0: one per device (groups stay local)
  # Representation probe (train/probe.py, README "Representation probe"):
  # every probe_every_kimg (0: off), D's probe_layer features of a fixed set
  # of at most probe_sites untreated Mock / Active sites, chosen from
  # sites.csv, feed linear SVMs (Mock vs Active, HRCE vs VERO; plate-grouped
  # split); the balanced accuracies go to metrics.jsonl / TensorBoard and the
  # checkpoint with the best probe score is kept. The sites come from a
  # recorded subset of the plates (probe_plate_fraction of each cell type's
  # plates, at least 2), which gandl-evaluate leaves out of the control task
  # of a probe-selected checkpoint. Every layer of probe_layers (those the
  # model has) is scored from the same forward pass; probe_layer's score is
  # probe/score, the default selection of `gandl-export --step best`.
  config.probe_every_kimg = 100.0
  config.probe_sites = 2000
  config.probe_layer = "fc"
  config.probe_layers = "fc,conv,b8,b16,b32"
  config.probe_plate_fraction = 0.25

  # Adaptive discriminator augmentation (model/augment.py, docs/training.md
  # "Augmentation (ADA)"): every image D sees, reals and fakes in every D
  # pass and in G's pass through D, goes through the `augment_pipe` groups
  # with probability p. 'none': off; 'fixed': p = augment_p throughout;
  # 'ada': p starts at augment_p and moves every ada_interval iterations
  # towards E[sign(D(real))] = ada_target, by one unit per ada_kimg.
  config.augment = "none"
  config.augment_p = 0.0
  config.augment_pipe = "bgc"
  config.ada_target = 0.6
  config.ada_interval = 4
  config.ada_kimg = 500.0
  # Contrastive discriminator (ContraD; model/contrastive.py,
  # docs/training.md "Contrastive discriminator"): D's representation (the
  # `fc` layer) is trained with SimCLR's loss on two views of each real and
  # the fakes' supervised-contrastive loss, through two projection heads of
  # contrastive_proj_dim; the real/fake head reads it with its gradient
  # stopped.
  config.contrastive = False
  config.contrastive_temperature = 0.1
  config.contrastive_fake_weight = 1.0
  config.contrastive_proj_dim = 128

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
  known, given = set(_keys(family_base_config(config))), set(_keys(config))
  errors = [f"unknown key 'config.{k}'" for k in sorted(given - known)]
  errors += [f"missing key 'config.{k}'" for k in sorted(known - given)]
  _fail(errors)
  plugin = families.plugin(config)
  if plugin is not None:
    _fail(plugin.validate(config, num_devices, num_hosts))
    return
  model, loss = config.model, config.loss
  try:
    check_resolution(int(model.resolution))
  except ValueError as e:
    errors.append(f"config.model.resolution: {e}")
  n_bf16 = config.num_bf16_res
  if isinstance(n_bf16, bool) or not isinstance(n_bf16, int) or n_bf16 < -1:
    errors.append(f"config.num_bf16_res must be an int >= 0 (highest "
                  f"resolutions run in bfloat16) or -1 (all), got {n_bf16!r}")
  if config.remat not in REMAT_OPTIONS:
    errors.append(f"config.remat must be one of {list(REMAT_OPTIONS)}, got "
                  f"{config.remat!r}")
  b = int(config.batch_size)
  try:
    sharding.check_batch(
        b, num_devices, num_hosts, int(model.mbstd_group_size),
        group_slices=int(config.mbstd_shards) or num_devices,
        name="config.batch_size")
  except ValueError as e:
    errors.append(str(e))
  if pl_enabled(config):
    pl_batch = b // max(int(loss.pl_batch_shrink), 1)
    if pl_batch == 0 or pl_batch % num_devices:
      errors.append(
          f"config.batch_size // config.loss.pl_batch_shrink = {pl_batch} must "
          f"be a positive multiple of the number of devices ({num_devices})")
  for key in ("r1_interval", "pl_interval", "pl_batch_shrink"):
    if int(loss[key]) < 1:
      errors.append(f"config.loss.{key} must be >= 1, got {loss[key]}")
  for key in ("total_kimg", "checkpoint_every_kimg", "log_every_kimg",
              "image_grid_every_kimg"):
    if not config[key] > 0:
      errors.append(f"config.{key} must be > 0, got {config[key]}")
  if not config.probe_every_kimg >= 0:
    errors.append(f"config.probe_every_kimg must be >= 0 (0: no probe), got "
                  f"{config.probe_every_kimg}")
  if config.probe_every_kimg > 0 and int(config.probe_sites) < 16:
    errors.append(f"config.probe_sites must be >= 16, got "
                  f"{config.probe_sites}")
  if config.probe_every_kimg > 0:
    errors.extend(probe_config_errors(config))
  if not 0 <= loss.style_mixing_prob <= 1:
    errors.append("config.loss.style_mixing_prob must be in [0, 1]")
  errors += _augment_errors(config)
  _fail(errors)


def probe_layer_names(config: Any) -> List[str]:
  """config.probe_layers as a list (comma-separated names), with
  config.probe_layer first."""
  names = [str(config.probe_layer)]
  for name in str(config.get("probe_layers", "") or "").split(","):
    if name.strip() and name.strip() not in names:
      names.append(name.strip())
  return names


def probe_config_errors(config: Any) -> List[str]:
  """The probe keys' errors (empty when valid)."""
  errors = []
  fraction = float(config.get("probe_plate_fraction", 1.0))
  if not 0 < fraction <= 1:
    errors.append(f"config.probe_plate_fraction must be in (0, 1], got "
                  f"{fraction}")
  layer_name = re.compile(r"^(fc|conv|logit|b[0-9]+)$")
  bad = [n for n in probe_layer_names(config) if not layer_name.match(n)]
  if bad:
    errors.append(f"config.probe_layers: unknown layer name(s) {bad}; "
                  f"expected fc, conv, logit or b<resolution> (b8, b16, ...)")
  return errors


def augment_enabled(config: Any) -> bool:
  """Whether D's inputs go through the augmentation pipeline."""
  return config.get("augment", "none") != "none"


def _augment_errors(config: Any) -> List[str]:
  """The ADA and ContraD keys' problems."""
  errors = []
  if config.augment not in AUGMENT_MODES:
    errors.append(f"config.augment must be one of {list(AUGMENT_MODES)}, got "
                  f"{config.augment!r}")
  if config.augment_pipe not in AUGMENT_PIPES:
    errors.append(f"config.augment_pipe must be one of "
                  f"{list(AUGMENT_PIPES)}, got {config.augment_pipe!r}")
  if not 0 <= config.augment_p <= 1:
    errors.append(f"config.augment_p must be in [0, 1], got "
                  f"{config.augment_p}")
  if not 0 < config.ada_target <= 1:
    errors.append(f"config.ada_target must be in (0, 1], got "
                  f"{config.ada_target}")
  if int(config.ada_interval) < 1:
    errors.append(f"config.ada_interval must be >= 1, got "
                  f"{config.ada_interval}")
  if not config.ada_kimg > 0:
    errors.append(f"config.ada_kimg must be > 0, got {config.ada_kimg}")
  if config.contrastive:
    if not config.contrastive_temperature > 0:
      errors.append(f"config.contrastive_temperature must be > 0, got "
                    f"{config.contrastive_temperature}")
    if not config.contrastive_fake_weight >= 0:
      errors.append(f"config.contrastive_fake_weight must be >= 0, got "
                    f"{config.contrastive_fake_weight}")
    if int(config.contrastive_proj_dim) < 1:
      errors.append(f"config.contrastive_proj_dim must be >= 1, got "
                    f"{config.contrastive_proj_dim}")
    if int(config.batch_size) < 2:
      errors.append("config.contrastive needs config.batch_size >= 2")
  return errors


# ------------------------------------------------------------------ resume

# The GAN's keys that change parameter shapes: a checkpoint cannot continue
# under another value (start a new workdir instead); other families name
# theirs (`shape_keys`).
SHAPE_KEYS = ("model.resolution", "model.img_channels", "model.z_dim",
              "model.w_dim", "model.mapping_layers", "model.channel_base",
              "model.channel_max", "model.mbstd_num_channels",
              # What the training state holds (the augmentation probability
              # and statistics, the contrastive projection heads).
              "augment", "contrastive", "contrastive_proj_dim")
# Keys that change neither parameters nor values, only memory and speed: a
# resume may change them freely (the change is logged).
FREE_KEYS = ("remat",)


def flatten(cfg: Any, prefix: str = "") -> Dict[str, Any]:
  """{'dotted.key': value} of a (nested) config or dict."""
  out = {}
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, name + "."))
    else:
      out[name] = list(v) if isinstance(v, tuple) else v
  return out


def config_diff(stored: Any, new: Any) -> List[Tuple[str, Any, Any]]:
  """(key, stored value, new value) for every key whose value differs.

  A key the stored config lacks (a checkpoint older than the key) counts as
  changed only if the new value is not the key's default; a key the new
  config lacks (removed from the code) is ignored.
  """
  old, cur = flatten(stored), flatten(new)
  defaults = flatten(family_base_config(new))
  diff = []
  for key in sorted(cur):
    if key in old:
      if old[key] != cur[key]:
        diff.append((key, old[key], cur[key]))
    elif cur[key] != defaults.get(key, cur[key]):
      diff.append((key, defaults[key], cur[key]))
  return diff


def check_resume(stored: Any, new: Any, allow: Sequence[str] = (),
                 where: str = "the checkpoint") -> List[Tuple[str, Any, Any]]:
  """The changes from the config a run was saved with (`stored`) to `new`.

  Raises ValueError with the full diff unless every changed key is named in
  `allow` (a key, or a section such as 'optim' for all its keys); keys in
  `shape_keys(new)` can never change. Returns the (allowed) changes.
  """
  allow = [a.strip() for a in allow if a and a.strip()]
  known = set(flatten(family_base_config(new)))
  unknown = [a for a in allow
             if a not in known and not any(k.startswith(a + ".") for k in known)]
  if unknown:
    raise ValueError(f"allowed config change(s) {unknown}: no such config key "
                     f"(expected dotted keys such as total_kimg or optim.g_lr)")
  if families.name(stored) != families.name(new):
    raise ValueError(f"{where} belongs to a {families.name(stored)!r} run but "
                     f"the config trains a {families.name(new)!r} model: use "
                     f"a new workdir")
  diff = config_diff(stored, new)
  allowed = lambda k: any(k == a or k.startswith(a + ".") for a in allow)
  fixed = shape_keys(new)
  shape = [d for d in diff if d[0] in fixed]
  refused = [d for d in diff if d[0] not in fixed + FREE_KEYS
             and not allowed(d[0])]
  if shape or refused:
    lines = [f"  {k}: {old!r} -> {cur!r}" for k, old, cur in diff]
    msg = [f"the config differs from the one {where} was saved with:"] + lines
    if shape:
      msg.append(f"{', '.join(k for k, _, _ in shape)} change(s) the "
                 f"parameter shapes (or what the training state holds) and "
                 f"cannot change on resume: use a new workdir (or restore "
                 f"the old values)")
    if refused:
      msg.append("nothing was changed; to continue with the new values, "
                 "allow them explicitly: --allow_config_change=" +
                 ",".join(k for k, _, _ in refused))
    raise ValueError("\n".join(msg))
  return diff
