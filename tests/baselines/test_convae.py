"""The ConvAE baseline: model shapes, the loss against numpy,
training through gandl-train's loop (the loss falls; resume and kill -9 after
a checkpoint give the uninterrupted run's parameters), the bottleneck export
and its errors; the family plugs into the core through
`gandl_jax.families` alone."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import killing
import tiny
from gandl_jax import checkpoint
from gandl_jax import config as config_lib
from gandl_jax import families
from gandl_jax import images as image_lib
from gandl_jax import sharding
from gandl_jax.baselines.convae import config as convae_config
from gandl_jax.baselines.convae import inference as convae_inference
from gandl_jax.baselines.convae import model as convae
from gandl_jax.baselines.convae import train as convae_train
from gandl_jax.data import pipeline
from gandl_jax.evaluate import io as emb_io
from gandl_jax.inference import api, export, samples
from gandl_jax.model import networks
from gandl_jax.train import loop as train_loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_SITES = 256   # synthetic.generate(plates=1, wells_per_plate=16)


@pytest.fixture(scope="module")
def shards(tiny_shards):
  return tiny_shards


def _mesh():
  return sharding.make_mesh(jax.devices()[:1])


def _params(workdir, step=None):
  model, meta = checkpoint.restore_model(str(workdir), step)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(model)], meta


def test_shapes_and_residual_blocks(resolution=16):
  cfg = convae_config.model_config(resolution=resolution, channel_base=64,
                                   channel_max=16, bottleneck_dim=12)
  ae = convae.build(cfg)
  params = convae.init(jax.random.PRNGKey(0), ae)["params"]
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, resolution, resolution,
                                                 5), minval=-1, maxval=1)
  recon, z = jax.jit(ae.apply)({"params": params}, x)
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  assert z.shape == (3, 12)
  # The encoder's blocks are the discriminator's (fromrgb at the top).
  enc, dec = params["encoder"], params["decoder"]
  assert set(enc[f"b{resolution}"]) == {"fromrgb", "skip", "conv0", "conv1"}
  assert set(dec[f"b{resolution}"]) == {"skip", "conv0", "conv1"}
  top = networks.channels_at(resolution, 64, 16)
  assert dec["torgb"]["weight"].shape == (1, 1, top, 5)
  # A site's embedding depends on that site only.
  z1 = jax.jit(lambda p, x: ae.apply(p, x, method=ae.encode))(
      {"params": params}, x[:1])
  np.testing.assert_allclose(z1, z[:1], rtol=0, atol=1e-5)


def test_loss_is_mean_squared_error():
  config = tiny.tiny_convae_config()
  tr = convae_train.ConvAETrainer(config, _mesh())
  state = tr.init_state(0)
  real = jax.random.uniform(jax.random.PRNGKey(2), (8, 8, 8, 5), minval=-1,
                            maxval=1)
  loss, metrics = jax.jit(tr.loss)(state.params, real, {})
  recon = np.asarray(jax.jit(tr.ae.apply)({"params": state.params}, real)[0],
                     np.float64)
  mse = np.mean((recon - np.asarray(real, np.float64)) ** 2)
  np.testing.assert_allclose(float(loss), mse, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["AE/psnr_db"]),
                             10 * np.log10(4.0 / mse), rtol=1e-5)


def _config(path):
  # 24 iterations of 8 images, a checkpoint every 8 (steps 8, 16, 24).
  return tiny.tiny_convae_config(path, total_kimg=0.192,
                                 checkpoint_every_kimg=0.064,
                                 image_grid_every_kimg=0.192)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
  """An uninterrupted run of `_config` (through the Python API)."""
  workdir = str(tmp_path_factory.mktemp("convae") / "ref")
  s = convae_train.train(_config(shards), workdir, mesh=_mesh())
  assert s["step"] == 24 and s["reason"] == "finished"
  return workdir


def test_reconstruction_loss_falls(reference):
  lines = [json.loads(l) for l in open(os.path.join(reference,
                                                    "metrics.jsonl"))]
  l2 = [l["AE/l2"] for l in lines]
  assert len(l2) == 24 and all(np.isfinite(l2))
  first, last = np.mean(l2[:3]), np.mean(l2[-3:])
  assert last < 0.6 * first, (first, last)
  assert lines[-1]["AE/psnr_db"] > lines[0]["AE/psnr_db"] + 2
  assert "AE/grad_norm" in lines[0] and "perf/img_per_sec" in lines[0]
  # Monitoring as for the GAN: TensorBoard, a reconstruction grid, config.
  assert os.listdir(os.path.join(reference, "tb"))
  assert os.path.exists(os.path.join(reference, "samples",
                                     "reconstructions-00000024.png"))
  assert json.load(open(os.path.join(reference, "config.json")))[
      "family"] == "convae"
  assert checkpoint.list_steps(reference) == (8, 16, 24)
  _, meta = _params(reference)
  assert meta["family"] == "convae" and meta["nimg"] == 192


def test_resume_equals_uninterrupted(shards, reference, tmp_path):
  b = str(tmp_path / "b")
  assert train_loop.train(_config(shards), b, mesh=_mesh(),
                          max_steps=8)["step"] == 8
  assert checkpoint.list_steps(b) == (8,)
  assert train_loop.train(_config(shards), b, mesh=_mesh())["step"] == 24
  want, _ = _params(reference)
  got, meta = _params(b)
  assert meta["step"] == 24 and meta["data_position"] == 24
  for x, y in zip(want, got):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


@pytest.mark.e2e
def test_killed_after_checkpoint_resumes_to_uninterrupted(shards, reference,
                                                          tmp_path):
  # Killed right after the 9th iteration, every checkpoint save waited for.
  workdir = tmp_path / "w"
  code, out = killing.train(killing.config_file(tmp_path, __file__, shards),
                            workdir, "step", 9,
                            trainer=killing.CONVAE_TRAINER, timeout=600)
  assert code == -signal.SIGKILL, out[-3000:]
  assert checkpoint.list_steps(str(workdir)) == (8,)   # killed at step 9
  s = train_loop.train(_config(shards), str(workdir), mesh=_mesh())
  assert s["step"] == 24
  want, _ = _params(reference)
  got, meta = _params(workdir)
  assert meta["step"] == 24 and meta["nimg"] == 192
  for x, y in zip(want, got):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_export_equals_encoder_on_the_same_images(shards, reference, tmp_path):
  out = str(tmp_path / "convae.parquet")
  summary = export.export_embeddings(reference, shards, out, batch=16,
                                     mesh=_mesh())
  assert (summary.num_sites, summary.feature_dim) == (NUM_SITES, 16)
  assert summary.layer == "bottleneck" and summary.step == 24
  table = pq.read_table(out)
  kv = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
  assert kv["gandl.layer"] == "bottleneck" and kv["gandl.family"] == "convae"
  df = table.to_pandas()
  feats = df[[f"f{i:04d}" for i in range(16)]].to_numpy()
  assert feats.shape == (NUM_SITES, 16) and feats.dtype == np.float32
  # Direct: the checkpoint's parameters, the encoder applied to the shards'
  # images read in order.
  model, meta = checkpoint.restore_model(reference)
  ae = convae.build(meta["model"])
  it, _ = pipeline.eval_host_batches(shards, host_batch=64)
  images, ids = [], []
  for b in it:
    images.append(b["image"][b["valid"]])
    ids += list(b["site_id"][b["valid"]])
  images = np.concatenate(images)
  want = jax.jit(lambda p, x: ae.apply(p, image_lib.to_float(x),
                                       method=ae.encode))(
      {"params": model["convae"]["params"]}, jnp.asarray(images))
  assert list(df["site_id"]) == ids
  np.testing.assert_allclose(feats, np.asarray(want), rtol=1e-5, atol=1e-5)
  # gandl_jax.load gives the ConvAE model; its embed is the same.
  loaded = api.load(reference)
  assert isinstance(loaded, convae_inference.ConvAEModel)
  np.testing.assert_allclose(loaded.embed(images[:5]), feats[:5], rtol=1e-5,
                             atol=1e-5)
  assert loaded.reconstruct(images[:5]).shape == images[:5].shape
  with pytest.raises(ValueError, match="has no generator"):   # gandl-generate
    samples.save_samples(loaded, str(tmp_path / "x.png"), [0])
  # gandl-evaluate reads it as a set.
  emb = emb_io.read_embeddings_file(out)
  assert emb.dim == 16 and len(emb.meta) == NUM_SITES


def _cli(argv, capsys):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from gandl_jax.cli import export as cli  # pylint: disable=import-outside-toplevel
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  return e.value.code, capsys.readouterr()


def test_cli_export_and_errors(shards, reference, tmp_path, capsys):
  out = tmp_path / "cli.csv"
  code, cap = _cli(["gandl-export", "--workdir", reference, "--data", shards,
                    "--output", str(out), "--batch", "8"], capsys)
  assert code == 0, cap.err
  df = pd.read_csv(out)
  assert df.shape == (NUM_SITES, 17) and df.columns[-1] == "f0015"
  assert json.loads(cap.out.strip().splitlines()[-1])["layer"] == "bottleneck"
  # A workdir without a checkpoint: one line naming it, nothing written.
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  code, cap = _cli(["gandl-export", "--workdir", str(empty), "--data", shards,
                    "--output", str(tmp_path / "x.parquet")], capsys)
  err = [l for l in cap.err.splitlines() if l.startswith("gandl-export:")]
  assert code == 1 and len(err) == 1, cap.err
  assert "no checkpoints found" in err[0] and str(empty) in err[0]
  assert not os.path.exists(tmp_path / "x.parquet")
  # A GAN layer name on a ConvAE: one line listing the ConvAE's layers.
  code, cap = _cli(["gandl-export", "--workdir", reference, "--data", shards,
                    "--output", str(tmp_path / "y.parquet"), "--layer", "fc"],
                   capsys)
  err = [l for l in cap.err.splitlines() if l.startswith("gandl-export:")]
  assert code == 1 and len(err) == 1 and "['bottleneck']" in err[0], cap.err


def test_config_errors(shards, tmp_path):
  mesh = _mesh()
  # The perceptual term needs ResNet-50's 32x32 (more in
  # tests/baselines/test_convae_perceptual.py); refused before anything is written.
  config = tiny.tiny_convae_config(shards, **{
      "loss.perceptual_weight": 0.1, "loss.perceptual_weights": "random"})
  with pytest.raises(ValueError, match="at least 32x32"):
    train_loop.train(config, str(tmp_path / "p"), mesh=mesh)
  assert not os.path.exists(tmp_path / "p" / "checkpoints")
  config = tiny.tiny_convae_config(shards, **{"loss.perceptual_weight": 0.1})
  with pytest.raises(ValueError, match="needs a perceptual network"):
    train_loop.train(config, str(tmp_path / "p"), mesh=mesh)
  # Unknown keys (a GAN key in a ConvAE config) are named.
  config = tiny.tiny_convae_config(shards)
  config.loss.r1_gamma = 1.0
  with pytest.raises(ValueError, match="unknown key 'config.loss.r1_gamma'"):
    train_loop.train(config, str(tmp_path / "q"), mesh=mesh)
  # A GAN workdir is not resumed as a ConvAE (nor the reverse).
  gan = str(tmp_path / "gan")
  train_loop.train(tiny.train_config(shards), gan, mesh=mesh, max_steps=2)
  with pytest.raises(ValueError, match="belongs to a 'gan' run but the config "
                     "trains a 'convae' model"):
    train_loop.train(tiny.tiny_convae_config(shards), gan, mesh=mesh)
  assert checkpoint.list_steps(gan) == (2,)


def test_named_configs_validate():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "convae_rxrx19a", os.path.join(REPO, "configs", "convae_rxrx19a.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for arg, res, dim in (("256", 256, 1024), ("512", 512, 1024),
                        ("256,runlocal", 256, 1024), ("demo", 32, 128)):
    config = mod.get_config(arg)
    config_lib.validate(config)
    assert families.name(config) == "convae"
    assert (config.model.resolution, config.model.bottleneck_dim) == (res, dim)
  assert convae_config.demo_config("x", resolution=8).model.resolution == 8
  with pytest.raises(ValueError, match="resolution must be one of"):
    mod.get_config("128")
  with pytest.raises(ValueError, match="not a ConvAE config"):
    convae_train.train(tiny.tiny_config(""), "/nonexistent")


@pytest.mark.e2e
def test_load_finds_the_family_by_name(reference):
  """`gandl_jax.load` on a ConvAE workdir from a fresh interpreter: the core
  imports the baselines by name only when the checkpoint names the family."""
  code = ("import sys, gandl_jax\n"
          "from gandl_jax import checkpoint\n"
          "assert 'gandl_jax.baselines.convae' not in sys.modules\n"
          f"m = gandl_jax.load({reference!r})\n"
          "assert 'gandl_jax.baselines.convae' in sys.modules\n"
          "print(type(m).__name__, m.bottleneck_dim, m.step)\n")
  proc = subprocess.run([sys.executable, "-c", code],
                        env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[-3:] == ["ConvAEModel", "16", "24"]
  for name in ("nope", "no such"):
    with pytest.raises(ValueError, match=f"unknown model family '{name}'.*"
                       "'gan', 'convae'"):
      families.get(name)


def test_core_has_no_convae_branches():
  """The core reaches the ConvAE only through `gandl_jax.families`: no name,
  attribute or string (docstrings aside) of the core code mentions it."""
  import ast  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  package = pathlib.Path(REPO) / "gandl_jax"
  core = [package / f for f in ("checkpoint.py", "config.py", "families.py")]
  core += sorted((package / "train").glob("*.py"))
  core += sorted((package / "inference").glob("*.py"))
  found = []
  for path in core:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr)}
    for node in ast.walk(tree):
      text = (node.id if isinstance(node, ast.Name) else
              node.attr if isinstance(node, ast.Attribute) else
              node.value if isinstance(node, ast.Constant) and isinstance(
                  node.value, str) and id(node) not in docstrings else "")
      if "convae" in text.lower():
        found.append(f"{path.relative_to(package)}:{node.lineno}: {text!r}")
  assert not found, found
  assert len(core) >= 10
