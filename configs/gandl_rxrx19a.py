r"""GAN-DL on RxRx19a: the paper's setting (5 channels, mapping depth 3, latent 512).

The argument after ':' picks the training resolution (256 default, 512, 1024);
hyperparameters follow stylegan2-ada-pytorch's `paper256`, `paper512` and
`stylegan2` (1024) configurations, with GAN-DL's changes.

Train on a Cloud TPU VM (all workers run the same command):

  gandl-train --config configs/gandl_rxrx19a.py:256 \
      --workdir gs://BUCKET/gandl/rxrx19a-256 \
      --config.data.path 'gs://BUCKET/shards/rxrx19a-256/*.tfrecord'

Debug the same config on a laptop CPU (tiny batch, few steps):

  gandl-train --config configs/gandl_rxrx19a.py:256,runlocal --workdir /tmp/gandl
"""
import ml_collections
from ml_collections import config_dict

# resolution -> (channel_base, batch, mbstd_group, lr, r1_gamma, ema_kimg)
_PRESETS = {
    256: (16384, 64, 8, 0.0025, 1.0, 20.0),   # ADA "paper256"
    512: (32768, 64, 8, 0.0025, 0.5, 20.0),   # ADA "paper512"
    1024: (32768, 32, 4, 0.002, 10.0, 10.0),  # ADA "stylegan2"
}


def model_config(resolution: int = 256) -> ml_collections.ConfigDict:
  """Architecture of G and D (shared by training, export and the importer)."""
  if resolution not in _PRESETS:
    raise ValueError(f"resolution must be one of {sorted(_PRESETS)}, "
                     f"got {resolution}")
  channel_base, _, mbstd_group, _, _, _ = _PRESETS[resolution]
  return ml_collections.ConfigDict(dict(
      resolution=resolution,
      img_channels=5,             # Hoechst, ConA, Phalloidin, Syto14, WGA
      z_dim=512,
      w_dim=512,
      mapping_layers=3,           # GAN-DL: 3 (StyleGAN2: 8)
      mapping_lr_multiplier=0.01,
      w_avg_beta=0.995,
      channel_base=channel_base,
      channel_max=512,
      mbstd_group_size=mbstd_group,
      mbstd_num_channels=1,
      conv_clamp=config_dict.placeholder(float),  # None: no clamping
  ))


def get_config(arg: str = "256") -> ml_collections.ConfigDict:
  args = [a for a in (arg or "256").split(",") if a]
  resolution = int(args[0]) if args and args[0].isdigit() else 256
  runlocal = "runlocal" in args
  channel_base, batch, _, lr, gamma, ema_kimg = _PRESETS[resolution]
  del channel_base

  config = ml_collections.ConfigDict()
  config.model = model_config(resolution)
  config.compute_dtype = "bfloat16"   # parameters and optimizer stay float32
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      path="",                 # shard dir or glob, local or gs://
      filter="",               # e.g. "disease_condition == 'Mock'" (see docs)
      shuffle_buffer=4096,
      x_flip=True,
      rot90=True,              # microscopy has no orientation
      num_parallel_calls=-1,   # tf.data.AUTOTUNE
      prefetch=2,
  ))

  config.batch_size = batch            # global, over all devices and hosts
  config.total_kimg = 15000.0          # ~24 h on a TPU v3-8 at 256x256
  config.checkpoint_every_kimg = 50.0
  config.keep_checkpoints = 3          # the last N
  config.keep_checkpoint_every_kimg = 1000.0
  config.log_every_kimg = 4.0
  config.image_grid_every_kimg = 100.0

  config.optim = ml_collections.ConfigDict(dict(
      g_lr=lr, d_lr=lr, beta1=0.0, beta2=0.99, eps=1e-8))
  config.loss = ml_collections.ConfigDict(dict(
      r1_gamma=gamma,
      r1_interval=16,
      pl_weight=2.0,
      pl_interval=4,
      pl_decay=0.01,
      pl_batch_shrink=2,
      style_mixing_prob=0.9,
  ))
  config.ema = ml_collections.ConfigDict(dict(
      half_life_kimg=ema_kimg,
      rampup=config_dict.placeholder(float),  # e.g. 0.05; None: no ramp-up
  ))

  if runlocal:
    config.batch_size = 8
    config.model.mbstd_group_size = 4
    config.total_kimg = 0.064
    config.checkpoint_every_kimg = 0.032
    config.log_every_kimg = 0.008
    config.image_grid_every_kimg = 0.032
    config.data.shuffle_buffer = 64
    config.compute_dtype = "float32"
  return config
