"""StyleGAN2 building blocks, NHWC, as pure functions plus thin Flax modules.

The math follows stylegan2-ada-pytorch (`torch_utils/ops/*`, `training/networks.py`)
so that weights import one-to-one (see `gandl_jax/interop/stylegan2_ada.py`):

* Equalized learning rate: parameters are stored as drawn at init (N(0, 1),
  divided by the lr multiplier for dense layers) and scaled at run time by
  `lr_multiplier / sqrt(fan_in)`. Gains are applied in the forward pass only.
* Resampling uses the normalized [1, 3, 3, 1] FIR filter (`upfirdn2d`).
* Modulated convolution uses the "scale activations, plain conv, scale outputs"
  formulation, which is mathematically identical to the grouped-conv one and
  is the fast path on TPU/GPU.

Layouts: dense weights are (in, out); conv weights HWIO (kh, kw, in, out).
Parameters are float32; `dtype` sets the compute dtype of convolutions
(float32 or bfloat16). Dense layers, style/demodulation coefficients and
per-sample statistics always run in float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any

LRELU_SLOPE = 0.2
# Default gain of each activation: keeps the signal's second moment unchanged.
ACTIVATION_GAINS = {"linear": 1.0, "lrelu": math.sqrt(2.0)}
FIR_TAPS: Tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)
DEMOD_EPS = 1e-8
MBSTD_EPS = 1e-8
_DN = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------
# Pure functions.


def fir_filter(taps: Sequence[float] = FIR_TAPS) -> np.ndarray:
  """The 2-D low-pass filter: outer product of `taps`, normalized to sum 1."""
  k = np.asarray(taps, dtype=np.float32)
  f = np.outer(k, k)
  return f / f.sum()


def activate(x: Array, activation: str, gain: float = 1.0,
             clamp: Optional[float] = None) -> Array:
  """`act(x) * gain`, then optional clamping to [-clamp, clamp] (ADA bias_act)."""
  if activation == "lrelu":
    x = jnp.where(x >= 0, x, x * LRELU_SLOPE)
  elif activation != "linear":
    raise ValueError(f"unknown activation {activation!r}; "
                     f"expected one of {sorted(ACTIVATION_GAINS)}")
  if gain != 1.0:
    x = x * jnp.asarray(gain, x.dtype)
  if clamp is not None:
    x = jnp.clip(x, -clamp, clamp)
  return x


def upfirdn2d(x: Array, f: np.ndarray, up: int = 1, down: int = 1,
              pad: Tuple[int, int] = (0, 0), gain: float = 1.0,
              flip_filter: bool = False) -> Array:
  """Upsample (zero insertion), pad, FIR-filter and downsample an NHWC batch.

  Same semantics as stylegan2-ada-pytorch's `upfirdn2d` with equal padding on
  both spatial axes: `pad = (before, after)` may be negative (cropping); the
  filter is applied as a true convolution unless `flip_filter`; `gain` scales
  the filter. Output size per axis: `(in * up + before + after - taps) // down + 1`.
  """
  _, _, _, c = x.shape
  f = np.asarray(f, np.float32) * gain
  if not flip_filter:
    f = f[::-1, ::-1]
  p0, p1 = pad
  zero = jnp.zeros((), x.dtype)
  spatial = (p0, p1 + up - 1, up - 1)
  x = lax.pad(x, zero, [(0, 0, 0), spatial, spatial, (0, 0, 0)])
  kernel = jnp.asarray(np.tile(f[:, :, None, None], (1, 1, 1, c)), x.dtype)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(down, down), padding="VALID",
      dimension_numbers=_DN, feature_group_count=c)


def upsample2d(x: Array, f: np.ndarray, up: int = 2) -> Array:
  """2x FIR upsampling (ADA `upsample2d`): zero insertion, filter with gain up^2."""
  fw = f.shape[0]
  return upfirdn2d(x, f, up=up, pad=((fw + up - 1) // 2, (fw - up) // 2),
                   gain=up * up)


def downsample2d(x: Array, f: np.ndarray, down: int = 2) -> Array:
  """2x FIR downsampling (ADA `downsample2d`)."""
  fw = f.shape[0]
  return upfirdn2d(x, f, down=down,
                   pad=((fw - down + 1) // 2, (fw - down) // 2))


def conv2d_resample(x: Array, w: Array, f: Optional[np.ndarray] = None,
                    up: int = 1, down: int = 1, padding: int = 0) -> Array:
  """2-D convolution (cross-correlation) with optional 2x FIR up/downsampling.

  `w` is HWIO. Mirrors ADA's `conv2d_resample` for the cases StyleGAN2 uses:
  plain conv; 3x3 conv with upsampling (transposed conv, then FIR filter);
  3x3 conv with downsampling (FIR filter, then strided conv); 1x1 conv with
  downsampling (FIR downsample, then 1x1 conv).
  """
  kh, kw = w.shape[0], w.shape[1]
  if kh != kw:
    raise ValueError(f"square kernels only, got {kh}x{kw}")
  if up > 1 and down > 1:
    raise ValueError("up- and downsampling at once is not supported")
  if (up > 1 or down > 1) and f is None:
    raise ValueError("resampling needs a FIR filter `f`")
  conv = lambda y, k, stride=1, pad=0: lax.conv_general_dilated(
      y, k, window_strides=(stride, stride), padding=[(pad, pad)] * 2,
      dimension_numbers=_DN)
  if up == 1 and down == 1:
    return conv(x, w, pad=padding)
  fw = f.shape[0]
  if down > 1:
    p0 = padding + (fw - down + 1) // 2
    p1 = padding + (fw - down) // 2
    if kw == 1:
      return conv(upfirdn2d(x, f, down=down, pad=(p0, p1)), w)
    return conv(upfirdn2d(x, f, pad=(p0, p1)), w, stride=down)
  # Upsampling: transposed strided conv (a true convolution of the
  # zero-stuffed input, i.e. correlation with the flipped kernel), then filter.
  p0 = padding + (fw + up - 1) // 2 - (kw - 1)
  p1 = padding + (fw - up) // 2 - (kw - up)
  y = lax.conv_general_dilated(
      x, w[::-1, ::-1], window_strides=(1, 1), padding=[(kw - 1, kw - 1)] * 2,
      lhs_dilation=(up, up), dimension_numbers=_DN)
  return upfirdn2d(y, f, pad=(p0, p1), gain=up * up)


def demodulation_coefficients(weight: Array, styles: Array) -> Array:
  """`1 / sqrt(sum_{i,kh,kw} (weight * style_i)^2 + 1e-8)` per sample and output.

  weight: HWIO; styles: (N, in). Returns (N, out) in float32.
  """
  w2 = jnp.sum(jnp.square(weight.astype(jnp.float32)), axis=(0, 1))  # (in, out)
  return lax.rsqrt(jnp.square(styles.astype(jnp.float32)) @ w2 + DEMOD_EPS)


def modulated_conv2d(x: Array, weight: Array, styles: Array,
                     demodulate: bool = True, up: int = 1, padding: int = 0,
                     f: Optional[np.ndarray] = None,
                     dtype: Dtype = jnp.float32) -> Array:
  """StyleGAN2's modulated convolution (weight demodulation), NHWC.

  Equivalent to convolving each sample with its own weights
  `weight[..., i, o] * styles[n, i]`, divided per output channel by
  `sqrt(sum(w'^2) + 1e-8)` when `demodulate`.
  """
  n = x.shape[0]
  x = x.astype(dtype) * styles.astype(dtype).reshape(n, 1, 1, -1)
  x = conv2d_resample(x, weight.astype(dtype), f=f, up=up, padding=padding)
  if demodulate:
    d = demodulation_coefficients(weight, styles)
    x = x * d.astype(dtype).reshape(n, 1, 1, -1)
  return x


def normalize_2nd_moment(x: Array, axis: int = 1, eps: float = 1e-8) -> Array:
  """`x / sqrt(mean(x^2) + eps)` along `axis` (the mapping network's input)."""
  return x * lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


def minibatch_stddev(x: Array, group_size: int, num_channels: int = 1,
                     num_shards: int = 1) -> Array:
  """Appends the minibatch standard deviation feature(s), NHWC.

  The batch is first split into `num_shards` contiguous slices (one per device
  in data-parallel training, so groups never cross devices); inside a slice of
  `m` samples, groups of `G = min(group_size, m)` are strided as in
  stylegan2-ada-pytorch (sample `g * m/G + j` belongs to group `j`). For each
  group and each of `num_channels` channel groups: the standard deviation over
  the group, averaged over channels and pixels, broadcast as a new channel.
  """
  n, h, w, c = x.shape
  if n % num_shards:
    raise ValueError(f"batch {n} is not divisible into {num_shards} shards")
  m = n // num_shards
  g = min(group_size, m) if group_size else m
  if m % g:
    raise ValueError(
        f"minibatch-stddev: per-shard batch {m} is not divisible by the group "
        f"size {g}; use a batch per device that is a multiple of {g}")
  if c % num_channels:
    raise ValueError(f"{c} channels are not divisible into {num_channels} "
                     "minibatch-stddev channel groups")
  f = num_channels
  y = x.astype(jnp.float32).reshape(num_shards, g, m // g, h, w, f, c // f)
  y = y - jnp.mean(y, axis=1, keepdims=True)
  y = jnp.sqrt(jnp.mean(jnp.square(y), axis=1) + MBSTD_EPS)  # (S, m/G, h, w, f, c/f)
  y = jnp.mean(y, axis=(2, 3, 5))                            # (S, m/G, f)
  y = jnp.broadcast_to(y[:, None, :, None, None, :],
                       (num_shards, g, m // g, h, w, f)).reshape(n, h, w, f)
  return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


# ----------------------------------------------------------------------------
# Flax modules with equalized learning rate.


def normal_init(scale: float = 1.0):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * scale
  return init


def _constant_init(value: float):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)
  return init


class Dense(nn.Module):
  """Fully connected layer with equalized lr (ADA `FullyConnectedLayer`).

  `weight` is stored ~ N(0, 1) / lr_multiplier and used times
  `lr_multiplier / sqrt(fan_in)`; `bias` is stored as `bias_init` and used
  times `lr_multiplier`. Always computes in float32.
  """
  features: int
  use_bias: bool = True
  lr_multiplier: float = 1.0
  bias_init: float = 0.0
  activation: str = "linear"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    weight = self.param("weight", normal_init(1.0 / self.lr_multiplier),
                        (fan_in, self.features))
    y = x.astype(jnp.float32) @ (weight * (self.lr_multiplier / np.sqrt(fan_in)))
    if self.use_bias:
      bias = self.param("bias", _constant_init(self.bias_init), (self.features,))
      y = y + bias * self.lr_multiplier
    return activate(y, self.activation, ACTIVATION_GAINS[self.activation])


class Conv2d(nn.Module):
  """Convolution with equalized lr, bias, activation and optional 2x resampling
  (ADA `Conv2dLayer`): weight ~ N(0, 1) used times `1 / sqrt(in * k * k)`."""
  features: int
  kernel_size: int
  use_bias: bool = True
  activation: str = "linear"
  up: int = 1
  down: int = 1
  conv_clamp: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, gain: float = 1.0) -> Array:
    k, c_in = self.kernel_size, x.shape[-1]
    weight = self.param("weight", normal_init(),
                        (k, k, c_in, self.features))
    w = weight * (1.0 / np.sqrt(c_in * k * k))
    f = fir_filter() if (self.up > 1 or self.down > 1) else None
    x = conv2d_resample(x.astype(self.dtype), w.astype(self.dtype), f=f,
                        up=self.up, down=self.down, padding=k // 2)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,))
      x = x + bias.astype(self.dtype)
    clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
    return activate(x, self.activation,
                    ACTIVATION_GAINS[self.activation] * gain, clamp)
