r"""A tiny GAN-DL that trains in minutes on a 2-core CPU (the demo's model).

Same architecture family as `gandl_rxrx19a.py`, scaled down: 32x32 images,
5 channels, mapping depth 3, 128-d latents, few feature maps.

  gandl-train --config configs/demo.py --workdir /tmp/gandl-demo \
      --config.data.path '/tmp/gandl-demo/shards/rxrx19a/*.tfrecord'
"""
import ml_collections

from gandl_jax import defaults


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = defaults.base_config()
  config.model = defaults.model_config(
      resolution=32, z_dim=128, w_dim=128,
      channel_base=2048,   # 4..16: 128 feature maps, 32: 64
      channel_max=128, mbstd_group_size=4)
  config.compute_dtype = "float32"
  config.batch_size = 16
  config.total_kimg = 2.0
  config.checkpoint_every_kimg = 0.5
  config.keep_checkpoint_every_kimg = 1.0
  config.log_every_kimg = 0.128
  config.image_grid_every_kimg = 0.5
  config.data.shuffle_buffer = 512
  config.loss.r1_gamma = 0.1
  config.ema.half_life_kimg = 0.5
  return config
