"""The ConvAE's optional ResNet-50 perceptual term: the hook
resolves the weights once (none = off, random = seeded and labelled, a bad
file is one line), the term is in the loss and its gradient, the ResNet stays
out of the state and the checkpoints, and metrics.jsonl and the checkpoint
meta say which weights it used. Random weights, 32x32 (ResNet-50's minimum)."""
import json
import os

import jax
import numpy as np
import pytest

import tiny
from gandl_jax import checkpoint, sharding
from gandl_jax.baselines import resnet50
from gandl_jax.baselines.convae import config as convae_config
from gandl_jax.baselines.convae import model as convae
from gandl_jax.train import loop as train_loop

RES = 32


def _config(path, **overrides):
  """tiny_convae_config at 32x32 (16 feature maps, a 16-d bottleneck)."""
  config = tiny.tiny_convae_config(path, **overrides)
  config.model.resolution = RES
  config.batch_size = 4
  return config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return tiny.make_shards(str(tmp_path_factory.mktemp("data")), RES,
                          num_shards=1, size=RES)


def _mesh():
  return sharding.make_mesh(jax.devices()[:1])


def test_hook_resolves_weights(tmp_path):
  assert convae.perceptual_loss("none", 5, resolution=RES) is None
  term = convae.perceptual_loss("random", 5, resolution=RES, seed=1)
  assert term.record["weights"] == "random" and term.record["seed"] == 1
  assert "not ImageNet" in term.record["label"]
  assert term.record["layers"] == list(resnet50.PERCEPTUAL_LAYERS)
  np.testing.assert_array_equal(
      term.params["conv1_conv"]["kernel"],
      resnet50.load("random", seed=1).params["conv1_conv"]["kernel"])
  missing = str(tmp_path / "rn.weights.h5")
  with pytest.raises(FileNotFoundError) as e:
    convae.perceptual_loss(missing, 5, resolution=RES)
  assert missing in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="at least 32x32, config.model."
                     "resolution is 16"):
    convae.perceptual_loss("random", 5, resolution=16)


def test_perceptual_term_trains_and_is_recorded(shards, tmp_path):
  """Two steps with the term, one without (same seed and data): the term is
  in the loss, its gradient changes the ConvAE's first update, and its
  weights are recorded; the ResNet is in neither state nor checkpoint."""
  mesh = _mesh()
  kimg = {"checkpoint_every_kimg": 0.004, "log_every_kimg": 0.004,
          "image_grid_every_kimg": 0.008}
  config = _config(shards, **{"loss.perceptual_weight": 0.5,
                              "loss.perceptual_weights": "random",
                              "total_kimg": 0.008, **kimg})
  workdir = tmp_path / "w"
  s = train_loop.train(config, str(workdir), mesh=mesh)
  assert s["step"] == 2
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert len(lines) == 2
  for line in lines:
    assert line["AE/perceptual_weights"] == "random"
    assert line["AE/perceptual"] > 0
    np.testing.assert_allclose(
        line["AE/loss"], line["AE/l2"] + 0.5 * line["AE/perceptual"],
        rtol=1e-5)
  model, meta = checkpoint.restore_model(str(workdir))
  assert meta["perceptual"]["weights"] == "random"
  assert "not ImageNet" in meta["perceptual"]["label"]
  assert meta["perceptual"]["layers"] == list(resnet50.PERCEPTUAL_LAYERS)
  # The ResNet is not in the checkpoint (nor in the state it restores).
  assert list(model) == [convae_config.MODEL_KEY]
  shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(model)}
  assert (7, 7, 3, 64) not in shapes
  ckpt_files = [f for _, _, fs in os.walk(workdir / "checkpoints") for f in fs]
  assert not any("conv1_conv" in f for f in ckpt_files)

  # Without the term: recorded as off; the first update differs.
  off = tmp_path / "off"
  train_loop.train(_config(shards, total_kimg=0.004, **kimg), str(off),
                   mesh=mesh)
  line = json.loads(open(off / "metrics.jsonl").readline())
  assert line["AE/perceptual_weights"] == "off" and "AE/perceptual" not in line
  np.testing.assert_allclose(line["AE/l2"], lines[0]["AE/l2"], rtol=1e-5)
  plain, meta_off = checkpoint.restore_model(str(off), 1)
  with_term, _ = checkpoint.restore_model(str(workdir), 1)
  assert meta_off["perceptual"]["weights"] == "off"
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(with_term))]
  assert max(diffs) > 1e-4, diffs


def test_missing_weights_file_stops_before_writing(shards, tmp_path):
  missing = str(tmp_path / "rn.weights.h5")
  config = _config(shards, **{"loss.perceptual_weight": 0.1,
                              "loss.perceptual_weights": missing})
  with pytest.raises(FileNotFoundError) as e:
    train_loop.train(config, str(tmp_path / "w"), mesh=_mesh())
  assert str(e.value).startswith(f"{missing}: ResNet-50 weights file not "
                                 f"found")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
