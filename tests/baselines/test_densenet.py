"""DenseNet-121 baseline: features equal Keras' own model on the same inputs,
weights files reload exactly, bad files fail in one line, nothing downloads
unless 'imagenet' is asked for, the export covers every site once in
gandl-export's layout. Random weights and 32x32 images throughout."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gandl_jax import sharding
from gandl_jax.baselines import densenet
from gandl_jax.data import convert, pipeline, synthetic
from gandl_jax.evaluate import io as emb_io

RES = 32


def _keras():
  return densenet._keras()  # pylint: disable=protected-access


def _randomize(model, seed):
  """Every variable random, BN statistics included (Keras' init leaves
  mean 0 / variance 1, which would hide a BN folding error)."""
  rng = np.random.default_rng(seed)
  for v in model.weights:
    if "moving_variance" in v.path:
      x = rng.uniform(0.5, 2.0, v.shape)
    elif "moving_mean" in v.path or "beta" in v.path:
      x = rng.normal(0.0, 0.1, v.shape)
    elif "gamma" in v.path:
      x = rng.uniform(0.5, 1.5, v.shape)
    else:
      x = v.numpy()
    v.assign(x.astype(np.float32))


def _keras_reference(model, images):
  """Keras' own pipeline: preprocess_input on the channel replicated to RGB,
  model.predict, global average pool, channels concatenated."""
  keras = _keras()
  out = []
  for c in range(images.shape[-1]):
    rgb = np.repeat(images[..., c:c + 1], 3, axis=-1).astype(np.float32)
    x = keras.applications.densenet.preprocess_input(rgb)
    fmap = model.predict(x, batch_size=64, verbose=0)
    assert fmap.shape[-1] == densenet.FEATURE_DIM
    out.append(fmap.mean(axis=(1, 2)))
  return np.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("weights")
  model = densenet.keras_model(None, seed=3)
  _randomize(model, 3)
  paths = {"weights.h5": str(d / "dn.weights.h5"), "keras": str(d / "dn.keras")}
  model.save_weights(paths["weights.h5"])
  model.save(paths["keras"])
  keras = _keras()
  other = keras.applications.MobileNetV2(include_top=False, weights=None,
                                         input_shape=(None, None, 3),
                                         alpha=0.35)
  paths["wrong"] = str(d / "mobilenet.weights.h5")
  other.save_weights(paths["wrong"])
  return dict(model=model, paths=paths, dir=d)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("dn_data")
  src = synthetic.generate(str(root / "src"), size=RES, plates=1,
                           wells_per_plate=16, workers=1)
  out = str(root / "shards")
  convert.convert("rxrx19a", src, out, resolution=RES, num_shards=3)
  return out


def test_features_equal_keras_model(files):
  backbone = densenet.load_backbone(files["paths"]["weights.h5"])
  images = np.random.default_rng(0).integers(0, 256, (3, RES, RES, 5),
                                             dtype=np.uint8)
  feats = densenet.densenet_concat_features(images, backbone, batch=2)
  assert feats.shape == (3, 5 * 1024) and feats.dtype == np.float32
  ref = _keras_reference(files["model"], images)
  np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
  # Pooling: channel c's block is the spatial mean of its feature map.
  import jax  # pylint: disable=import-outside-toplevel
  fmap = np.asarray(jax.jit(lambda p, im: densenet.feature_map(
      p, densenet.channel_inputs(im)))(backbone.params, images[:1]))
  assert fmap.shape == (5, 1, 1, 1024)   # 32 / 32
  np.testing.assert_allclose(feats[0].reshape(5, 1024), fmap.mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  # Channel order: permuting the channels permutes the blocks.
  perm = densenet.densenet_concat_features(images[..., ::-1], backbone, batch=2)
  np.testing.assert_allclose(perm.reshape(3, 5, 1024)[:, ::-1],
                             feats.reshape(3, 5, 1024), rtol=1e-5, atol=1e-6)


def test_resize_and_preprocess():
  gray = np.random.default_rng(1).random((2, 48, 48)).astype(np.float32)
  rgb = np.asarray(densenet.pseudo_rgb(gray))
  keras = _keras()
  ref = keras.applications.densenet.preprocess_input(
      np.repeat(gray[..., None] * 255.0, 3, axis=-1))
  np.testing.assert_allclose(rgb, ref, rtol=1e-5, atol=1e-5)
  assert densenet.resize(gray, 48) is gray
  assert densenet.resize(gray, 32).shape == (2, 32, 32)
  with pytest.raises(ValueError, match="at least 32x32"):
    densenet.check_image_size(None, 16)


@pytest.mark.parametrize("kind", ["weights.h5", "keras"])
def test_weights_file_reloads_identically(files, kind):
  expected = densenet.params_from_keras(files["model"])
  backbone = densenet.load_backbone(files["paths"][kind])
  assert backbone.weights == os.path.abspath(files["paths"][kind])
  assert not backbone.is_random
  assert sorted(backbone.params) == sorted(expected)
  for name, arrays in expected.items():
    for k, v in arrays.items():
      np.testing.assert_array_equal(backbone.params[name][k], v)


def test_random_weights_are_seeded_and_labelled():
  a = densenet.load_backbone("none", seed=1)
  b = densenet.load_backbone("random", seed=1)
  assert a.weights == b.weights == "random" and a.is_random and a.seed == 1
  assert "not ImageNet" in a.label
  np.testing.assert_array_equal(a.params["conv1_conv"]["kernel"],
                                b.params["conv1_conv"]["kernel"])


def test_bad_weights_files(files, tmp_path):
  wrong = files["paths"]["wrong"]
  with pytest.raises(ValueError) as e:
    densenet.load_backbone(wrong)
  msg = str(e.value)
  assert wrong in msg and "not DenseNet-121 weights" in msg and "\n" not in msg
  missing = str(tmp_path / "nope.weights.h5")
  with pytest.raises(FileNotFoundError) as e:
    densenet.load_backbone(missing)
  assert missing in str(e.value) and "\n" not in str(e.value)
  junk = tmp_path / "junk.h5"
  junk.write_bytes(b"not hdf5")
  with pytest.raises(ValueError, match="junk.h5: not DenseNet-121 weights"):
    densenet.load_backbone(str(junk))


def test_nothing_downloads_unless_imagenet(files, monkeypatch):
  from keras.src.utils import file_utils  # pylint: disable=import-outside-toplevel
  calls = []

  def no_network(*args, **kwargs):
    calls.append((args, kwargs))
    raise RuntimeError("download attempted")

  monkeypatch.setattr(file_utils, "get_file", no_network)
  densenet.load_backbone("none")
  densenet.load_backbone(files["paths"]["keras"])
  assert not calls
  with pytest.raises(RuntimeError, match="download attempted"):
    densenet.load_backbone("imagenet")
  assert "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5" in str(
      calls[0])


def test_export_every_site_once(files, shards, tmp_path):
  out = tmp_path / "concat.parquet"
  backbone = densenet.load_backbone(files["paths"]["weights.h5"])
  mesh = sharding.make_mesh()                      # 8 simulated devices
  s = densenet.export_concat(shards, str(out), backbone=backbone, batch=16,
                             mesh=mesh)
  assert s["num_sites"] == 256 and s["feature_dim"] == 5120
  assert s["num_batches"] == 16
  t = pq.read_table(out)
  sites = pd.read_csv(os.path.join(shards, "sites.csv"), dtype=str,
                      keep_default_na=False)
  assert t.column("site_id").to_pylist() == sites["site_id"].tolist()
  assert t.column_names[:11] == list(pipeline.schema.RXRX19A_COLUMNS)
  assert t.column_names[11] == "f0000" and t.column_names[-1] == "f5119"
  meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
  assert meta["gandl.layer"] == "densenet121_concat"
  assert meta["gandl.weights"] == os.path.abspath(files["paths"]["weights.h5"])
  assert meta["gandl.image_size"] == str(RES)
  # The features are Keras' own on the same images.
  it, _ = pipeline.eval_host_batches(shards, host_batch=256)
  b = next(it)
  assert b["valid"].all() and list(b["site_id"]) == sites["site_id"].tolist()
  feats = np.stack([t.column(f"f{j:04d}").to_numpy() for j in range(5120)], 1)
  ref = _keras_reference(files["model"], b["image"])
  np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(FileExistsError, match="already exists"):
    densenet.export_concat(shards, str(out), backbone=backbone, batch=16,
                           mesh=mesh)
  # gandl-evaluate reads it as an embeddings set.
  # Columns constant over the sites (ReLU features that never fire on these
  # tiny images) are dropped and named; every other column is kept.
  emb = emb_io.load_embeddings(str(out))
  constant = int((feats.max(axis=0) == feats.min(axis=0)).sum())
  assert emb.dim == 5120 - constant and len(emb.meta) == 256
  if constant:
    assert any(f"{constant} constant feature column(s) dropped" in i
               for i in emb.issues), emb.issues
  assert emb.file_metadata["gandl.layer"] == "densenet121_concat"


@pytest.mark.e2e
def test_cli_errors_are_one_line(shards, tmp_path):
  missing = str(tmp_path / "missing.weights.h5")
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.features", "--method",
       "densenet_concat", "--data", shards, "--output",
       str(tmp_path / "o.parquet"), "--weights", missing],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert r.returncode == 1, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("gandl-features:")]
  assert err == [f"gandl-features: error: {missing}: DenseNet-121 weights "
                 f"file not found (give 'imagenet', 'none' or a "
                 f".weights.h5/.keras/.h5/.hdf5 file)"], r.stderr[-2000:]
  assert not (tmp_path / "o.parquet").exists()
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.features", "--method", "nope",
       "--data", shards, "--output", str(tmp_path / "o.parquet")],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert r.returncode != 0 and "densenet_concat" in r.stderr
