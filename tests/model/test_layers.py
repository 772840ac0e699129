"""StyleGAN2 building blocks against independent numpy/scipy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from gandl_jax.model import layers

RNG = np.random.default_rng(0)
FIR = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0


# ---------------------------------------------------------------- references


def np_upfirdn2d(x, f, up=1, down=1, pad=(0, 0), gain=1.0):
  """Zero-stuff, pad/crop, true 2-D convolution (scipy), decimate. NHWC."""
  n, h, w, c = x.shape
  u = np.zeros((n, h * up, w * up, c))
  u[:, ::up, ::up] = x
  p0, p1 = pad
  u = np.pad(u, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)),
                 (0, 0)))
  a, b = max(-p0, 0), max(-p1, 0)
  u = u[:, a:u.shape[1] - b, a:u.shape[2] - b]
  out = np.stack([
      np.stack([signal.convolve2d(u[i, :, :, ch], f * gain, mode="valid")
                for ch in range(c)], axis=-1) for i in range(n)])
  return out[:, ::down, ::down]


def np_correlate(x, w, stride=1, pad=0):
  """Plain conv (cross-correlation) by definition. x NHWC, w HWIO."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w.shape[0]
  oh = (x.shape[1] - k) // stride + 1
  out = np.zeros((x.shape[0], oh, oh, w.shape[3]))
  for i in range(oh):
    for j in range(oh):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k]
      out[:, i, j] = np.einsum("nabi,abio->no", patch, w)
  return out


def np_transposed_conv(x, w, stride=2):
  """torch.conv_transpose2d by definition: out[s*y+ky] += x[y] * w[ky]."""
  n, h, _, _ = x.shape
  k = w.shape[0]
  out = np.zeros((n, (h - 1) * stride + k, (h - 1) * stride + k, w.shape[3]))
  for y in range(h):
    for xx in range(h):
      for ky in range(k):
        for kx in range(k):
          out[:, stride * y + ky, stride * xx + kx] += x[:, y, xx] @ w[ky, kx]
  return out


def np_modulated_conv(x, weight, styles, demodulate, up=1, padding=1):
  """Per-sample weights w' = weight * s (over inputs), demodulated, convolved."""
  outs = []
  for i in range(x.shape[0]):
    wi = weight * styles[i][None, None, :, None]
    if demodulate:
      wi = wi / np.sqrt(np.sum(wi**2, axis=(0, 1, 2), keepdims=True) + 1e-8)
    xi = x[i:i + 1]
    if up == 1:
      outs.append(np_correlate(xi, wi, pad=padding))
    else:  # ADA: transposed conv, then FIR with padding (1, 1) and gain 4.
      outs.append(np_upfirdn2d(np_transposed_conv(xi, wi), FIR, pad=(1, 1),
                               gain=4))
  return np.concatenate(outs)


def np_minibatch_std(x_nhwc, group_size, num_channels, num_shards=1):
  """stylegan2-ada-pytorch's MinibatchStdLayer, written in NCHW numpy."""
  x = np.transpose(x_nhwc, (0, 3, 1, 2))
  outs = []
  for s in np.split(x, num_shards):
    n, c, h, w = s.shape
    g, f = min(group_size, n), num_channels
    y = s.reshape(g, -1, f, c // f, h, w)
    y = y - y.mean(axis=0)
    y = np.sqrt(np.square(y).mean(axis=0) + 1e-8)
    y = y.mean(axis=(2, 3, 4)).reshape(-1, f, 1, 1)
    y = np.tile(y, (g, 1, h, w))
    outs.append(np.concatenate([s, y], axis=1))
  return np.transpose(np.concatenate(outs), (0, 2, 3, 1))


# ---------------------------------------------------------------- tests


def test_fir_filter_is_normalized_binomial():
  np.testing.assert_allclose(layers.fir_filter(), FIR, rtol=1e-7)


@pytest.mark.parametrize("up,down,pad,gain", [
    (1, 1, (0, 0), 1.0), (1, 1, (2, 1), 1.0), (2, 1, (2, 1), 4.0),
    (1, 2, (1, 1), 1.0), (1, 1, (-1, 2), 1.0), (2, 1, (1, 1), 4.0)])
def test_upfirdn2d_matches_numpy(up, down, pad, gain):
  x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
  got = layers.upfirdn2d(jnp.asarray(x), FIR, up=up, down=down, pad=pad,
                         gain=gain)
  want = np_upfirdn2d(x, FIR, up, down, pad, gain)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_asymmetric_filter_orientation():
  # A non-symmetric filter distinguishes convolution from correlation.
  f = RNG.standard_normal((4, 4)).astype(np.float32)
  x = RNG.standard_normal((1, 6, 6, 2)).astype(np.float32)
  got = layers.upfirdn2d(jnp.asarray(x), f, up=2, pad=(2, 1))
  np.testing.assert_allclose(got, np_upfirdn2d(x, f, 2, 1, (2, 1)), atol=1e-5)


def test_upsample_downsample_shapes_and_dc_gain():
  x = jnp.ones((1, 8, 8, 2))
  up = layers.upsample2d(x, layers.fir_filter())
  down = layers.downsample2d(x, layers.fir_filter())
  assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
  # A constant image stays constant away from the zero-padded borders.
  np.testing.assert_allclose(up[0, 2:-2, 2:-2], 1.0, atol=1e-6)
  np.testing.assert_allclose(down[0, 1:-1, 1:-1], 1.0, atol=1e-6)


@pytest.mark.parametrize("k,down", [(3, 2), (1, 2), (3, 1)])
def test_conv2d_resample_down_matches_numpy(k, down):
  x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
  w = RNG.standard_normal((k, k, 3, 4)).astype(np.float32)
  got = layers.conv2d_resample(jnp.asarray(x), jnp.asarray(w), FIR, down=down,
                               padding=k // 2)
  if down == 1:
    want = np_correlate(x, w, pad=k // 2)
  elif k == 3:  # FIR-filter with padding 2, then strided conv.
    want = np_correlate(np_upfirdn2d(x, FIR, pad=(2, 2)), w, stride=2)
  else:         # FIR downsample, then 1x1 conv.
    want = np_correlate(np_upfirdn2d(x, FIR, down=2, pad=(1, 1)), w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("up", [1, 2])
def test_modulated_conv_matches_per_sample_numpy(up):
  x = RNG.standard_normal((3, 4, 4, 5)).astype(np.float32)
  weight = RNG.standard_normal((3, 3, 5, 6)).astype(np.float32)
  styles = RNG.standard_normal((3, 5)).astype(np.float32) + 1.0
  got = layers.modulated_conv2d(jnp.asarray(x), jnp.asarray(weight),
                                jnp.asarray(styles), demodulate=True, up=up,
                                padding=1, f=FIR if up > 1 else None)
  want = np_modulated_conv(x, weight, styles, True, up=up)
  assert got.shape == want.shape == (3, 4 * up, 4 * up, 6)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_modulated_conv_without_demodulation():
  x = RNG.standard_normal((2, 4, 4, 5)).astype(np.float32)
  weight = RNG.standard_normal((1, 1, 5, 3)).astype(np.float32)
  styles = RNG.standard_normal((2, 5)).astype(np.float32)
  got = layers.modulated_conv2d(jnp.asarray(x), jnp.asarray(weight),
                                jnp.asarray(styles), demodulate=False)
  want = np_modulated_conv(x, weight, styles, False, padding=0)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_demodulation_normalizes_output_variance():
  # With unit-variance iid inputs, demodulated outputs have ~unit variance.
  x = RNG.standard_normal((4, 32, 32, 64)).astype(np.float32)
  weight = RNG.standard_normal((3, 3, 64, 64)).astype(np.float32) * 7.0
  styles = RNG.uniform(0.5, 2.0, (4, 64)).astype(np.float32)
  y = layers.modulated_conv2d(jnp.asarray(x), jnp.asarray(weight),
                              jnp.asarray(styles), padding=1)
  assert abs(float(jnp.std(y[:, 1:-1, 1:-1])) - 1.0) < 0.05


@pytest.mark.parametrize("n,group,f,shards", [
    (8, 4, 1, 1), (8, 4, 2, 1), (6, 3, 1, 1), (8, 2, 1, 2), (8, 4, 1, 4)])
def test_minibatch_stddev_matches_numpy(n, group, f, shards):
  x = RNG.standard_normal((n, 4, 4, 6)).astype(np.float32)
  got = layers.minibatch_stddev(jnp.asarray(x), group, f, shards)
  want = np_minibatch_std(x, group, f, shards)
  assert got.shape == (n, 4, 4, 6 + f)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_minibatch_stddev_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="not divisible by the group size"):
    layers.minibatch_stddev(jnp.zeros((6, 4, 4, 2)), 4, 1)


def test_activation_gains():
  x = jnp.asarray([-2.0, -0.5, 0.0, 3.0])
  np.testing.assert_allclose(layers.activate(x, "lrelu", math.sqrt(2)),
                             np.where(x >= 0, x, 0.2 * x) * math.sqrt(2))
  np.testing.assert_allclose(layers.activate(x, "linear", 1.0, clamp=1.0),
                             np.clip(x, -1, 1))
  with pytest.raises(ValueError, match="unknown activation"):
    layers.activate(x, "relu")


def _set(variables, **values):
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  for k, v in values.items():
    params[k] = jnp.full_like(params[k], v)
  return {"params": params}


def test_dense_equalized_lr_gains():
  layer = layers.Dense(3, lr_multiplier=0.01, bias_init=0.0)
  x = RNG.standard_normal((2, 16)).astype(np.float32)
  v = layer.init(jax.random.PRNGKey(0), x)
  # Stored weights are N(0, 1) / lr_multiplier (std 100 here).
  assert 60 < float(jnp.std(v["params"]["weight"])) < 140
  y = layer.apply(_set(v, weight=1.0, bias=2.0), x)
  want = x.sum(1, keepdims=True) * 0.01 / math.sqrt(16) + 2.0 * 0.01
  np.testing.assert_allclose(y, np.repeat(want, 3, 1), rtol=1e-5)
  act = layers.Dense(3, activation="lrelu")
  y = act.apply(_set(act.init(jax.random.PRNGKey(0), x), weight=1.0, bias=0.0), x)
  s = x.sum(1, keepdims=True) / 4.0
  np.testing.assert_allclose(
      y, np.repeat(np.where(s >= 0, s, 0.2 * s) * math.sqrt(2), 3, 1), rtol=1e-5)


def test_conv_equalized_lr_gain():
  layer = layers.Conv2d(2, 3, activation="linear")
  x = RNG.standard_normal((1, 5, 5, 4)).astype(np.float32)
  v = layer.init(jax.random.PRNGKey(0), x)
  assert v["params"]["weight"].shape == (3, 3, 4, 2)
  assert abs(float(jnp.std(v["params"]["weight"])) - 1.0) < 0.3
  y = layer.apply(_set(v, weight=1.0, bias=0.5), x, gain=2.0)
  want = (np_correlate(x, np.ones((3, 3, 4, 2)), pad=1) / math.sqrt(36) + 0.5) * 2
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
