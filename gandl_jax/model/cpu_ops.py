"""Convolution forms that make XLA:CPU fast, equal to plain `lax` convolutions.

`layers.conv2d_resample` computes what stylegan2-ada-pytorch's
`conv2d_resample` computes; on accelerators it uses the plain `lax`
convolutions. XLA:CPU runs some of those convolutions -- and, above all, the
derivatives of their gradients that R1 and the path-length penalty take --
far outside its fast paths, so these forms replace them where `layers` says
(docs/performance.md has the measurements). Each function here gives the same
values and gradients as the convolution it replaces; `tests/model/test_resample.py`
checks every one against the plain `lax.conv_general_dilated` form, to
first order and, where R1 needs it, second order (d/dw of ||d out / dx||^2):

* `pointwise_conv` replaces a 1x1 stride-1 convolution (every backend:
  `conv2d_resample` routes unresampled 1x1 kernels through it).
* `strided_conv_s2d_grads` replaces a strided VALID convolution on CPU; its
  input gradient comes from `strided_conv_space_to_depth`.
* `transposed_conv_polyphase` replaces torch's `conv_transpose2d` (an
  input-dilated convolution, `layers.transposed_conv`) on CPU.
* `conv_valid` is the stride-1 VALID convolution both of the above end in,
  with its own input and weight gradients.

Layouts as in `layers`: NHWC activations, HWIO kernels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_DN = ("NHWC", "HWIO", "NHWC")


def pointwise_conv(x: Array, w: Array) -> Array:
  """A 1x1 convolution (NHWC `x`, HWIO `w` of shape (1, 1, I, O)) as one
  matrix product over the flattened N * H * W positions.

  Replaces `lax.conv_general_dilated(x, w, (1, 1), 'VALID')`: same sums.
  XLA:CPU runs the product's gradients (the weight gradient contracts the
  leading N * H * W axis of both operands, with no layout transposes)
  1.6-4x faster than the 1x1 convolution's, most of all with the 5 channels
  of toRGB / fromRGB (docs/performance.md). On GPU/TPU a 1x1 convolution is
  itself a matrix multiplication on the same units (cuBLAS / the MXU).
  """
  n, h, wd, c_in = x.shape
  y = jnp.dot(x.reshape(n * h * wd, c_in), w.reshape(c_in, w.shape[-1]))
  return y.reshape(n, h, wd, w.shape[-1])


@jax.custom_vjp
def conv_valid(x: Array, w: Array) -> Array:
  """Stride-1 VALID cross-correlation (NHWC, HWIO) whose input gradient is a
  VALID convolution of the explicitly zero-padded output gradient.

  Same values and gradients as `lax.conv_general_dilated(x, w, (1, 1),
  'VALID')`. The difference is in the derivatives of the gradient that R1
  and the path-length penalty take: autodiff's input gradient is a
  convolution whose padding makes its output larger than its input, and
  XLA:CPU runs the weight gradient of such a convolution 10-30x slower than
  the same convolution on a pre-padded input (docs/performance.md).
  """
  return lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                  dimension_numbers=_DN)


def _conv_valid_fwd(x, w):
  return conv_valid(x, w), (x, w)


def _conv_valid_bwd(res, dy):
  x, w = res
  kh, kw = w.shape[0], w.shape[1]
  dy_pad = lax.pad(dy, jnp.zeros((), dy.dtype),
                   [(0, 0, 0), (kh - 1, kh - 1, 0), (kw - 1, kw - 1, 0),
                    (0, 0, 0)])
  # Full correlation with the flipped kernel, input and output swapped.
  dx = lax.conv_general_dilated(dy_pad, jnp.swapaxes(w[::-1, ::-1], 2, 3),
                                (1, 1), "VALID", dimension_numbers=_DN)
  return dx.astype(x.dtype), _weight_grad_taps(x, dy, kh, kw).astype(w.dtype)


def _weight_grad_taps(x: Array, dy: Array, kh: int, kw: int) -> Array:
  """The weight gradient of a stride-1 VALID convolution as one matrix
  product per tap: dw[i, j] = sum_{n,h,w} x[n, i+h, j+w, :]^T dy[n, h, w, :].

  XLA:CPU runs the small-kernel weight gradients `conv_valid` serves (the
  2x2 polyphase and space-to-depth kernels, with many output channels)
  10-30% faster this way than as a convolution (docs/performance.md);
  the sums are the same.
  """
  oh, ow = dy.shape[1], dy.shape[2]
  return jnp.stack([jnp.stack([
      jnp.einsum("nhwi,nhwo->io", x[:, i:i + oh, j:j + ow, :], dy,
                 preferred_element_type=jnp.float32)
      for j in range(kw)]) for i in range(kh)])


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def _strided_conv(x: Array, w: Array, stride: int) -> Array:
  return lax.conv_general_dilated(x, w, window_strides=(stride, stride),
                                  padding="VALID", dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def strided_conv_s2d_grads(x: Array, w: Array, stride: int) -> Array:
  """A strided VALID convolution whose input gradient is that of
  `strided_conv_space_to_depth` (same values).

  Replaces `lax.conv_general_dilated(x, w, (stride, stride), 'VALID')`.
  XLA:CPU runs the derivative of the strided conv's input gradient (an
  input-dilated conv) with respect to the weights, which R1 takes, as a
  window-dilated conv far outside its fast path; the space-to-depth form
  (stride-1 convolutions on pre-padded inputs) avoids it. The forward pass
  and weight gradient stay strided: the space-to-depth kernel has
  (ceil(k/s) * s / k)^2 = 16/9 the multiply-adds for k = 3, s = 2.
  """
  return _strided_conv(x, w, stride)


def _strided_conv_s2d_grads_fwd(x, w, stride):
  return _strided_conv(x, w, stride), (x, w)


def _strided_conv_s2d_grads_bwd(stride, res, dy):
  x, w = res
  _, pull_x = jax.vjp(lambda x: strided_conv_space_to_depth(x, w, stride), x)
  _, pull_w = jax.vjp(lambda w: _strided_conv(x, w, stride), w)
  return pull_x(dy)[0], pull_w(dy)[0]


strided_conv_s2d_grads.defvjp(_strided_conv_s2d_grads_fwd,
                              _strided_conv_s2d_grads_bwd)


def strided_conv_space_to_depth(x: Array, w: Array, stride: int) -> Array:
  """A strided VALID convolution as space-to-depth and one stride-1 VALID
  convolution (`conv_valid`).

  With T = ceil(k / s): out[q] = sum_{t < T, r < s} w[s*t + r] x[s*(q+t) + r],
  i.e. the input's s x s blocks become channels (index (r_h, r_w, c)) and the
  kernel, zero-padded to T*s taps, is regrouped the same way into a T x T
  kernel over s*s*C_in channels. Padded input samples only meet zero taps.
  """
  n, h, wd, c_in = x.shape
  k, c_out = w.shape[0], w.shape[3]
  s, t = stride, -(-k // stride)
  oh, ow = (h - k) // s + 1, (wd - k) // s + 1
  hp, wp = (oh + t - 1) * s, (ow + t - 1) * s
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0), (0, hp - h, 0), (0, wp - wd, 0), (0, 0, 0)])
  x = x.reshape(n, hp // s, s, wp // s, s, c_in).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, hp // s, wp // s, s * s * c_in)
  kern = jnp.pad(w, ((0, t * s - k), (0, t * s - k), (0, 0), (0, 0)))
  kern = kern.reshape(t, s, t, s, c_in, c_out).transpose(0, 2, 1, 3, 4, 5)
  kern = kern.reshape(t, t, s * s * c_in, c_out)
  return conv_valid(x, kern)


def transposed_conv_polyphase(x: Array, w: Array, up: int) -> Array:
  """torch's conv_transpose2d (stride `up`, HWIO `w`) as one stride-1
  convolution producing all `up * up` output phases as channels, then
  interleaved (depth-to-space).

  Replaces the input-dilated convolution (`layers.transposed_conv`), which
  XLA:CPU runs 5-10x slower (and its weight gradient far slower still).
  out[up*q + r] = sum_t w[r + up*t] * x[q - t]: phase r correlates the
  `T = ceil(k / up)` inputs x[q-T+1 .. q] with the taps w[r + up*(T-1-i)]
  (zero past the kernel's end).
  """
  n, h, wd, c_in = x.shape
  k, c_out = w.shape[0], w.shape[3]
  t = -(-k // up)
  # idx[i, r]: the kernel tap at window position i for phase r (k: zero).
  idx = np.full((t, up), k)
  for i in range(t):
    for r in range(up):
      if r + up * (t - 1 - i) < k:
        idx[i, r] = r + up * (t - 1 - i)
  w0 = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))
  kern = w0[idx[:, :, None, None], idx[None, None, :, :]]   # (t, up, t, up, I, O)
  kern = jnp.transpose(kern, (0, 2, 4, 1, 3, 5)).reshape(
      t, t, c_in, up * up * c_out)
  xp = jnp.pad(x, ((0, 0), (t - 1, t - 1), (t - 1, t - 1), (0, 0)))
  y = conv_valid(xp, kern)
  qh, qw = h + t - 1, wd + t - 1
  y = y.reshape(n, qh, qw, up, up, c_out).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(n, qh * up, qw * up, c_out)
  size_h, size_w = (h - 1) * up + k, (wd - 1) * up + k
  return y[:, :size_h, :size_w]
