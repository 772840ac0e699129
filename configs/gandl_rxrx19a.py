r"""GAN-DL on RxRx19a: the paper's setting (5 channels, mapping depth 3, latent 512).

The argument after ':' picks the training resolution (256 default, 512, 1024);
hyperparameters follow stylegan2-ada-pytorch's `paper256`, `paper512` and
`stylegan2` (1024) configurations, with GAN-DL's changes. Precision is the
reference's train.py policy (every config): the 4 highest resolutions of G
and D compute in reduced precision (`num_bf16_res = 4`; bfloat16 where the
reference uses float16), the blocks below in float32, and activations are
clamped to +-256 (`model.conv_clamp`: every conv, toRGB, fromRGB and epilogue
conv). Add `,runlocal` for a few CPU steps of the same model in float32
(debugging).

Train on a Cloud TPU VM (all workers run the same command):

  gandl-train --config configs/gandl_rxrx19a.py:256 \
      --workdir gs://BUCKET/gandl/rxrx19a-256 \
      --config.data.path 'gs://BUCKET/shards/rxrx19a-256/*.tfrecord'

Debug the same config on a laptop CPU (tiny batch, few steps):

  gandl-train --config configs/gandl_rxrx19a.py:256,runlocal --workdir /tmp/gandl \
      --config.data.path '/tmp/shards/*.tfrecord'
"""
import ml_collections

from gandl_jax import config as config_lib

# resolution -> (channel_base, batch, mbstd_group, lr, r1_gamma, ema_kimg)
PRESETS = {
    256: (16384, 64, 8, 0.0025, 1.0, 20.0),   # ADA "paper256"
    512: (32768, 64, 8, 0.0025, 0.5, 20.0),   # ADA "paper512"
    1024: (32768, 32, 4, 0.002, 10.0, 10.0),  # ADA "stylegan2"
}


def get_config(arg: str = "256") -> ml_collections.ConfigDict:
  args = [a for a in (arg or "256").split(",") if a]
  resolution = int(args[0]) if args and args[0].isdigit() else 256
  if resolution not in PRESETS:
    raise ValueError(f"resolution must be one of {sorted(PRESETS)}, got "
                     f"{resolution}")
  channel_base, batch, mbstd_group, lr, gamma, ema_kimg = PRESETS[resolution]

  config = config_lib.base_config()
  config.model = config_lib.model_config(
      resolution=resolution, channel_base=channel_base,
      mbstd_group_size=mbstd_group,
      conv_clamp=256.0)                # reference: conv_clamp = 256
  config.num_bf16_res = 4              # reference: num_fp16_res = 4
  config.batch_size = batch
  config.total_kimg = 15000.0          # ~24 h on a TPU v3-8 at 256x256
  config.optim.g_lr = config.optim.d_lr = lr
  config.loss.r1_gamma = gamma
  config.ema.half_life_kimg = ema_kimg

  if "runlocal" in args:
    config.batch_size = 8
    config.model.mbstd_group_size = 4
    config.num_bf16_res = 0
    config.total_kimg = 0.064
    config.checkpoint_every_kimg = 0.032
    config.log_every_kimg = 0.008
    config.image_grid_every_kimg = 0.032
    config.data.shuffle_buffer = 64
  return config
