"""GAN-DL's StyleGAN2: mapping, synthesis ("skip"), generator, discriminator ("resnet").

Parameter paths joined with '.' are stylegan2-ada-pytorch's state_dict names
(`mapping.fc0.weight`, `synthesis.b8.conv0.affine.bias`, `b64.fromrgb.weight`,
`b4.fc.bias`, ...). Trainable parameters live in the `params` collection;
the non-trainable buffers `mapping.w_avg` and `synthesis.b*.conv*.noise_const`
live in `buffers`. Images are NHWC float in [-1, 1].

Precision follows stylegan2-ada-pytorch's mixed-precision policy
(`num_fp16_res`), with bfloat16 for float16: `num_bf16_res` is the number of
highest resolutions whose blocks compute in bfloat16 (`block_dtype`); every
block below, G's mapping network, the dense layers (styles, demodulation
coefficients) and D's 4x4 epilogue stay float32, as do G's output image
(each toRGB's output is cast back) and all parameters. A block casts its
input activations to its dtype (D's input image too, in its first block);
inside a bfloat16 block the modulation product, the convolution, the noise
and bias adds, the activation and the clamp (`conv_clamp`) run in bfloat16,
as the reference runs them in float16. The reference's float16-only
pre-normalization of modulated convolutions (against float16 overflow) is
not needed: bfloat16 has float32's exponent range.

GAN-DL's changes from StyleGAN2 are only configuration: mapping depth 3,
latent size 512 and 5 image channels (see `configs/gandl_rxrx19a.py`).

One module (~580 lines), as the reference's `training/networks.py` is: both
networks and their blocks read side by side with it.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gandl_jax import config as config_lib
from gandl_jax.model import layers

Array = jax.Array
Dtype = Any
NOISE_MODES = ("random", "const", "none")
check_resolution = config_lib.check_resolution

# Rematerialization (`config.remat`): which activations of each G synthesis
# block and D block the backward pass keeps; the rest it recomputes from the
# block's inputs (`jax.checkpoint`). Values and gradients are unchanged; only
# memory and compute move.
#   none        keep everything (no jax.checkpoint)
#   blocks      keep only each block's inputs; about one more forward pass
#               of the blocks per gradient (compiled for TPU v3 at 512x512
#               it saved under 1%: the peak is inside the top block;
#               docs/training.md, "Compilation")
#   blocks_dots keep the convolution outputs inside each block, recompute the
#               elementwise work (bias, noise, activation, FIR resampling)
REMAT_POLICIES = {
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "blocks_dots": jax.checkpoint_policies.dots_saveable,
}
REMAT_OPTIONS = config_lib.REMAT_OPTIONS
assert REMAT_OPTIONS == ("none",) + tuple(REMAT_POLICIES)


def check_remat(remat: str) -> str:
  """Raises ValueError unless `remat` is one of `REMAT_OPTIONS`."""
  if remat not in REMAT_OPTIONS:
    raise ValueError(f"remat must be one of {list(REMAT_OPTIONS)}, got "
                     f"{remat!r}")
  return remat


def _rematted(block_cls, remat: str, static_argnums=()):
  """`block_cls`, or its `nn.checkpoint` version under `remat`'s policy (same
  parameter names; `static_argnums` counts `self` as 0)."""
  if check_remat(remat) == "none":
    return block_cls
  return nn.checkpoint(block_cls, policy=REMAT_POLICIES[remat],
                       static_argnums=static_argnums)


def num_ws(resolution: int) -> int:
  """Number of w inputs of the synthesis network: 2 * log2(R) - 2."""
  return 2 * check_resolution(resolution) - 2


# `num_bf16_res` value meaning every block (the reference never runs its 4x4
# layers in reduced precision; neither do we).
ALL_BF16 = -1


def check_num_bf16_res(num_bf16_res: Any) -> int:
  """`num_bf16_res` as an int (-1 or 'all': every block from 8x8 up);
  raises ValueError unless it is 'all' or an int >= -1."""
  if isinstance(num_bf16_res, str) and num_bf16_res.strip().lower() == "all":
    return ALL_BF16
  if (isinstance(num_bf16_res, (bool, float)) or
      not isinstance(num_bf16_res, (int, np.integer)) or num_bf16_res < -1):
    raise ValueError(f"num_bf16_res must be an int >= 0 (the number of "
                     f"highest resolutions run in bfloat16), -1 or 'all' "
                     f"(every block), got {num_bf16_res!r}")
  return int(num_bf16_res)


def block_dtype(res: int, resolution: int, num_bf16_res: int) -> Dtype:
  """The compute dtype of G's and D's blocks at resolution `res`: bfloat16
  in the `num_bf16_res` highest resolutions, never below 8x8 (the
  reference's `fp16_resolution = max(2 ** (log2(R) + 1 - n), 8)`); -1: all
  blocks from 8x8 up; 0: none."""
  n = check_num_bf16_res(num_bf16_res)
  log2 = check_resolution(resolution)
  if n == ALL_BF16:
    n = log2
  lowest = max(2 ** (log2 + 1 - n), 8)
  return jnp.bfloat16 if res >= lowest else jnp.float32


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
  """Feature maps at resolution `res`: min(channel_base // res, channel_max)."""
  return min(channel_base // res, channel_max)


def block_resolutions(resolution: int) -> Tuple[int, ...]:
  """4, 8, ..., resolution."""
  return tuple(2**i for i in range(2, check_resolution(resolution) + 1))


def embedding_layers(resolution: int) -> Tuple[str, ...]:
  """The feature names `Discriminator(..., return_features=True)` returns:
  'b{res}' (pooled block outputs), 'conv' (pooled epilogue conv), 'fc' (the
  512-d embedding, GAN-DL's default) and 'logit'."""
  blocks = tuple(f"b{r}" for r in reversed(block_resolutions(resolution))
                 if r > 4)
  return blocks + ("conv", "fc", "logit")


def check_embedding_layer(layer: str, resolution: int) -> None:
  """Raises ValueError unless `layer` is one of `embedding_layers`."""
  valid = embedding_layers(resolution)
  if layer not in valid:
    raise ValueError(f"unknown layer {layer!r}; this model's layers are "
                     f"{list(valid)} ('fc' is GAN-DL's embedding)")


# ----------------------------------------------------------------------------
# Generator.


class MappingNetwork(nn.Module):
  """z -> w: 2nd-moment normalization, `num_layers` lrelu dense layers with
  lr multiplier 0.01, `w_avg` tracking and truncation."""
  z_dim: int
  w_dim: int
  num_ws: int
  num_layers: int
  lr_multiplier: float
  w_avg_beta: float

  @nn.compact
  def __call__(self, z: Array, truncation_psi: Union[float, Array] = 1.0,
               truncation_cutoff: Optional[int] = None,
               update_emas: bool = False) -> Array:
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z must have shape (N, {self.z_dim}), got {z.shape}")
    x = layers.normalize_2nd_moment(z.astype(jnp.float32))
    for i in range(self.num_layers):
      x = layers.Dense(self.w_dim, lr_multiplier=self.lr_multiplier,
                       activation="lrelu", name=f"fc{i}")(x)
    w_avg = self.variable("buffers", "w_avg", jnp.zeros, (self.w_dim,),
                          jnp.float32)
    if update_emas:
      batch_mean = jnp.mean(jax.lax.stop_gradient(x), axis=0)
      w_avg.value = batch_mean + self.w_avg_beta * (w_avg.value - batch_mean)
    x = jnp.broadcast_to(x[:, None, :], (x.shape[0], self.num_ws, self.w_dim))
    if not (isinstance(truncation_psi, (int, float)) and truncation_psi == 1):
      cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
      avg = w_avg.value
      truncated = avg + truncation_psi * (x[:, :cutoff] - avg)
      x = jnp.concatenate([truncated, x[:, cutoff:]], axis=1)
    return x


class SynthesisLayer(nn.Module):
  """Modulated 3x3 conv (+ optional 2x upsampling), noise, bias, lrelu."""
  features: int
  resolution: int
  up: int = 1
  kernel_size: int = 3
  conv_clamp: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, w: Array, noise_mode: str = "random") -> Array:
    c_in, k = x.shape[-1], self.kernel_size
    styles = layers.Dense(c_in, bias_init=1.0, name="affine")(w)
    weight = self.param("weight", layers.normal_init(),
                        (k, k, c_in, self.features))
    noise_strength = self.param("noise_strength", nn.initializers.zeros, ())
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    noise_const = self.variable(
        "buffers", "noise_const",
        lambda: jax.random.normal(self.make_rng("params"),
                                  (self.resolution, self.resolution)))
    x = layers.modulated_conv2d(
        x, weight, styles, demodulate=True, up=self.up, padding=k // 2,
        f=layers.fir_filter() if self.up > 1 else None, dtype=self.dtype)
    if noise_mode == "random":
      noise = jax.random.normal(self.make_rng("noise"),
                                (x.shape[0], self.resolution, self.resolution, 1))
      x = x + (noise * noise_strength).astype(self.dtype)
    elif noise_mode == "const":
      x = x + (noise_const.value * noise_strength)[None, :, :, None].astype(
          self.dtype)
    elif noise_mode != "none":
      raise ValueError(f"noise_mode must be one of {NOISE_MODES}, "
                       f"got {noise_mode!r}")
    x = x + bias.astype(self.dtype)
    gain = layers.ACTIVATION_GAINS["lrelu"]
    clamp = self.conv_clamp
    return layers.activate(x, "lrelu", gain, clamp)


class ToRGB(nn.Module):
  """Modulated 1x1 conv to `img_channels` without demodulation; the
  equalized-lr gain 1/sqrt(fan_in) is applied to the styles."""
  img_channels: int
  conv_clamp: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, w: Array) -> Array:
    c_in = x.shape[-1]
    styles = layers.Dense(c_in, bias_init=1.0, name="affine")(w)
    styles = styles * (1.0 / np.sqrt(c_in))
    weight = self.param("weight", layers.normal_init(),
                        (1, 1, c_in, self.img_channels))
    bias = self.param("bias", nn.initializers.zeros, (self.img_channels,))
    x = layers.modulated_conv2d(x, weight, styles, demodulate=False,
                                dtype=self.dtype)
    x = x + bias.astype(self.dtype)
    return layers.activate(x, "linear", 1.0, self.conv_clamp)


class SynthesisBlock(nn.Module):
  """One resolution of the "skip" generator: (const | conv0 up) + conv1 + toRGB."""
  in_channels: int          # 0 for the first (4x4) block
  out_channels: int
  resolution: int
  img_channels: int
  conv_clamp: Optional[float] = None
  dtype: Dtype = jnp.float32

  @property
  def num_conv(self) -> int:
    return 1 if self.in_channels == 0 else 2

  @nn.compact
  def __call__(self, x: Optional[Array], img: Optional[Array], ws: Array,
               noise_mode: str = "random") -> Tuple[Array, Array]:
    kw = dict(resolution=self.resolution, conv_clamp=self.conv_clamp,
              dtype=self.dtype)
    if self.in_channels == 0:
      const = self.param("const", layers.normal_init(),
                         (self.resolution, self.resolution, self.out_channels))
      x = jnp.broadcast_to(const.astype(self.dtype)[None],
                           (ws.shape[0],) + const.shape)
      x = SynthesisLayer(self.out_channels, name="conv1", **kw)(
          x, ws[:, 0], noise_mode)
    else:
      x = x.astype(self.dtype)
      x = SynthesisLayer(self.out_channels, up=2, name="conv0", **kw)(
          x, ws[:, 0], noise_mode)
      x = SynthesisLayer(self.out_channels, name="conv1", **kw)(
          x, ws[:, 1], noise_mode)
    if img is not None:
      img = layers.upsample2d(img, layers.fir_filter())
    y = ToRGB(self.img_channels, conv_clamp=self.conv_clamp, dtype=self.dtype,
              name="torgb")(x, ws[:, self.num_conv])
    y = y.astype(jnp.float32)
    img = y if img is None else img + y
    return x, img


class SynthesisNetwork(nn.Module):
  """ws (N, num_ws, w_dim) -> images (N, R, R, img_channels), float32."""
  w_dim: int
  resolution: int
  img_channels: int
  channel_base: int
  channel_max: int
  conv_clamp: Optional[float] = None
  num_bf16_res: int = 0
  remat: str = "none"

  @property
  def num_ws(self) -> int:
    return num_ws(self.resolution)

  @nn.compact
  def __call__(self, ws: Array, noise_mode: str = "random") -> Array:
    expected = (self.num_ws, self.w_dim)
    if ws.ndim != 3 or tuple(ws.shape[1:]) != expected:
      raise ValueError(f"ws must have shape (N, {expected[0]}, {expected[1]}), "
                       f"got {ws.shape}")
    ch = lambda r: channels_at(r, self.channel_base, self.channel_max)
    x = img = None
    w_idx = 0
    # __call__(self, x, img, ws, noise_mode): noise_mode is a string.
    block_cls = _rematted(SynthesisBlock, self.remat, static_argnums=(4,))
    for res in block_resolutions(self.resolution):
      block = block_cls(
          in_channels=ch(res // 2) if res > 4 else 0, out_channels=ch(res),
          resolution=res, img_channels=self.img_channels,
          conv_clamp=self.conv_clamp,
          dtype=block_dtype(res, self.resolution, self.num_bf16_res),
          name=f"b{res}")
      # A block's toRGB shares its w with the next block's first conv.
      x, img = block(x, img, ws[:, w_idx:w_idx + block.num_conv + 1],
                     noise_mode)
      w_idx += block.num_conv
    return img


class Generator(nn.Module):
  """z -> images. Call with `noise_mode` in ('random', 'const', 'none'); the
  'random' mode needs an rng stream named 'noise'."""
  # Defaults live in gandl_jax/config.py (`model_config`); use `build`.
  z_dim: int
  w_dim: int
  resolution: int
  img_channels: int
  mapping_layers: int
  mapping_lr_multiplier: float
  w_avg_beta: float
  channel_base: int
  channel_max: int
  conv_clamp: Optional[float] = None
  num_bf16_res: int = 0
  remat: str = "none"

  def setup(self):
    self.mapping = MappingNetwork(
        z_dim=self.z_dim, w_dim=self.w_dim, num_ws=num_ws(self.resolution),
        num_layers=self.mapping_layers, lr_multiplier=self.mapping_lr_multiplier,
        w_avg_beta=self.w_avg_beta)
    self.synthesis = SynthesisNetwork(
        w_dim=self.w_dim, resolution=self.resolution,
        img_channels=self.img_channels, channel_base=self.channel_base,
        channel_max=self.channel_max, conv_clamp=self.conv_clamp,
        num_bf16_res=self.num_bf16_res, remat=self.remat)

  @property
  def num_ws(self) -> int:
    return num_ws(self.resolution)

  def map(self, z: Array, truncation_psi: Union[float, Array] = 1.0,
          truncation_cutoff: Optional[int] = None,
          update_emas: bool = False) -> Array:
    return self.mapping(z, truncation_psi, truncation_cutoff, update_emas)

  def synthesize(self, ws: Array, noise_mode: str = "random") -> Array:
    return self.synthesis(ws, noise_mode)

  def __call__(self, z: Array, truncation_psi: Union[float, Array] = 1.0,
               truncation_cutoff: Optional[int] = None,
               noise_mode: str = "random", update_emas: bool = False) -> Array:
    ws = self.mapping(z, truncation_psi, truncation_cutoff, update_emas)
    return self.synthesis(ws, noise_mode)


# ----------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(nn.Module):
  """One resolution of the "resnet" discriminator (fromRGB only at the top):
  conv0, conv1 with 2x downsampling, plus a 1x1 downsampling skip; both
  branches scaled by sqrt(0.5)."""
  in_channels: int          # 0 for the first (top-resolution) block
  tmp_channels: int
  out_channels: int
  conv_clamp: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Optional[Array], img: Array) -> Array:
    kw = dict(conv_clamp=self.conv_clamp, dtype=self.dtype)
    # The block's dtype for its input activations and, in the first block,
    # the image (so D's input dtype is its first block's).
    x = None if x is None else x.astype(self.dtype)
    if self.in_channels == 0:
      y = layers.Conv2d(self.tmp_channels, 1, activation="lrelu",
                        name="fromrgb", **kw)(img.astype(self.dtype))
      x = y if x is None else x + y
    gain = math.sqrt(0.5)
    # As in the reference, the skip path is never clamped.
    y = layers.Conv2d(self.out_channels, 1, use_bias=False, down=2,
                      dtype=self.dtype, name="skip")(x, gain=gain)
    x = layers.Conv2d(self.tmp_channels, 3, activation="lrelu", name="conv0",
                      **kw)(x)
    x = layers.Conv2d(self.out_channels, 3, activation="lrelu", down=2,
                      name="conv1", **kw)(x, gain=gain)
    return y + x


class DiscriminatorEpilogue(nn.Module):
  """4x4: minibatch stddev, 3x3 conv, dense to `channels` (the embedding), logit.

  Runs in float32. The 4x4 features are flattened in (C, H, W) order, as in
  the reference implementation, so `fc.weight` imports by a plain transpose.
  """
  channels: int
  mbstd_group_size: int
  mbstd_num_channels: int
  conv_clamp: Optional[float] = None

  @nn.compact
  def __call__(self, x: Array, mbstd_shards: int = 1
               ) -> Tuple[Array, Dict[str, Array]]:
    x = x.astype(jnp.float32)
    if self.mbstd_num_channels > 0:
      x = layers.minibatch_stddev(x, self.mbstd_group_size,
                                  self.mbstd_num_channels, mbstd_shards)
    x = layers.Conv2d(self.channels, 3, activation="lrelu",
                      conv_clamp=self.conv_clamp, name="conv")(x)
    conv_pooled = jnp.mean(x, axis=(1, 2))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    fc = layers.Dense(self.channels, activation="lrelu", name="fc")(x)
    logit = layers.Dense(1, name="out")(fc)
    return logit, {"conv": conv_pooled, "fc": fc, "logit": logit}


class Discriminator(nn.Module):
  """images (N, R, R, img_channels) in [-1, 1] -> logits (N, 1).

  With `return_features=True` also returns a dict of named float32 features
  (see `embedding_layers`): 'fc' is GAN-DL's default embedding.
  `mbstd_shards` splits the batch into that many contiguous slices for the
  minibatch-stddev groups (data-parallel training passes the device count).
  """
  # Defaults live in gandl_jax/config.py (`model_config`); use `build`.
  resolution: int
  img_channels: int
  channel_base: int
  channel_max: int
  mbstd_group_size: int
  mbstd_num_channels: int
  conv_clamp: Optional[float] = None
  num_bf16_res: int = 0
  remat: str = "none"

  @nn.compact
  def __call__(self, img: Array, return_features: bool = False,
               mbstd_shards: int = 1):
    expected = (self.resolution, self.resolution, self.img_channels)
    if img.ndim != 4 or tuple(img.shape[1:]) != expected:
      raise ValueError(f"discriminator input must have shape (N, "
                       f"{', '.join(map(str, expected))}) (NHWC), got {img.shape}")
    ch = lambda r: channels_at(r, self.channel_base, self.channel_max)
    features = {}
    x = None
    block_cls = _rematted(DiscriminatorBlock, self.remat)
    for res in reversed(block_resolutions(self.resolution)[1:]):
      x = block_cls(
          in_channels=ch(res) if res < self.resolution else 0,
          tmp_channels=ch(res), out_channels=ch(res // 2),
          conv_clamp=self.conv_clamp,
          dtype=block_dtype(res, self.resolution, self.num_bf16_res),
          name=f"b{res}")(x, img)
      features[f"b{res}"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logit, epilogue = DiscriminatorEpilogue(
        ch(4), self.mbstd_group_size, self.mbstd_num_channels,
        conv_clamp=self.conv_clamp, name="b4")(x, mbstd_shards)
    if return_features:
      features.update(epilogue)
      return logit, features
    return logit


# ----------------------------------------------------------------------------
# Construction from a config.

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Dtype:
  """'float32' | 'bfloat16' -> jnp dtype, with a clear error otherwise
  (a whole network's compute dtype, e.g. the ConvAE baseline's)."""
  if name not in _DTYPES:
    raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, "
                     f"got {name!r}")
  return _DTYPES[name]


# The inference tools' `--compute_dtype` names, as a precision for `build`.
PRECISION_NAMES = {"float32": 0, "bfloat16": ALL_BF16}


def num_bf16_res_of(precision: Any) -> int:
  """`build`'s precision as a `num_bf16_res`: an int (or 'all'), 'float32'
  / jnp.float32 (0) or 'bfloat16' / jnp.bfloat16 (every block); a clear
  error otherwise."""
  if isinstance(precision, str) and precision in PRECISION_NAMES:
    return PRECISION_NAMES[precision]
  if not isinstance(precision, (str, int, np.integer)):
    try:
      name = jnp.dtype(precision).name
    except TypeError:
      name = None
    if name in PRECISION_NAMES:
      return PRECISION_NAMES[name]
    raise ValueError(f"precision must be a num_bf16_res (int >= -1 or "
                     f"'all') or one of {sorted(PRECISION_NAMES)}, got "
                     f"{precision!r}")
  try:
    return check_num_bf16_res(precision)
  except ValueError as e:
    raise ValueError(f"{e}; or one of {sorted(PRECISION_NAMES)}") from None


def build(model_config: Any, precision: Any = 0,
          remat: str = "none") -> Tuple[Generator, Discriminator]:
  """(G, D) for a model config (`configs/gandl_rxrx19a.py: model_config()`).

  `model_config` may be an ml_collections ConfigDict or a plain dict (e.g.
  from a checkpoint's metadata); keys it lacks take `config.model_config()`'s
  defaults. `precision` is training's `config.num_bf16_res` (the number of
  highest resolutions run in bfloat16; 0: float32 throughout; -1 or 'all':
  every block from 8x8 up) or the inference tools' `--compute_dtype` name
  ('float32': 0, 'bfloat16': every block). `remat` (`REMAT_OPTIONS`,
  training's `config.remat`) trades compute for memory in gradients; it
  changes no parameter or value.
  """
  check_remat(remat)
  num_bf16_res = num_bf16_res_of(precision)
  cfg = config_lib.full_model_config(model_config)
  check_resolution(cfg["resolution"])
  clamp = cfg["conv_clamp"]
  G = Generator(
      z_dim=cfg["z_dim"], w_dim=cfg["w_dim"], resolution=cfg["resolution"],
      img_channels=cfg["img_channels"], mapping_layers=cfg["mapping_layers"],
      mapping_lr_multiplier=cfg["mapping_lr_multiplier"],
      w_avg_beta=cfg["w_avg_beta"],
      channel_base=cfg["channel_base"], channel_max=cfg["channel_max"],
      conv_clamp=clamp, num_bf16_res=num_bf16_res, remat=remat)
  D = Discriminator(
      resolution=cfg["resolution"], img_channels=cfg["img_channels"],
      channel_base=cfg["channel_base"], channel_max=cfg["channel_max"],
      mbstd_group_size=cfg["mbstd_group_size"],
      mbstd_num_channels=cfg["mbstd_num_channels"],
      conv_clamp=clamp, num_bf16_res=num_bf16_res, remat=remat)
  return G, D


# XLA:CPU options for `init`: its programs (a few hundred small
# random-number kernels, run once) compile in about half the CPU time at
# LLVM -O1 instead of XLA's default -O3, to bitwise the same values
# (tests/model/test_networks.py).
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init(rng: Array, G: Generator, D: Discriminator, batch: int = 1,
         compiler_options: Optional[Dict[str, Any]] = None
         ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Initial variables: G -> {'params', 'buffers'}, D -> {'params'}.

  `compiler_options`: XLA's for the two jitted inits (None:
  `CPU_INIT_COMPILER_OPTIONS` on the CPU backend, else none; none inside a
  trace, e.g. `jax.eval_shape`, where JAX takes them only at the top)."""
  if isinstance(rng, jax.core.Tracer):
    compiler_options = {}
  elif compiler_options is None:
    compiler_options = (CPU_INIT_COMPILER_OPTIONS
                        if jax.default_backend() == "cpu" else {})
  g_key, d_key = jax.random.split(rng)
  z = jnp.zeros((batch, G.z_dim), jnp.float32)
  img = jnp.zeros((batch, D.resolution, D.resolution, D.img_channels))
  # Jitted: one compilation instead of thousands of eager dispatches.
  jit = lambda f: jax.jit(f, compiler_options=compiler_options or None)
  g_vars = jit(lambda k: G.init({"params": k}, z, noise_mode="const"))(g_key)
  d_vars = jit(lambda k: D.init({"params": k}, img))(d_key)
  return dict(g_vars), dict(d_vars)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree (e.g. `variables['params']`)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
