r"""The ConvAE baseline on RxRx19a: a convolutional autoencoder with
StyleGAN2-style residual blocks and a 1024-d bottleneck (docs/baselines.md).

Trained by gandl-train like the GAN (same shards, sharding, checkpoints,
resume, monitoring); its bottleneck is exported with gandl-export:

  gandl-train --config configs/convae_rxrx19a.py:256 \
      --workdir gs://BUCKET/gandl/convae-256 \
      --config.data.path 'gs://BUCKET/shards/rxrx19a-256/*.tfrecord'
  gandl-export --workdir gs://BUCKET/gandl/convae-256 \
      --data 'gs://BUCKET/shards/rxrx19a-256/*.tfrecord' \
      --output gs://BUCKET/export/convae.parquet          # 1024 features

The argument after ':' picks the resolution (256 default, 512) or `demo`:
32x32, 64 feature maps, a 128-d bottleneck, 2 kimg; trains on the synthetic
demo shards in minutes on a CPU:

  gandl-synth --output /tmp/synth --size 32
  gandl-convert --dataset rxrx19a --input /tmp/synth/RxRx19a \
      --output /tmp/shards32 --resolution 32
  gandl-train --config configs/convae_rxrx19a.py:demo --workdir /tmp/convae \
      --config.data.path '/tmp/shards32/*.tfrecord'
  gandl-export --workdir /tmp/convae --data /tmp/shards32 \
      --output /tmp/convae.parquet

Add `,runlocal` for a few CPU steps of the full-size model (debugging).
Loss: pixel L2; `--config.loss.perceptual_weight` > 0 with
`--config.loss.perceptual_weights` (imagenet, a Keras weights file, or random
for tests) adds the ImageNet ResNet-50 perceptual term
(gandl_jax/baselines/convae/model.py `perceptual_loss`,
baselines/resnet50.py).
"""
import ml_collections

from gandl_jax.baselines.convae import config as convae_config

# resolution -> (channel_base, batch)
PRESETS = {
    256: (16384, 64),
    512: (32768, 32),
}


def get_config(arg: str = "256") -> ml_collections.ConfigDict:
  args = [a for a in (arg or "256").split(",") if a]
  if args and args[0] == "demo":
    return convae_config.demo_config()
  resolution = int(args[0]) if args and args[0].isdigit() else 256
  if resolution not in PRESETS:
    raise ValueError(f"resolution must be one of {sorted(PRESETS)} or "
                     f"'demo', got {args[0]!r}")
  channel_base, batch = PRESETS[resolution]
  config = convae_config.base_config()
  config.model = convae_config.model_config(
      resolution=resolution, channel_base=channel_base, bottleneck_dim=1024,
      conv_clamp=256.0)
  config.compute_dtype = "bfloat16"    # parameters and optimizer stay float32
  config.batch_size = batch
  config.total_kimg = 2000.0
  if "runlocal" in args:
    config.batch_size = 8
    config.compute_dtype = "float32"
    config.total_kimg = 0.064
    config.checkpoint_every_kimg = 0.032
    config.log_every_kimg = 0.008
    config.image_grid_every_kimg = 0.032
    config.data.shuffle_buffer = 64
  return config
