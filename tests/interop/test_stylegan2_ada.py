"""Importer (gandl-import), model checkpoints, the public
API (gandl_jax.load / Model), composites and gandl-generate.

Uses the reference fixture tests/fixtures/parity_32.npz (weights and outputs of
stylegan2-ada-pytorch, see tools/make_parity_fixtures.py); torch is not needed.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gandl_jax import checkpoint
from gandl_jax import images as image_lib
from gandl_jax.inference import export
from gandl_jax.inference import samples
from gandl_jax.interop import stylegan2_ada
from gandl_jax import schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "parity_32.npz")


def _load_importer():
  return stylegan2_ada


imp = _load_importer()


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURE, allow_pickle=False))


@pytest.fixture(scope="module")
def sds():
  return imp.load_state_dicts(FIXTURE)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sds):
  wd = str(tmp_path_factory.mktemp("imported"))
  # G_ema differs from G so that the API's use of G_ema is observable.
  sds = dict(sds)
  sds["G_ema"] = dict(sds["G"])
  sds["G_ema"]["mapping.w_avg"] = sds["G"]["mapping.w_avg"] + 1.0
  imp.import_to_workdir(sds, {"mbstd_group_size": 4}, wd,
                        "/x/network-snapshot-000120.pkl", step=3)
  return wd


# ----------------------------------------------------------------------------
# Architecture inference.


@pytest.mark.parametrize("res,base,cmax", [
    (256, 16384, 512), (32, 512, 64), (64, 16384, 512), (1024, 32768, 512),
    (32, 1024, 128)])
def test_channel_base_max_roundtrip(res, base, cmax):
  channels = {r: min(base // r, cmax) for r in (2**i for i in range(
      2, int(np.log2(res)) + 1))}
  b, m = imp._channels_to_base_max(channels)
  assert m == max(channels.values())
  assert all(min(b // r, m) == c for r, c in channels.items())
  if any(c < cmax for c in channels.values()):
    assert (b, m) == (base, cmax)


def test_channel_counts_not_stylegan_refused():
  with pytest.raises(ValueError, match="channel_base"):
    imp._channels_to_base_max({4: 64, 8: 64, 16: 48, 32: 8})


def test_infer_config_from_tensors(sds, ref):
  cfg = imp.infer_model_config(sds, {"mbstd_group_size": 4})
  assert cfg == json.loads(str(ref["config_json"]))


def test_layout_transposes():
  w = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)  # OIHW
  hwio = imp.torch_to_ours("b8.conv0.weight", w)
  assert hwio.shape == (3, 3, 3, 2) and hwio[2, 1, 0, 1] == w[1, 0, 2, 1]
  d = np.arange(6, dtype=np.float32).reshape(2, 3)  # (out, in)
  assert imp.torch_to_ours("b4.fc.weight", d)[2, 1] == d[1, 2]
  c = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
  assert imp.torch_to_ours("synthesis.b4.const", c)[3, 1, 0] == c[0, 3, 1]
  assert imp.torch_to_ours("x.noise_strength", np.float32(2.0)).shape == ()


def test_refuses_conditional(sds):
  g = dict(sds["G"])
  g["mapping.embed.weight"] = np.zeros((64, 10), np.float32)
  with pytest.raises(ValueError, match="conditional"):
    imp.infer_model_config({"G": g, "D": sds["D"]})
  d = dict(sds["D"])
  d["mapping.fc0.weight"] = np.zeros((64, 10), np.float32)
  with pytest.raises(ValueError, match="conditional"):
    imp.infer_model_config({"G": sds["G"], "D": d})


def test_refuses_other_architectures(sds):
  g = {k: v for k, v in sds["G"].items()
       if not k.startswith("synthesis.b8.torgb.")}
  with pytest.raises(ValueError, match="skip"):
    imp.infer_model_config({"G": g, "D": sds["D"]})
  d = {k: v for k, v in sds["D"].items() if not k.startswith("b16.skip.")}
  with pytest.raises(ValueError, match="resnet"):
    imp.infer_model_config({"G": sds["G"], "D": d})


def test_unmappable_keys_listed(sds):
  g = dict(sds["G"])
  g["synthesis.b8.conv0.extra_thing"] = np.zeros(3, np.float32)
  del g["synthesis.b16.conv1.noise_strength"]
  with pytest.raises(ValueError) as e:
    imp.convert({"G": g, "D": sds["D"]})
  msg = str(e.value)
  assert "synthesis.b8.conv0.extra_thing" in msg
  assert "synthesis.b16.conv1.noise_strength" in msg


def test_convert_values_and_skips_filters(sds):
  model, cfg = imp.convert(sds, {"mbstd_group_size": 4})
  assert cfg["resolution"] == 32
  g = model["G"]
  np.testing.assert_array_equal(g["buffers"]["mapping"]["w_avg"],
                                sds["G"]["mapping.w_avg"])
  np.testing.assert_array_equal(
      g["buffers"]["synthesis"]["b16"]["conv0"]["noise_const"],
      sds["G"]["synthesis.b16.conv0.noise_const"])
  np.testing.assert_array_equal(
      g["params"]["mapping"]["fc1"]["weight"],
      sds["G"]["mapping.fc1.weight"].T)
  np.testing.assert_array_equal(
      model["D"]["params"]["b4"]["fc"]["weight"], sds["D"]["b4.fc.weight"].T)
  assert any(k.endswith("resample_filter") for k in sds["G"])
  assert "resample_filter" not in json.dumps(
      {k: list(v) for k, v in g["params"]["synthesis"]["b8"].items()})
  # No G_ema given: G's weights.
  np.testing.assert_array_equal(
      model["G_ema"]["params"]["synthesis"]["b4"]["const"],
      g["params"]["synthesis"]["b4"]["const"])


def test_kimg_from_filename():
  assert imp.kimg_from_filename("a/network-snapshot-001234.pkl") == 1234.0
  assert imp.kimg_from_filename("model.pt") is None


# ----------------------------------------------------------------------------
# Checkpoints.


def test_checkpoint_roundtrip_and_resolution(workdir, sds):
  model, meta = checkpoint.restore_model(workdir)
  assert meta["source"] == "import_stylegan2_ada"
  assert meta["step"] == 3 and meta["kimg"] == 120.0
  assert meta["model"]["channel_base"] == 512
  np.testing.assert_array_equal(
      np.asarray(model["D"]["params"]["b32"]["conv1"]["weight"]),
      sds["D"]["b32.conv1.weight"].transpose(2, 3, 1, 0))
  for path in (checkpoint.checkpoint_dir(workdir),
               os.path.join(workdir, "checkpoints", "3")):
    _, m2 = checkpoint.restore_model(path)
    assert m2["step"] == 3
  assert checkpoint.list_steps(workdir) == (3,)
  with pytest.raises(FileNotFoundError, match="step 9"):
    checkpoint.restore_model(workdir, step=9)


def test_checkpoint_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.restore_model(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoint.restore_model(tmp_path / "empty")
  with pytest.raises(ValueError, match="missing"):
    checkpoint.save_model(tmp_path / "c", 0, {"G": {}}, {"model": {}})


def test_checkpoint_falls_back_to_previous_step(tmp_path):
  tree = {"params": {"w": np.ones((2, 2), np.float32)},
          "buffers": {"b": np.zeros(2, np.float32)}}
  model = {"G": tree, "G_ema": tree,
           "D": {"params": {"w": np.arange(3, dtype=np.float32)}}}
  d = checkpoint.checkpoint_dir(tmp_path)
  checkpoint.save_model(d, 1, model, {"model": {"x": 1}})
  checkpoint.save_model(d, 2, model, {"model": {"x": 2}})
  with pytest.raises(FileExistsError):
    checkpoint.save_model(d, 2, model, {"model": {"x": 2}})
  _, meta = checkpoint.restore_model(tmp_path)
  assert meta["model"] == {"x": 2}
  # Damage the latest step: refused, unless falling back is allowed; then
  # the previous one is used and meta says why.
  for root, _, files in os.walk(str(d / "2" / "model")):
    for name in files:
      with open(os.path.join(root, name), "w") as fh:
        fh.write("garbage")
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=r"step 2, is unreadable.*older steps: \[1\]"):
    checkpoint.restore_model(tmp_path)
  _, meta = checkpoint.restore_model(tmp_path, allow_fallback=True)
  assert meta["model"] == {"x": 1} and meta["step"] == 1
  assert meta["fallback"]["latest_step"] == 2
  _, meta = checkpoint.restore_model(tmp_path, step=1)
  assert "fallback" not in meta
  with pytest.raises(Exception):
    checkpoint.restore_model(tmp_path, step=2)


# ----------------------------------------------------------------------------
# Public API.


@pytest.fixture(scope="module")
def model(workdir):
  import gandl_jax
  return gandl_jax.load(workdir, batch_size=8)


def test_api_generate_matches_reference(model, ref, sds):
  assert model.step == 3 and model.config["resolution"] == 32
  # G_ema has w_avg + 1: psi=1 is unaffected by w_avg and equals the
  # reference G; psi=0.7 must differ from the reference (G_ema is used).
  imgs = model.generate(z=ref["z"], truncation_psi=1.0)
  expected = np.clip(ref["g_img_psi1"] * 127.5 + 128, 0, 255).astype(np.uint8)
  assert imgs.dtype == np.uint8 and imgs.shape == expected.shape
  assert np.abs(imgs.astype(int) - expected).max() <= 1
  f = model.generate_float(z=ref["z"][:3], truncation_psi=1.0)
  assert np.abs(f - ref["g_img_psi1"][:3]).max() < 1e-4
  f07 = model.generate_float(z=ref["z"][:3], truncation_psi=0.7)
  assert np.abs(f07 - ref["g_img_psi07"][:3]).max() > 1e-2


def test_api_seeds_convention(model):
  z = np.random.RandomState(5).randn(1, model.z_dim)
  a = model.generate(seeds=[5, 6])
  b = model.generate(z=np.concatenate([z, np.random.RandomState(6).randn(
      1, model.z_dim)]))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(model.generate(seeds=5), a[:1])
  r1 = model.generate(seeds=[5], noise_mode="random", noise_seed=1)
  r2 = model.generate(seeds=[5], noise_mode="random", noise_seed=2)
  assert not np.array_equal(r1, r2)
  with pytest.raises(ValueError, match="exactly one"):
    model.generate()
  with pytest.raises(ValueError, match="noise_mode"):
    model.generate(seeds=[1], noise_mode="bogus")
  # More seeds than one batch (batch_size 8), with a partial last batch.
  many = model.generate(seeds=range(11))
  np.testing.assert_array_equal(many[5:7], a)


def test_api_discriminate_and_embed(model, ref):
  u8 = np.clip(np.rint((ref["d_img"] + 1) * 127.5), 0, 255).astype(np.uint8)
  logits = model.discriminate(u8)
  fc = model.embed(u8)
  assert logits.shape == (8,) and logits.dtype == np.float32
  assert fc.shape == (8, 64) and fc.dtype == np.float32
  # Same normalization as training: equals D on u8 / 127.5 - 1 directly.
  from gandl_jax.model import networks
  _, D = networks.build(model.config)
  x = u8.astype(np.float32) / 127.5 - 1
  wd_vars = model.d_variables
  ref_logits, feats = D.apply(wd_vars, x, return_features=True)
  np.testing.assert_allclose(logits, np.asarray(ref_logits)[:, 0], atol=1e-5)
  np.testing.assert_allclose(fc, np.asarray(feats["fc"]), atol=1e-5)
  # Quantization to uint8 moves D by little; the reference on float images.
  assert np.abs(fc - ref["d_fc"]).max() < 0.2
  # Other layers, and a batch padded up to the group size.
  b16 = model.embed(u8[:5], layer="b16")
  assert b16.shape == (5, 64)  # output of b16 has the 8x8 channel count
  with pytest.raises(ValueError, match="unknown layer"):
    model.embed(u8, layer="nope")


def test_api_input_errors(model):
  with pytest.raises(TypeError, match="uint8"):
    model.embed(np.zeros((2, 32, 32, 5), np.float32))
  with pytest.raises(ValueError, match=r"\(N, 32, 32, 5\)"):
    model.embed(np.zeros((2, 64, 64, 5), np.uint8))
  with pytest.raises(ValueError, match="5 channels"):
    model.discriminate(np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="single image"):
    model.discriminate(np.zeros((32, 32, 5), np.uint8))


# ----------------------------------------------------------------------------
# Composites and gandl-generate.


def test_composite_bgr_and_rxrx():
  img = np.zeros((1, 2, 2, 5), np.uint8)
  img[0, 0, 0] = [200, 10, 20, 30, 40]   # hoechst, cona, phall, syto, wga
  rgb = image_lib.to_rgb(img, "bgr")
  assert rgb.shape == (1, 2, 2, 3)
  assert tuple(rgb[0, 0, 0]) == (30, 20, 200)  # R=(20+40)/2 G=(10+30)/2 B
  assert tuple(image_lib.to_rgb(img[0], "bgr")[0, 0]) == (30, 20, 200)
  # rxrx1-utils: channel 1 alone at value 51 (its full range) gives its colour.
  one = np.zeros((1, 1, 5), np.uint8)
  one[0, 0, 0] = 51
  assert tuple(image_lib.to_rgb(one, "rxrx")[0, 0]) == (19, 0, 249)
  # Independent numpy of the rxrx formula on random data.
  rng = np.random.RandomState(0)
  x = rng.randint(0, 256, (4, 4, 5)).astype(np.uint8)
  colours = np.array([[19, 0, 249], [42, 255, 31], [255, 0, 25],
                      [45, 255, 252], [250, 0, 253]], float)
  hi = np.array([51, 107, 64, 191, 89], float)
  want = np.zeros((4, 4, 3), int)
  for c in range(5):
    s = np.minimum(x[..., c] / hi[c], 1.0)
    want += (s[..., None] * colours[c]).astype(int)
  np.testing.assert_array_equal(image_lib.to_rgb(x, "rxrx"),
                                np.minimum(want, 255))
  with pytest.raises(ValueError, match="channels"):
    image_lib.to_rgb(np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(ValueError, match="style"):
    image_lib.to_rgb(img, "nope")
  assert [c.index for c in schema.RXRX19A_CHANNELS] == [1, 2, 3, 4, 5]


def test_grid_and_strip():
  imgs = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
  g = image_lib.grid(imgs, cols=2, pad=1)
  assert g.shape == (5, 5)
  np.testing.assert_array_equal(g[3:5, 0:2], imgs[2])
  assert g[3, 3] == 0
  s = image_lib.channel_strip(np.stack([imgs] * 5, -1)[:, :, :, :5], pad=1)
  assert s.shape == (3, 2, 5 * 2 + 4)
  np.testing.assert_array_equal(s[1, :, 3:5], imgs[1])


def test_parse_seeds():
  from gandl_jax import cli
  assert cli.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
  with pytest.raises(ValueError, match="seeds"):
    cli.parse_seeds("a-b")
  with pytest.raises(ValueError, match="seeds"):
    cli.parse_seeds("5-2")


def test_save_samples(model, tmp_path):
  from PIL import Image
  out = tmp_path / "s.npz"
  samples.save_samples(model, str(out), [0, 1, 2])
  with np.load(out) as z:
    np.testing.assert_array_equal(z["images"], model.generate(seeds=[0, 1, 2]))
    assert list(z["seeds"]) == [0, 1, 2]
  png = tmp_path / "g.png"
  samples.save_samples(model, str(png), [0, 1, 2, 3], view="rxrx", cols=2)
  assert Image.open(png).size == (2 * 32 + 2, 2 * 32 + 2)
  raw = tmp_path / "raw.png"
  samples.save_samples(model, str(raw), [0, 1], view="raw")
  im = np.asarray(Image.open(raw))
  assert im.shape == (2 * 32 + 2, 5 * 32 + 4 * 2)
  np.testing.assert_array_equal(im[:32, 34:66],
                                model.generate(seeds=[0])[0, :, :, 1])
  with pytest.raises(ValueError, match=".png or .npz"):
    samples.save_samples(model, str(tmp_path / "x.jpg"), [0])
  assert sorted(os.listdir(tmp_path)) == ["g.png", "raw.png", "s.npz"]


@pytest.mark.e2e
def test_import_cli_end_to_end(tmp_path):
  """The tool as users run it (--state_dicts .npz path, no torch)."""
  wd = tmp_path / "wd"
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.import_weights",
       "--state_dicts", FIXTURE, "--workdir", str(wd)],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert '"channel_max": 64' in r.stdout
  _, meta = checkpoint.restore_model(wd)
  assert meta["source"] == "import_stylegan2_ada" and meta["step"] == 0
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.import_weights",
       "--state_dicts", str(tmp_path / "missing.pt"), "--workdir", str(wd)],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert r.returncode != 0 and "does not exist" in r.stderr


def test_load_training_style_checkpoint(tmp_path, workdir, model):
  """A checkpoint as training writes it (arrays sharded over an 8-device
  mesh, an extra `train` item) loads through the same API."""
  import jax
  import orbax.checkpoint as ocp
  variables, meta = checkpoint.restore_model(workdir)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.tree_util.tree_map(lambda x: jax.device_put(x, repl),
                                   variables)
  meta = dict(meta, source="gandl-train", step=7)
  with ocp.CheckpointManager(checkpoint.checkpoint_dir(tmp_path),
                             item_names=("model", "train", "meta")) as mngr:
    mngr.save(7, args=ocp.args.Composite(
        model=ocp.args.StandardSave(sharded),
        train=ocp.args.StandardSave({"opt": jax.device_put(
            np.ones(16, np.float32), jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec("data")))}),
        meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
  import gandl_jax
  m = gandl_jax.load(tmp_path, batch_size=8)
  assert m.step == 7 and m.meta["source"] == "gandl-train"
  np.testing.assert_array_equal(m.generate(seeds=[1, 2]),
                                model.generate(seeds=[1, 2]))


def test_sharded_embed_matches_embed(model, ref):
  """export.sharded_embed_fn on an 8-device mesh == Model.embed on one batch."""
  import jax
  from gandl_jax import sharding
  mesh = sharding.make_mesh(jax.devices()[:8])
  u8 = np.clip(np.rint((ref["d_img"] + 1) * 127.5), 0, 255).astype(np.uint8)
  fn = export.sharded_embed_fn(model, mesh)
  x = jax.device_put(u8, sharding.data_sharded(mesh))
  np.testing.assert_allclose(np.asarray(fn(x)), model.embed(u8), atol=1e-5)


@pytest.mark.e2e
def test_generate_cli(workdir, model, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = tmp_path / "s.npz"
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.generate", "--checkpoint",
       workdir, "--seeds", "3-4,9", "--truncation_psi", "0.5", "--out",
       str(out)], capture_output=True, text=True, env=env, timeout=300,
      check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  with np.load(out) as z:
    np.testing.assert_array_equal(
        z["images"], model.generate(seeds=[3, 4, 9], truncation_psi=0.5))
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.generate", "--checkpoint",
       workdir, "--seeds", "a", "--out", str(out)], capture_output=True,
      text=True, env=env, timeout=300, check=False)
  assert r.returncode != 0 and "cannot parse 'a'" in r.stderr


# ----------------------------------------------------------------------------
# Safety of the inputs.


class _RunsCode:
  """Unpickling this calls os.mkdir(marker): stands for any code a pickle
  can run."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


@pytest.mark.e2e
def test_pickle_refused_without_trust_flag(tmp_path):
  import pickle
  marker = str(tmp_path / "code_ran")
  pkl = tmp_path / "network-snapshot-000100.pkl"
  pkl.write_bytes(pickle.dumps({"G": _RunsCode(marker), "D": 0, "G_ema": 0}))
  with pytest.raises(ValueError, match="--trust_pickle") as e:
    imp.load_pickle(str(pkl))
  assert "arbitrary code" in str(e.value) and "--state_dicts" in str(e.value)
  assert not os.path.exists(marker)
  # The command: one line, exit status 1, nothing run, nothing written.
  wd = tmp_path / "wd"
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.import_weights", "--pkl",
       str(pkl), "--workdir", str(wd)],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
      timeout=300, check=False)
  assert r.returncode == 1, r.stderr[-2000:]
  assert "gandl-import: error:" in r.stderr and "--trust_pickle" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(marker) and not wd.exists()


def test_state_dicts_need_torch_2_6(tmp_path, monkeypatch):
  """torch.load(weights_only=True) can run code before torch 2.6: refused
  without calling it; the [import] extra asks for torch >= 2.6."""
  import types
  calls = []
  fake = types.SimpleNamespace(__version__="2.5.1+cpu",
                               load=lambda *a, **k: calls.append(a) or {})
  monkeypatch.setitem(sys.modules, "torch", fake)
  with pytest.raises(ValueError, match="PyTorch 2.6") as e:
    imp.load_state_dicts(str(tmp_path / "nets.pt"))
  assert "2.5.1" in str(e.value) and not calls
  assert imp.torch_version("2.13.0+cpu") == (2, 13)
  assert imp.torch_version("2.6.0") >= imp.MIN_TORCH > imp.torch_version("2.5")
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    assert '"import": ["torch>=2.6"]' in f.read()


def test_torch_state_dicts_match_npz(tmp_path, sds):
  """The safe torch path (real torch >= 2.6, skipped without it)."""
  torch = pytest.importorskip("torch")
  if imp.torch_version(torch.__version__) < imp.MIN_TORCH:
    pytest.skip(f"torch {torch.__version__} < 2.6")
  pt = tmp_path / "nets.pt"
  torch.save({k: {n: torch.from_numpy(np.asarray(v)) for n, v in sd.items()}
              for k, sd in sds.items()}, str(pt))
  got = imp.load_state_dicts(str(pt))
  assert set(got) == set(sds)
  for k in sds:
    assert set(got[k]) == set(sds[k])
    for n in sds[k]:
      np.testing.assert_array_equal(got[k][n], sds[k][n])
