"""ContraD's losses (gandl_jax/model/contrastive.py) against numpy closed
forms, their gradients against finite differences, and the two views."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandl_jax.model import contrastive


def _unit(z):
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def nt_xent_numpy(z1, z2, tau):
  """Loop over the 2N anchors; explicit softmax over the 2N - 1 others."""
  z = _unit(np.concatenate([z1, z2]).astype(np.float64))
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    denom = sum(np.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k != i)
    total += -np.log(np.exp(z[i] @ z[pos] / tau) / denom)
  return total / (2 * n)


def fake_supcon_numpy(r1, r2, f, tau):
  """Loop over fake anchors and their fake positives."""
  z = _unit(np.concatenate([r1, r2, f]).astype(np.float64))
  r, m = 2 * len(r1), len(f)
  total = 0.0
  for i in range(r, r + m):
    denom = sum(np.exp(z[i] @ z[k] / tau) for k in range(r + m) if k != i)
    inner = 0.0
    for j in range(r, r + m):
      if j != i:
        inner += -np.log(np.exp(z[i] @ z[j] / tau) / denom)
    total += inner / (m - 1)
  return total / m


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_numpy(tau):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
  ours = float(contrastive.nt_xent(jnp.asarray(z1, jnp.float32),
                                   jnp.asarray(z2, jnp.float32), tau))
  np.testing.assert_allclose(ours, nt_xent_numpy(z1, z2, tau), rtol=1e-5)


def test_nt_xent_prefers_matching_views():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(8, 16))
  aligned = contrastive.nt_xent(z, z + 0.01 * rng.normal(size=z.shape))
  shuffled = contrastive.nt_xent(z, z[::-1])
  assert float(aligned) < float(shuffled)


@pytest.mark.parametrize("tau", [0.1, 0.3])
def test_fake_supcon_matches_numpy(tau):
  rng = np.random.default_rng(2)
  r1, r2 = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  f = rng.normal(size=(4, 8))
  ours = float(contrastive.fake_supcon(*(jnp.asarray(a, jnp.float32)
                                         for a in (r1, r2, f)), tau))
  np.testing.assert_allclose(ours, fake_supcon_numpy(r1, r2, f, tau),
                             rtol=1e-5)


def test_contrad_loss_is_the_weighted_sum():
  rng = np.random.default_rng(3)
  a = [jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(5)]
  total = contrastive.contrad_loss(*a, temperature=0.2, fake_weight=0.5)
  expected = (nt_xent_numpy(a[0], a[1], 0.2) +
              0.5 * fake_supcon_numpy(a[2], a[3], a[4], 0.2))
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def _central_difference(f, x, eps=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[idx] = eps
    g[idx] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


@pytest.mark.parametrize("which", ["nt_xent", "fake_supcon"])
def test_gradients_match_finite_differences(which):
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    if which == "nt_xent":
      args = [rng.normal(size=(4, 5)), rng.normal(size=(4, 5))]
      fn = functools.partial(contrastive.nt_xent, temperature=0.2)
    else:
      args = [rng.normal(size=(3, 5)), rng.normal(size=(3, 5)),
              rng.normal(size=(4, 5))]
      fn = functools.partial(contrastive.fake_supcon, temperature=0.2)
    for pos in range(len(args)):
      def scalar(x, pos=pos):
        a = [jnp.asarray(v, jnp.float64) for v in args]
        a[pos] = jnp.asarray(x, jnp.float64)
        return fn(*a)
      grad = jax.grad(scalar)(jnp.asarray(args[pos], jnp.float64))
      assert grad.dtype == jnp.float64
      numeric = _central_difference(lambda x, f=scalar: float(f(x)),
                                    args[pos])
      np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-6,
                                 atol=1e-8)
      assert np.abs(numeric).max() > 1e-3


def test_losses_reject_bad_shapes():
  with pytest.raises(ValueError, match="nt_xent: z1 and z2"):
    contrastive.nt_xent(jnp.zeros((3, 4)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="fake_supcon"):
    contrastive.fake_supcon(jnp.zeros((3, 4)), jnp.zeros((3, 4)),
                            jnp.zeros((1, 4)))


def _images(b=4, r=16, c=5, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, r, r, c),
                            minval=-1)


def test_views_shapes_and_determinism():
  x = _images()
  fn = jax.jit(contrastive.views)
  v1, v2 = fn(jax.random.PRNGKey(0), x)
  assert v1.shape == x.shape and v2.shape == x.shape
  assert v1.dtype == jnp.float32
  w1, w2 = fn(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(np.asarray(v1), np.asarray(w1))
  np.testing.assert_array_equal(np.asarray(v2), np.asarray(w2))
  u1, _ = fn(jax.random.PRNGKey(1), x)
  assert np.abs(np.asarray(u1) - np.asarray(v1)).max() > 0.1
  assert np.abs(np.asarray(v1) - np.asarray(v2)).max() > 0.1


def test_flips_and_rot90_preserve_per_channel_values():
  x = _images(b=8)
  v1, v2 = contrastive.views(jax.random.PRNGKey(3), x, crop_scale=None,
                             jitter_prob=0.0)
  xs = np.sort(np.asarray(x).reshape(8, -1, 5), axis=1)
  for v in (v1, v2):
    np.testing.assert_array_equal(
        np.sort(np.asarray(v).reshape(8, -1, 5), axis=1), xs)
  # ... and actually move pixels for some images.
  assert np.abs(np.asarray(v1) - np.asarray(x)).max() > 0.1


def test_full_crop_is_identity():
  x = _images()
  v1, _ = contrastive.views(jax.random.PRNGKey(4), x, crop_scale=(1.0, 1.0),
                            crop_ratio=(1.0, 1.0), flip=False, rot90=False,
                            jitter_prob=0.0)
  np.testing.assert_allclose(np.asarray(v1), np.asarray(x), atol=1e-5)


def test_crops_zoom_in():
  # A quarter-area square crop (16 of 32 columns) resized back to 32 columns
  # magnifies 2x: a linear ramp keeps its form with half the slope per pixel.
  ramp = jnp.broadcast_to(jnp.linspace(-1, 1, 32)[None, None, :, None],
                          (2, 32, 32, 1))
  v1, _ = contrastive.views(jax.random.PRNGKey(5), ramp, crop_scale=(0.25,
                            0.25), crop_ratio=(1.0, 1.0), flip=False,
                            rot90=False, jitter_prob=0.0)
  slope = np.diff(np.asarray(v1)[:, 16, 4:-4, 0], axis=1).mean(axis=1)
  np.testing.assert_allclose(slope, (2 / 31) / 2, rtol=1e-3)


def test_jitter_is_per_channel_affine():
  x = _images(b=3)
  v1, _ = contrastive.views(jax.random.PRNGKey(6), x, crop_scale=None,
                            flip=False, rot90=False, jitter_prob=1.0)
  xs, vs = np.asarray(x), np.asarray(v1)
  gains = []
  for b in range(3):
    for c in range(5):
      a, r = np.polyfit(xs[b, ..., c].ravel(), vs[b, ..., c].ravel(), 1,
                        full=True)[:2]
      assert r.size == 0 or r[0] < 1e-8
      gains.append(a[0])
  assert np.std(gains) > 0.01  # independent per (image, channel)


def test_views_reject_non_square_rot90():
  with pytest.raises(ValueError, match="rot90 needs square"):
    contrastive.views(jax.random.PRNGKey(0), jnp.zeros((1, 8, 16, 5)))
