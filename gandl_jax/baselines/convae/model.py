"""The convolutional autoencoder (ConvAE) baseline of the GAN-DL paper.

StyleGAN2-style residual encoder and decoder around a linear bottleneck, the
embedding (`bottleneck_dim`, 1024 in the paper's setting), NHWC images in
[-1, 1] as everywhere in `gandl_jax.model`:

  encoder  fromRGB (1x1, lrelu) at R; one `networks.DiscriminatorBlock` per
           resolution R, R/2, ..., 8 (the discriminator's "resnet" blocks:
           3x3 conv, 3x3 conv with FIR 2x downsampling, a 1x1 downsampling
           skip, both branches times sqrt(0.5)); at 4x4 a 3x3 conv (lrelu),
           flattened, then a linear dense layer to `bottleneck_dim`
  decoder  dense bottleneck -> 4x4xC (lrelu), a 3x3 conv at 4x4, one
           `DecoderBlock` per resolution 8, ..., R (the same residual block
           mirrored: 3x3 conv with FIR 2x upsampling as in G's synthesis
           layers, 3x3 conv, a 1x1 upsampling skip, both times sqrt(0.5)),
           then toRGB: a linear 1x1 conv to the image channels

Feature maps per resolution are the GAN's (`networks.channels_at`: min(
channel_base / res, channel_max)). Every layer is `model.layers`' equalized-lr
`Conv2d` / `Dense`. There is no minibatch standard deviation, so a site's
embedding depends on that site alone (unlike D's). The loss (pixel L2 plus an
optional perceptual term, `perceptual_loss`) is trained by
`gandl_jax.baselines.convae.train`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from gandl_jax.baselines import resnet50
from gandl_jax.baselines.convae import config as convae_config
from gandl_jax.model import layers, networks

Array = jax.Array
Dtype = Any

class DecoderBlock(nn.Module):
  """One resolution of the decoder: x at res/2 -> res (the discriminator
  block mirrored; see the module docstring)."""
  out_channels: int
  conv_clamp: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(conv_clamp=self.conv_clamp, dtype=self.dtype)
    gain = math.sqrt(0.5)
    y = layers.Conv2d(self.out_channels, 1, use_bias=False, up=2,
                      dtype=self.dtype, name="skip")(x, gain=gain)
    x = layers.Conv2d(self.out_channels, 3, activation="lrelu", up=2,
                      name="conv0", **kw)(x)
    x = layers.Conv2d(self.out_channels, 3, activation="lrelu", name="conv1",
                      **kw)(x, gain=gain)
    return y + x


class _Shape(nn.Module):
  """The fields that fix an encoder's or decoder's shapes."""
  resolution: int
  img_channels: int
  channel_base: int
  channel_max: int
  bottleneck_dim: int
  conv_clamp: Optional[float] = None
  dtype: Dtype = jnp.float32


class Encoder(_Shape):
  """images (N, R, R, C) in [-1, 1] -> bottleneck (N, bottleneck_dim) f32."""

  @nn.compact
  def __call__(self, img: Array) -> Array:
    expected = (self.resolution, self.resolution, self.img_channels)
    if img.ndim != 4 or tuple(img.shape[1:]) != expected:
      raise ValueError(f"ConvAE input must have shape (N, "
                       f"{', '.join(map(str, expected))}) (NHWC), got "
                       f"{img.shape}")
    ch = lambda r: networks.channels_at(r, self.channel_base, self.channel_max)  # noqa: E731
    img = img.astype(self.dtype)
    x = None
    for res in reversed(networks.block_resolutions(self.resolution)[1:]):
      x = networks.DiscriminatorBlock(
          in_channels=ch(res) if res < self.resolution else 0,
          tmp_channels=ch(res), out_channels=ch(res // 2),
          conv_clamp=self.conv_clamp, dtype=self.dtype, name=f"b{res}")(x, img)
    x = layers.Conv2d(ch(4), 3, activation="lrelu", conv_clamp=self.conv_clamp,
                      name="b4_conv")(x.astype(jnp.float32))
    x = x.reshape(x.shape[0], -1)
    return layers.Dense(self.bottleneck_dim, name="b4_fc")(x)


class Decoder(_Shape):
  """bottleneck (N, bottleneck_dim) -> images (N, R, R, C) float32."""

  @nn.compact
  def __call__(self, z: Array) -> Array:
    ch = lambda r: networks.channels_at(r, self.channel_base, self.channel_max)  # noqa: E731
    x = layers.Dense(ch(4) * 16, activation="lrelu", name="b4_fc")(z)
    x = x.reshape(x.shape[0], 4, 4, ch(4))
    x = layers.Conv2d(ch(4), 3, activation="lrelu", conv_clamp=self.conv_clamp,
                      dtype=self.dtype, name="b4_conv")(x)
    for res in networks.block_resolutions(self.resolution)[1:]:
      x = DecoderBlock(ch(res), conv_clamp=self.conv_clamp, dtype=self.dtype,
                       name=f"b{res}")(x)
    x = layers.Conv2d(self.img_channels, 1, conv_clamp=self.conv_clamp,
                      dtype=self.dtype, name="torgb")(x)
    return x.astype(jnp.float32)


class ConvAE(_Shape):
  """images -> (reconstructions, bottleneck); `encode` / `decode` alone via
  `apply(..., method=...)`."""

  def setup(self):
    kw = dict(resolution=self.resolution, img_channels=self.img_channels,
              channel_base=self.channel_base, channel_max=self.channel_max,
              bottleneck_dim=self.bottleneck_dim, conv_clamp=self.conv_clamp,
              dtype=self.dtype)
    self.encoder = Encoder(**kw)
    self.decoder = Decoder(**kw)

  def encode(self, img: Array) -> Array:
    return self.encoder(img)

  def decode(self, z: Array) -> Array:
    return self.decoder(z)

  def __call__(self, img: Array) -> Tuple[Array, Array]:
    z = self.encoder(img)
    return self.decoder(z), z


def build(model_config: Any, dtype: Union[str, Dtype] = jnp.float32) -> ConvAE:
  """The ConvAE of a model config (`convae.config.model_config()` keys; a
  ConfigDict or a checkpoint's plain dict, missing keys take defaults)."""
  cfg = convae_config.full_model_config(model_config)
  if isinstance(dtype, str):
    dtype = networks.compute_dtype(dtype)
  networks.check_resolution(cfg["resolution"])
  return ConvAE(resolution=int(cfg["resolution"]),
                img_channels=int(cfg["img_channels"]),
                channel_base=int(cfg["channel_base"]),
                channel_max=int(cfg["channel_max"]),
                bottleneck_dim=int(cfg["bottleneck_dim"]),
                conv_clamp=cfg["conv_clamp"], dtype=dtype)


def init(rng: Array, ae: ConvAE, batch: int = 1) -> Dict[str, Any]:
  """Initial variables {'params': {'encoder': ..., 'decoder': ...}}."""
  img = jnp.zeros((batch, ae.resolution, ae.resolution, ae.img_channels))
  return dict(jax.jit(lambda k: ae.init({"params": k}, img))(rng))


# ----------------------------------------------------------------------------
# Loss.


def pixel_l2(x: Array, y: Array) -> Array:
  """Mean squared error over every pixel and channel (float32)."""
  return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def psnr_db(mse: Array, peak_to_peak: float = 2.0) -> Array:
  """PSNR of a mean squared error on pixels spanning `peak_to_peak` ([-1, 1]:
  2): 10 log10(peak^2 / mse)."""
  return 10.0 * jnp.log10(peak_to_peak ** 2 / jnp.maximum(mse, 1e-12))


# `perceptual(params, x, y) -> scalar`: x the reconstructions, y the real
# images, both float (N, R, R, C) in [-1, 1]; `params` its frozen network's
# weights (passed to the jitted step as a replicated argument, never trained).
PerceptualFn = Callable[[Any, Array, Array], Array]
PERCEPTUAL_OFF = ("", "none")


class Perceptual(NamedTuple):
  """The perceptual term: its function, the frozen network's parameters
  and what they are (`record`: the weights as `gandl.weights` records them,
  `imagenet` / the file / `random`, a human label, the network, layers and
  input handling; kept in metrics.jsonl and checkpoint meta)."""
  fn: PerceptualFn
  params: Any
  record: Dict[str, Any]


def perceptual_off_record(weight: float, weights: str) -> Dict[str, Any]:
  """The record of a run without the perceptual term."""
  return {"weights": "off", "label": (
      f"off (loss.perceptual_weight={weight:g}, loss.perceptual_weights="
      f"{weights!r}): pixel L2 only")}


def perceptual_loss(weights: str, img_channels: int, *, resolution: int,
                    seed: int = 0, compute_dtype: str = "float32"
                    ) -> Optional[Perceptual]:
  """The optional perceptual term of the loss, or None for `weights` 'none'
  (config.loss.perceptual_weights).

  THE hook for the perceptual network: the one place that maps
  `config.loss.perceptual_weights` to a loss function and its frozen
  parameters; the trainer adds `config.loss.perceptual_weight *
  perceptual(params, recon, real)` to the pixel L2. The network is the
  ImageNet ResNet-50 of `gandl_jax.baselines.resnet50` (feature reconstruction
  loss on the conv2..conv4 stage outputs, each channel as a grey image):
  `imagenet` (Keras downloads the weights once), a Keras weights file, or
  `random` (seeded by `seed`; a distance between random features, not a
  perceptual loss; for tests). The weights are loaded here, once, before
  anything is compiled or written; a missing or wrong file is one line
  naming it. `compute_dtype`: the network's (bfloat16 on TPUs).
  """
  spec = str(weights).strip()
  if spec.lower() in PERCEPTUAL_OFF:
    return None
  if resolution < resnet50.MIN_SIZE:
    raise ValueError(
        f"config.loss.perceptual_weights={weights!r}: the ResNet-50 "
        f"perceptual loss needs images of at least {resnet50.MIN_SIZE}x"
        f"{resnet50.MIN_SIZE}, config.model.resolution is {resolution}")
  backbone = resnet50.load(spec, seed)
  dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
  fn = functools.partial(resnet50.perceptual_loss,
                         layers=resnet50.PERCEPTUAL_LAYERS, dtype=dtype)
  record = {
      "weights": backbone.weights, "label": backbone.label,
      "network": "ResNet-50 (keras.applications.ResNet50, JAX port)",
      "layers": list(resnet50.PERCEPTUAL_LAYERS),
      "input": (f"each of the {img_channels} channels as a grey image: "
                f"(x + 1) * 127.5 replicated to 3 planes, minus the ImageNet "
                f"BGR mean {list(resnet50.CAFFE_MEAN_BGR)} (keras resnet50."
                f"preprocess_input, caffe mode), at {resolution}x{resolution}"),
  }
  if backbone.is_random:
    record["seed"] = backbone.seed
  return Perceptual(fn, backbone.params, record)
