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

The convolution forms that only exist to make XLA:CPU fast (a 1x1 conv as a
matrix product, space-to-depth strided and polyphase transposed convolutions)
live in `cpu_ops`; `conv2d_resample` says where it uses them.

Layouts: dense weights are (in, out); conv weights HWIO (kh, kw, in, out).
Parameters are float32; `dtype` sets the compute dtype of convolutions
(float32 or bfloat16; `networks.block_dtype` picks it per block), and the
bias add, activation and clamp after them run in that dtype, as in the
reference's `bias_act`. Dense layers, style/demodulation coefficients and
per-sample statistics always run in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gandl_jax.model import cpu_ops

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


def _pad_axis(x: Array, axis: int, before: int, after: int,
              interior: int = 0) -> Array:
  """Zero-pads (or, for negative amounts, crops) one axis."""
  cfg = [(0, 0, 0)] * x.ndim
  cfg[axis] = (before, after, interior)
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _tap_sum(x: Array, taps: Sequence[float], axis: int, starts: Sequence[int],
             size: int, stride: int) -> Array:
  """sum_k taps[k] * x[starts[k] : ... : stride] (`size` samples) along `axis`;
  zero taps are skipped. The weighted slices fuse into one elementwise pass."""
  out = None
  for t, s in zip(taps, starts):
    if t == 0:
      continue
    term = lax.slice_in_dim(x, s, s + (size - 1) * stride + 1, stride, axis)
    term = term * jnp.asarray(t, x.dtype)
    out = term if out is None else out + term
  if out is None:
    shape = list(x.shape)
    shape[axis] = size
    out = jnp.zeros(shape, x.dtype)
  return out


def _upfirdn1d(x: Array, taps: Sequence[float], axis: int, up: int, down: int,
               pad: Tuple[int, int]) -> Array:
  """upfirdn along one axis with correlation `taps` (the filter already
  flipped and scaled): zero-stuff by `up`, pad/crop, correlate, keep every
  `down`-th sample. Upsampling without downsampling is done polyphase: output
  phase r only sees the taps that land on input samples, so no zeros are
  inserted or multiplied."""
  n, t = x.shape[axis], len(taps)
  p0, p1 = pad
  size = (n * up + p0 + p1 - t) // down + 1
  if size <= 0:
    raise ValueError(f"upfirdn2d: empty output for {n} samples, up={up}, "
                     f"down={down}, pad={pad}, {t} taps")
  if up > 1 and down == 1:
    q = -(-size // up)                    # samples per output phase
    phases = []
    for r in range(up):
      # out[up*i + r] = sum over taps k with (r + k - p0) % up == 0 of
      #   taps[k] * x[i + (r + k - p0) // up].
      ks = [k for k in range(t) if (r + k - p0) % up == 0]
      offs = [(r + k - p0) // up for k in ks]
      lo = max(0, -min(offs, default=0))
      hi = max(0, q - 1 + max(offs, default=0) - (n - 1))
      xp = _pad_axis(x, axis, lo, hi)
      phases.append(_tap_sum(xp, [taps[k] for k in ks], axis,
                             [o + lo for o in offs], q, 1))
    y = jnp.stack(phases, axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = q * up
    return lax.slice_in_dim(y.reshape(shape), 0, size, 1, axis)
  if up > 1:
    x = _pad_axis(x, axis, 0, up - 1, up - 1)   # zero insertion
  x = _pad_axis(x, axis, p0, p1)
  return _tap_sum(x, taps, axis, range(t), size, down)


def separable_factors(f: np.ndarray
                      ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(a, b) with `outer(a, b) == f` if the 2-D filter is rank one, else None.

  Scaled by the square root of the largest entry so that binomial filters
  factor exactly in binary floating point ([1, 3, 3, 1] / 64 -> [1, 3, 3, 1] / 8
  on each axis).
  """
  f = np.asarray(f, np.float64)
  i, j = np.unravel_index(np.argmax(np.abs(f)), f.shape)
  p = f[i, j]
  if p == 0:
    return None
  s = math.sqrt(abs(p))
  a, b = f[:, j] / s, f[i, :] / s * np.sign(p)
  if not np.allclose(np.outer(a, b), f, rtol=1e-6, atol=1e-7 * abs(p)):
    return None
  return a, b


def upfirdn2d(x: Array, f: np.ndarray, up: int = 1, down: int = 1,
              pad: Tuple[int, int] = (0, 0), gain: float = 1.0,
              flip_filter: bool = False) -> Array:
  """Upsample (zero insertion), pad, FIR-filter and downsample an NHWC batch.

  Same semantics as stylegan2-ada-pytorch's `upfirdn2d` with equal padding on
  both spatial axes: `pad = (before, after)` may be negative (cropping); the
  filter is applied as a true convolution unless `flip_filter`; `gain` scales
  the filter. Output size per axis: `(in * up + before + after - taps) // down + 1`.

  Computed as sums of shifted (strided) slices, in at least float32, which
  XLA fuses into elementwise passes on every backend (a depthwise
  `conv_general_dilated` is 10-50x slower on XLA:CPU, see docs/performance.md).
  Rank-one filters such as `fir_filter()` run as two 1-D passes (4 + 4 taps
  instead of 16), upsampling polyphase (no multiplications by inserted zeros).
  """
  f = np.asarray(f, np.float64) * gain
  if f.ndim != 2:
    raise ValueError(f"upfirdn2d: filter must be 2-D, got shape {f.shape}")
  if not flip_filter:
    f = f[::-1, ::-1]
  dtype = x.dtype
  y = x.astype(jnp.promote_types(dtype, jnp.float32))
  factors = separable_factors(f)
  if factors is not None:
    a, b = factors
    y = _upfirdn1d(y, [float(t) for t in a], 1, up, down, pad)
    y = _upfirdn1d(y, [float(t) for t in b], 2, up, down, pad)
    return y.astype(dtype)
  # General 2-D filter: zero-stuff, pad/crop, then one 2-D sum of slices.
  p0, p1 = pad
  th, tw = f.shape
  for axis in (1, 2):
    if up > 1:
      y = _pad_axis(y, axis, 0, up - 1, up - 1)
    y = _pad_axis(y, axis, p0, p1)
  oh = (y.shape[1] - th) // down + 1
  ow = (y.shape[2] - tw) // down + 1
  if oh <= 0 or ow <= 0:
    raise ValueError(f"upfirdn2d: empty output for input {x.shape}, up={up}, "
                     f"down={down}, pad={pad}, filter {f.shape}")
  out = None
  for i in range(th):
    rows = lax.slice_in_dim(y, i, i + (oh - 1) * down + 1, down, 1)
    term = _tap_sum(rows, [float(t) for t in f[i]], 2, range(tw), ow, down)
    out = term if out is None else out + term
  return out.astype(dtype)


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
  def conv(y, k, stride=1, pad=0):
    if kh == 1 and stride == 1 and pad == 0:
      return cpu_ops.pointwise_conv(y, k)   # a matrix product, all backends
    return lax.conv_general_dilated(
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
    # Strided conv; on CPU its input gradient comes from the space-to-depth
    # form (see cpu_ops), accelerators keep the plain strided conv.
    return lax.platform_dependent(
        upfirdn2d(x, f, pad=(p0, p1)), w,
        cpu=functools.partial(cpu_ops.strided_conv_s2d_grads, stride=down),
        default=functools.partial(strided_conv, stride=down))
  # Upsampling: transposed strided conv, then filter. On CPU in polyphase
  # form (see cpu_ops); accelerators run input dilation natively, and the
  # polyphase form would cost them (ceil(k/up) * up / k)^2 = 16/9 the MACs.
  p0 = padding + (fw + up - 1) // 2 - (kw - 1)
  p1 = padding + (fw - up) // 2 - (kw - up)
  y = lax.platform_dependent(
      x, w, cpu=functools.partial(cpu_ops.transposed_conv_polyphase, up=up),
      default=functools.partial(transposed_conv, up=up))
  return upfirdn2d(y, f, pad=(p0, p1), gain=up * up)


def strided_conv(x: Array, w: Array, stride: int) -> Array:
  """VALID cross-correlation of NHWC `x` with HWIO `w`, stride `stride`."""
  return lax.conv_general_dilated(x, w, window_strides=(stride, stride),
                                  padding="VALID", dimension_numbers=_DN)


def transposed_conv(x: Array, w: Array, up: int) -> Array:
  """torch's conv_transpose2d (stride `up`, HWIO `w`): a true convolution of
  the zero-stuffed input, i.e. correlation with the flipped kernel."""
  k = w.shape[0]
  return lax.conv_general_dilated(
      x, w[::-1, ::-1], window_strides=(1, 1), padding=[(k - 1, k - 1)] * 2,
      lhs_dilation=(up, up), dimension_numbers=_DN)


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
