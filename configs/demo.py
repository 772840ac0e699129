r"""A tiny GAN-DL that trains in minutes on a 2-core CPU (the demo's model).

Same architecture family as `gandl_rxrx19a.py`, scaled down: 32x32 images,
5 channels, mapping depth 3, 64-d latents, 64 feature maps. `gandl-demo`
uses exactly this config (defined in `gandl_jax/cli/demo.py`).

  gandl-train --config configs/demo.py --workdir /tmp/gandl-demo/train \
      --config.data.path '/tmp/gandl-demo/shards/rxrx19a/*.tfrecord'
"""
import ml_collections

from gandl_jax.cli import demo


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return demo.demo_config()
