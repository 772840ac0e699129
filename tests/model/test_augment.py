"""ADA (gandl_jax/model/augment.py) against stylegan2-ada-pytorch.

tests/fixtures/augment_reference.npz holds the reference `AugmentPipe`'s
outputs on random 32x32 5-channel images together with every random draw it
made (tools/make_augment_fixtures.py documents how it was made); our
`params_from_draws` + `apply` with the same draws must give the same images.
The adjustment of p is checked step by step against the reference's formula
and against its closed form.
"""
import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandl_jax.model import augment

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "fixtures", "augment_reference.npz")
ATOL = 1e-4  # Measured: < 2e-5 on every case.


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURE))


def _case(ref, case):
  kwargs = json.loads(str(ref[f"{case}.kwargs"]))
  config = augment.AugmentConfig(**{k: float(v) for k, v in kwargs.items()})
  draws = {n: (jnp.asarray(ref[f"{case}.draw.{n}.value"]),
               jnp.asarray(ref[f"{case}.draw.{n}.gate"]))
           for n in config.enabled()}
  _, h, w, _ = ref["images"].shape
  params = augment.params_from_draws(draws, ref[f"{case}.p"], config, h, w)
  return config, params


@pytest.mark.parametrize("case", ["blit", "geom", "bg", "bg_strong",
                                  "scale_margin", "color"])
def test_matches_reference_with_same_draws(ref, case):
  config, params = _case(ref, case)
  assert set(config.enabled()) == {
      k.split(".")[2] for k in ref if k.startswith(f"{case}.draw.")}
  out = np.asarray(jax.jit(augment.apply)(ref["images"], params))
  expected = ref[f"{case}.output"]
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)
  # The case changes the images (a no-op would not test anything).
  assert np.abs(expected - ref["images"]).max() > 0.1


def test_reference_margin_is_reproduced(ref):
  # Without the reference's data-dependent padding window (zeros beyond it)
  # the zoomed-out image differs at its border by far more than ATOL.
  _, params = _case(ref, "scale_margin")
  g = augment.geometric_matrix(params, 32, 32)
  assert np.asarray(augment._margin(g, 32, 32)).max() < 31  # not clamped
  full = np.asarray(augment.resample(jnp.asarray(ref["images"]), g))
  np.testing.assert_allclose(full, ref["scale_margin.output"], atol=ATOL)


def test_gates_follow_p(ref):
  # The fixture's cases at p < 1 leave some transforms off, as the reference.
  _, params = _case(ref, "blit")
  gates = ref["blit.draw.xflip.gate"]
  expect_on = gates < 0.7
  flipped = np.asarray(params["xflip"])
  assert np.all(flipped[~expect_on] == 0)
  np.testing.assert_array_equal(
      flipped[expect_on], np.floor(ref["blit.draw.xflip.value"] * 2)[
          expect_on])


def test_p_zero_is_identity():
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 5), minval=-1)
  for name in augment.PIPELINES:
    params = augment.sample_params(jax.random.PRNGKey(1), x.shape, 0.0,
                                   augment.pipeline(name))
    np.testing.assert_array_equal(np.asarray(augment.apply(x, params)),
                                  np.asarray(x))


def test_resampling_identity_reconstructs():
  # The sym6 up/down pair with an identity matrix is the identity (the
  # orthogonal wavelet's perfect reconstruction): checks the filters, the
  # padding and the coordinate conventions independently of the fixture.
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 20, 20, 3), minval=-1)
  g = jnp.broadcast_to(jnp.eye(3), (2, 3, 3))
  np.testing.assert_allclose(np.asarray(augment.resample(x, g)),
                             np.asarray(x), atol=2e-5)


def test_integer_translation_is_exact():
  # Integer shifts keep the filter pair aligned: the output is the reflect-
  # padded input shifted by whole pixels.
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 16, 2), minval=-1)
  t = np.asarray([[3.0, -2.0], [-1.0, 4.0]])
  out = np.asarray(augment.apply(x, {"xint": jnp.asarray(t)}))
  padded = np.pad(np.asarray(x), ((0, 0), (8, 8), (8, 8), (0, 0)), "reflect")
  for i, (tx, ty) in enumerate(t.astype(int)):
    e = padded[i, 8 - ty:8 - ty + 16, 8 - tx:8 - tx + 16]
    np.testing.assert_allclose(out[i], e, atol=2e-5, err_msg=str(i))


def test_flip_and_rot90_orientation():
  # G_inv maps output pixels to input pixels, so out = rot90(xflip(in), k).
  # As in the reference these go through the resampling with the asymmetric
  # sym6 filter, so they are a slightly low-passed permutation, not exact.
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 16, 16, 2), minval=-1)
  params = {"xflip": jnp.asarray([1.0, 0, 1, 0]),
            "rotate90": jnp.asarray([0.0, 1, 2, 3])}
  out = np.asarray(augment.apply(x, params))
  xs = np.asarray(x)
  expected = [xs[0, :, ::-1], np.rot90(xs[1], 1), np.rot90(xs[2, :, ::-1], 2),
              np.rot90(xs[3], 3)]
  for i, e in enumerate(expected):
    corr = np.corrcoef(out[i].ravel(), e.ravel())[0, 1]
    others = [np.corrcoef(out[i].ravel(), np.rot90(e, k).ravel())[0, 1]
              for k in (1, 2, 3)]
    assert corr > 0.9 and max(others) < 0.3, (i, corr, others)


def test_color_is_per_channel_affine():
  x = jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, 5), minval=-1)
  b = jnp.arange(10, dtype=jnp.float32).reshape(2, 5) / 10
  c = 1 + jnp.arange(10, dtype=jnp.float32).reshape(2, 5) / 5
  out = augment.apply(x, {"brightness": b, "contrast": c})
  np.testing.assert_allclose(
      np.asarray(out), np.asarray(c[:, None, None] * (x + b[:, None, None])),
      atol=1e-6)


def test_gradient_flows_and_is_the_transpose():
  x = jax.random.uniform(jax.random.PRNGKey(5), (2, 16, 16, 5), minval=-1)
  params = augment.sample_params(jax.random.PRNGKey(6), x.shape, 1.0,
                                 augment.pipeline("bgc"))
  w = jax.random.normal(jax.random.PRNGKey(7), x.shape)

  def f(img):
    return jnp.sum(w * augment.apply(img, params))

  g = jax.jit(jax.grad(f))(x)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.abs(np.asarray(g)).max() > 0
  # apply is affine in the images: f(x + d) - f(x) = <grad, d> exactly.
  d = jax.random.normal(jax.random.PRNGKey(8), x.shape)
  np.testing.assert_allclose(float(f(x + d) - f(x)), float(jnp.sum(g * d)),
                             rtol=1e-3)


def test_sample_params_under_jit_with_traced_p():
  config = augment.pipeline("bgc")
  x = jnp.zeros((64, 8, 8, 5))
  fn = jax.jit(lambda k, p: augment.sample_params(k, x.shape, p, config))
  params = fn(jax.random.PRNGKey(0), jnp.float32(0.5))
  assert params["brightness"].shape == (64, 5)
  assert params["xint"].shape == (64, 2)
  frac_flipped = float(jnp.mean(params["xflip"]))
  assert 0.1 < frac_flipped < 0.45  # P = 0.5 * 0.5
  assert float(jnp.mean(params["scale"] != 1)) < 0.8
  params1 = fn(jax.random.PRNGKey(0), jnp.float32(1.0))
  assert float(jnp.mean(params1["scale"] != 1)) == 1.0


def test_unknown_pipeline_names_itself():
  with pytest.raises(ValueError, match="augment pipeline 'rgb'"):
    augment.pipeline("rgb")


def test_adjust_p_defaults_are_the_reference():
  sig = inspect.signature(augment.adjust_p)
  assert sig.parameters["interval"].default == 4
  assert sig.parameters["kimg"].default == 500
  assert sig.parameters["target"].default == 0.6


def test_adjust_p_step_by_step_and_closed_form():
  batch, interval, kimg, target = 32, 4, 2, 0.6
  delta = batch * interval / (kimg * 1000)
  rng = np.random.default_rng(0)
  count = batch * interval
  # Mostly above target (p rises), then below (p falls to 0 and stays),
  # then mixed; one exact tie (24 / 40 = target, no change).
  sums = np.concatenate([rng.integers(90, 128, 30), rng.integers(-128, 40, 40),
                         rng.integers(40, 110, 30)])
  counts = np.full(len(sums), count)
  sums[50], counts[50] = 24, 40
  p_ours, p_ref = 0.0, 0.0
  ref_seq, our_seq = [], []
  for s, n in zip(sums, counts):
    p_ours = augment.adjust_p(p_ours, s, n, batch, interval, kimg, target)
    # The reference (training_loop.py): np.sign(mean - target) * (batch *
    # interval) / (kimg * 1000), then max(p + adjust, 0).
    adjust = np.sign(s / n - target) * (batch * interval) / (kimg * 1000)
    p_ref = max(p_ref + adjust, 0.0)
    ref_seq.append(p_ref)
    our_seq.append(float(p_ours))
  np.testing.assert_allclose(our_seq, ref_seq, atol=1e-6)
  # Closed form (Lindley recursion): with steps x_k = delta * sign_k and
  # partial sums S_k, p_k = S_k + max(p_0, -min_{j <= k} S_j).
  steps = delta * np.sign(sums / counts - target)
  partial = np.cumsum(steps)
  closed = partial + np.maximum(0.0, -np.minimum.accumulate(partial))
  np.testing.assert_allclose(our_seq, closed, atol=1e-6)
  assert max(our_seq) > 0.05 and min(our_seq[40:70]) == 0.0
  assert our_seq[50] == our_seq[49]


def test_adjust_p_without_statistics_keeps_p():
  assert float(augment.adjust_p(0.3, 0, 0, 32)) == pytest.approx(0.3)
