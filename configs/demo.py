r"""A tiny GAN-DL that trains in minutes on a 2-core CPU (the demo's model).

Same architecture family as `gandl_rxrx19a.py`, scaled down: 32x32 images,
5 channels, mapping depth 3, 128-d latents, few feature maps.

  gandl-train --config configs/demo.py --workdir /tmp/gandl-demo \
      --config.data.path '/tmp/gandl-demo/shards/rxrx19a/*.tfrecord'
"""
import importlib.util
import pathlib

import ml_collections


def _paper_config():
  # Config files are loaded by path (not as a package): load the sibling file.
  path = pathlib.Path(__file__).with_name("gandl_rxrx19a.py")
  spec = importlib.util.spec_from_file_location("gandl_rxrx19a", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = _paper_config().get_config("256")
  config.model.update(dict(
      resolution=32,
      z_dim=128,
      w_dim=128,
      channel_base=2048,   # 4: 128, 8: 128, 16: 128, 32: 64 feature maps
      channel_max=128,
      mbstd_group_size=4,
  ))
  config.compute_dtype = "float32"
  config.batch_size = 16
  config.total_kimg = 2.0
  config.checkpoint_every_kimg = 0.5
  config.log_every_kimg = 0.128
  config.image_grid_every_kimg = 0.5
  config.data.shuffle_buffer = 512
  config.optim.update(dict(g_lr=0.0025, d_lr=0.0025))
  config.loss.r1_gamma = 0.1
  config.ema.half_life_kimg = 0.5
  return config
