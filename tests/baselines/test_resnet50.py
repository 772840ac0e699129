"""ResNet-50 port and its perceptual loss: stage outputs equal Keras' own
model on the same inputs, weights files reload exactly, bad files fail in one
line, nothing downloads unless 'imagenet' is asked for; the loss is zero for
equal images, positive otherwise, equals the loss computed from Keras'
features, and its gradient matches finite differences. Random weights, small
images throughout."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandl_jax.baselines import keras_weights, resnet50

RES = 32


def _randomize(model, seed):
  """Every variable random, BN statistics and conv biases included (Keras'
  init leaves biases 0, mean 0 / variance 1, which would hide a folding or
  bias error); kernels scaled down so activations stay O(1-100)."""
  rng = np.random.default_rng(seed)
  for v in model.weights:
    if "moving_variance" in v.path:
      x = rng.uniform(0.5, 2.0, v.shape)
    elif "moving_mean" in v.path or "beta" in v.path or "bias" in v.path:
      x = rng.normal(0.0, 0.1, v.shape)
    elif "gamma" in v.path:
      x = rng.uniform(0.3, 0.8, v.shape)
    else:
      x = v.numpy()
    v.assign(x.astype(np.float32))


def _keras_stages(model, images):
  """Keras' own pipeline: each channel replicated to RGB on [0, 255],
  resnet50.preprocess_input, the stage outputs of the Keras model.
  images: (N, H, W, C) in [-1, 1] -> {layer: (N * C, h, w, d)}, image-major."""
  keras = keras_weights.keras()
  n, h, w, c = images.shape
  gray = np.moveaxis(images, -1, 1).reshape(n * c, h, w)
  rgb = np.repeat(((gray + 1.0) * 127.5)[..., None], 3, axis=-1)
  x = keras.applications.resnet50.preprocess_input(rgb.astype(np.float32))
  sub = keras.Model(model.input, [model.get_layer(l).output
                                  for l in resnet50.STAGES])
  outs = sub.predict(x, batch_size=64, verbose=0)
  return dict(zip(resnet50.STAGES, outs))


def _images(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("resnet_weights")
  model = resnet50.keras_model(None, seed=3)
  _randomize(model, 3)
  paths = {"weights.h5": str(d / "rn.weights.h5"), "keras": str(d / "rn.keras")}
  model.save_weights(paths["weights.h5"])
  model.save(paths["keras"])
  other = keras_weights.keras().applications.MobileNetV2(
      include_top=False, weights=None, input_shape=(None, None, 3), alpha=0.35)
  paths["wrong"] = str(d / "mobilenet.weights.h5")
  other.save_weights(paths["wrong"])
  return dict(model=model, paths=paths)


@pytest.fixture(scope="module")
def backbone(files):
  return resnet50.load(files["paths"]["weights.h5"])


def test_stages_equal_keras_model(files, backbone):
  # Non-square, not a multiple of 32: exercises padding and strides.
  images = _images(0, (2, 40, 36, 2))
  ours = jax.jit(lambda p, im: resnet50.stages(
      p, resnet50.channel_inputs(im)))(backbone.params, images)
  ref = _keras_stages(files["model"], images)
  assert [ours[l].shape for l in resnet50.STAGES] == [
      (4, 10, 9, 256), (4, 5, 5, 512), (4, 3, 3, 1024), (4, 2, 2, 2048)]
  for layer in resnet50.STAGES:
    got, want = np.asarray(ours[layer]), ref[layer]
    scale = np.abs(want).max()
    assert scale > 1e-2, layer   # not a dead network
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale,
                               err_msg=layer)
  # Only as deep as asked.
  shallow = resnet50.stages(backbone.params,
                            resnet50.channel_inputs(images[:1, :32, :32]),
                            ["conv2_block3_out"])
  assert list(shallow) == ["conv2_block3_out"]
  with pytest.raises(ValueError, match="unknown ResNet-50 stage"):
    resnet50.stages(backbone.params, images, ["conv6_block1_out"])


def test_preprocessing_is_keras_caffe_mode():
  images = _images(1, (2, RES, RES, 3))
  ours = np.asarray(resnet50.channel_inputs(images))
  keras = keras_weights.keras()
  gray = np.moveaxis(images, -1, 1).reshape(6, RES, RES)
  ref = keras.applications.resnet50.preprocess_input(
      np.repeat(((gray + 1.0) * 127.5)[..., None], 3, axis=-1))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  # Row n * C + c is channel c of image n.
  np.testing.assert_allclose(ours[4, ..., 0],
                             (images[1, ..., 1] + 1) * 127.5 - 103.939,
                             rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["weights.h5", "keras"])
def test_weights_file_reloads_identically(files, kind):
  expected = keras_weights.params_from_keras(files["model"])
  loaded = resnet50.load(files["paths"][kind])
  assert loaded.weights == os.path.abspath(files["paths"][kind])
  assert not loaded.is_random
  assert sorted(loaded.params) == sorted(expected)
  assert set(expected["conv2_block1_1_conv"]) == {"kernel", "bias"}
  for name, arrays in expected.items():
    for k, v in arrays.items():
      np.testing.assert_array_equal(loaded.params[name][k], v)
  images = _images(2, (1, RES, RES, 2))
  a = resnet50.perceptual_features(loaded.params, images)
  b = resnet50.perceptual_features(expected, images)
  for layer in resnet50.PERCEPTUAL_LAYERS:
    np.testing.assert_array_equal(np.asarray(a[layer]), np.asarray(b[layer]))


def test_random_weights_are_seeded_and_labelled():
  a = resnet50.load("none", seed=1)
  b = resnet50.load("random", seed=1)
  assert a.weights == b.weights == "random" and a.is_random and a.seed == 1
  assert "not ImageNet" in a.label
  np.testing.assert_array_equal(a.params["conv1_conv"]["kernel"],
                                b.params["conv1_conv"]["kernel"])


def test_bad_weights_files(files, tmp_path):
  wrong = files["paths"]["wrong"]
  with pytest.raises(ValueError) as e:
    resnet50.load(wrong)
  msg = str(e.value)
  assert wrong in msg and "not ResNet-50 weights" in msg and "\n" not in msg
  missing = str(tmp_path / "nope.weights.h5")
  with pytest.raises(FileNotFoundError) as e:
    resnet50.load(missing)
  assert str(e.value) == (f"{missing}: ResNet-50 weights file not found (give "
                          f"'imagenet', 'none' or a "
                          f".weights.h5/.keras/.h5/.hdf5 file)")
  junk = tmp_path / "junk.h5"
  junk.write_bytes(b"not hdf5")
  with pytest.raises(ValueError, match="junk.h5: not ResNet-50 weights"):
    resnet50.load(str(junk))


def test_nothing_downloads_unless_imagenet(files, monkeypatch):
  from keras.src.utils import file_utils  # pylint: disable=import-outside-toplevel
  calls = []

  def no_network(*args, **kwargs):
    calls.append((args, kwargs))
    raise RuntimeError("download attempted")

  monkeypatch.setattr(file_utils, "get_file", no_network)
  resnet50.load("none")
  resnet50.load(files["paths"]["keras"])
  assert not calls
  with pytest.raises(RuntimeError, match="download attempted"):
    resnet50.load("imagenet")
  assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in str(calls[0])


def test_perceptual_loss_values(files, backbone):
  x = _images(3, (2, RES, RES, 2))
  y = np.clip(x + _images(4, x.shape) * 0.3, -1, 1)
  loss = jax.jit(resnet50.perceptual_loss)
  assert float(loss(backbone.params, x, x)) == 0.0
  got = float(loss(backbone.params, x, y))
  assert got > 0
  # Independent reference: Johnson et al.'s feature reconstruction loss on
  # the Keras model's own activations, averaged over the three stages.
  kx, ky = _keras_stages(files["model"], x), _keras_stages(files["model"], y)
  want = np.mean([np.mean((kx[l].astype(np.float64) - ky[l]) ** 2)
                  for l in resnet50.PERCEPTUAL_LAYERS])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # In bfloat16 (the TPU configs' compute dtype): close, still a float32.
  low = jax.jit(lambda p, a, b: resnet50.perceptual_loss(
      p, a, b, dtype=jnp.bfloat16))(backbone.params, x, y)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(float(low), got, rtol=0.05)
  with pytest.raises(ValueError, match="at least 32x32"):
    resnet50.perceptual_loss(backbone.params, x[:, :16, :16], y[:, :16, :16])
  with pytest.raises(ValueError, match="shapes differ"):
    resnet50.perceptual_loss(backbone.params, x, y[:1])


def test_perceptual_loss_gradient_matches_finite_difference(backbone):
  """d loss / d x along random directions, in float64, against central
  differences. A step may cross a ReLU kink somewhere in the network, which
  spoils the difference quotient (at eps 1e-4 by ~1%, at 1e-6 by up to
  ~3e-5 here), so the tolerance is 1e-3: a wrong or missing gradient path
  is off by far more."""
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                    backbone.params)
    x = jnp.asarray(_images(5, (1, RES, RES, 2)), jnp.float64)
    y = jnp.asarray(_images(6, (1, RES, RES, 2)), jnp.float64)
    loss = jax.jit(resnet50.perceptual_loss)
    grad = jax.jit(jax.grad(resnet50.perceptual_loss, argnums=1))(params, x, y)
    assert grad.shape == x.shape and grad.dtype == jnp.float64
    assert float(jnp.abs(grad).max()) > 0
    rng = np.random.default_rng(7)
    eps = 1e-6
    for _ in range(3):
      v = jnp.asarray(rng.normal(size=x.shape))
      fd = (float(loss(params, x + eps * v, y)) -
            float(loss(params, x - eps * v, y))) / (2 * eps)
      np.testing.assert_allclose(float(jnp.vdot(grad, v)), fd, rtol=1e-3)
