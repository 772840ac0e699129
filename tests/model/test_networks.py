"""GAN-DL's StyleGAN2 networks: sizes, names, shapes, truncation, noise, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandl_jax.model import networks


def _cfg(resolution, channel_base=16384, channel_max=512, z=512, **kw):
  cfg = dict(resolution=resolution, img_channels=5, z_dim=z, w_dim=z,
             mapping_layers=3, channel_base=channel_base,
             channel_max=channel_max, mbstd_group_size=4)
  cfg.update(kw)
  return cfg


def _shapes(cfg):
  G, D = networks.build(cfg)
  r = cfg["resolution"]
  g = jax.eval_shape(lambda k: G.init({"params": k}, jnp.zeros((1, cfg["z_dim"])),
                                      noise_mode="const"), jax.random.PRNGKey(0))
  d = jax.eval_shape(lambda k: D.init({"params": k}, jnp.zeros((1, r, r, 5))),
                     jax.random.PRNGKey(0))
  return G, D, g, d


def _flat(tree):
  return {".".join(str(getattr(k, "key", k)) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# stylegan2-ada-pytorch's trainable parameter counts for the same settings
# (5 channels, mapping 3, latent 512, channel_base 16384, channel_max 512).
@pytest.mark.parametrize("resolution,g_count,d_count", [
    (64, 22_510_882, 23_407_873), (256, 23_459_184, 24_001_217)])
def test_parameter_counts_equal_reference(resolution, g_count, d_count):
  _, _, g, d = _shapes(_cfg(resolution))
  assert networks.count_params(g["params"]) == g_count
  assert networks.count_params(d["params"]) == d_count


def test_parameter_names_follow_reference_state_dict():
  _, _, g, d = _shapes(_cfg(64))
  gp, gb, dp = _flat(g["params"]), _flat(g["buffers"]), _flat(d["params"])
  assert gp["mapping.fc0.weight"] == (512, 512)
  assert gp["mapping.fc2.bias"] == (512,)
  assert "mapping.fc3.weight" not in gp            # GAN-DL: 3 layers
  assert gp["synthesis.b4.const"] == (4, 4, 512)
  assert gp["synthesis.b4.conv1.weight"] == (3, 3, 512, 512)
  assert gp["synthesis.b4.conv1.noise_strength"] == ()
  assert gp["synthesis.b8.conv0.affine.weight"] == (512, 512)
  assert gp["synthesis.b64.conv0.weight"] == (3, 3, 512, 256)
  assert gp["synthesis.b64.torgb.weight"] == (1, 1, 256, 5)
  assert gp["synthesis.b64.torgb.affine.bias"] == (256,)
  assert "synthesis.b4.conv0.weight" not in gp
  assert set(gb) == {"mapping.w_avg"} | {
      f"synthesis.b{r}.conv{i}.noise_const" for r in (4, 8, 16, 32, 64)
      for i in (0, 1) if not (r == 4 and i == 0)}
  assert gb["synthesis.b64.conv1.noise_const"] == (64, 64)
  assert dp["b64.fromrgb.weight"] == (1, 1, 5, 256)
  assert "b32.fromrgb.weight" not in dp            # resnet: fromRGB at the top only
  assert dp["b64.skip.weight"] == (1, 1, 256, 512) and "b64.skip.bias" not in dp
  assert dp["b4.conv.weight"] == (3, 3, 513, 512)  # + 1 minibatch-stddev channel
  assert dp["b4.fc.weight"] == (512 * 16, 512)
  assert dp["b4.out.weight"] == (512, 1)


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 128, 256, 512, 1024])
def test_shapes_and_num_ws_at_every_resolution(resolution):
  cfg = _cfg(resolution, channel_base=1024, channel_max=32, z=32)
  G, D = networks.build(cfg)
  assert G.num_ws == networks.num_ws(resolution) == 2 * int(np.log2(resolution)) - 2
  z = jnp.zeros((4, 32))
  img = jnp.zeros((4, resolution, resolution, 5))
  if resolution <= 32:   # real forward passes
    gv, dv = networks.init(jax.random.PRNGKey(0), G, D)
    out = G.apply(gv, z, noise_mode="const")
    ws = G.apply(gv, z, method=G.map)
    logits, feats = D.apply(dv, img, return_features=True)
  else:                  # shape-only
    gv = jax.eval_shape(lambda: G.init({"params": jax.random.PRNGKey(0)}, z,
                                       noise_mode="const"))
    dv = jax.eval_shape(lambda: D.init({"params": jax.random.PRNGKey(0)}, img))
    out = jax.eval_shape(lambda v: G.apply(v, z, noise_mode="const"), gv)
    ws = jax.eval_shape(lambda v: G.apply(v, z, method=G.map), gv)
    logits, feats = jax.eval_shape(
        lambda v: D.apply(v, img, return_features=True), dv)
  assert out.shape == (4, resolution, resolution, 5)
  assert out.dtype == jnp.float32
  assert ws.shape == (4, G.num_ws, 32)
  assert logits.shape == (4, 1)
  assert set(feats) == set(networks.embedding_layers(resolution))
  assert feats["fc"].shape == (4, 32)
  assert feats[f"b{resolution}"].shape == (4, min(1024 // (resolution // 2), 32))


def test_bad_resolution_and_inputs_are_rejected():
  with pytest.raises(ValueError, match="power of two from 8 to 1024"):
    networks.build(_cfg(96))
  with pytest.raises(ValueError, match="power of two"):
    networks.build(_cfg(4))
  G, D = networks.build(_cfg(8, channel_base=64, channel_max=8, z=8))
  gv, dv = networks.init(jax.random.PRNGKey(0), G, D)
  with pytest.raises(ValueError, match=r"shape \(N, 8, 8, 5\)"):
    D.apply(dv, jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="z must have shape"):
    G.apply(gv, jnp.zeros((2, 7)))
  with pytest.raises(ValueError, match="noise_mode"):
    G.apply(gv, jnp.zeros((2, 8)), noise_mode="fixed")
  for bad in ("float16", -2, 1.5, "most"):
    with pytest.raises(ValueError, match="num_bf16_res"):
      networks.build(_cfg(8), bad)


@pytest.fixture(scope="module")
def small():
  cfg = _cfg(16, channel_base=256, channel_max=32, z=16)
  G, D = networks.build(cfg)
  gv, dv = networks.init(jax.random.PRNGKey(1), G, D)
  # Non-zero noise strengths and biases so every term matters.
  leaves, tree = jax.tree_util.tree_flatten(gv["params"])
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  gv = {"params": jax.tree_util.tree_unflatten(tree, leaves),
        "buffers": gv["buffers"]}
  gv["buffers"]["mapping"]["w_avg"] = jax.random.normal(
      jax.random.PRNGKey(3), (16,))
  return G, D, gv, dv


def test_truncation_and_w_avg(small):
  G, _, gv, _ = small
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
  w = G.apply(gv, z, method=G.map)
  w_avg = gv["buffers"]["mapping"]["w_avg"]
  np.testing.assert_allclose(G.apply(gv, z, 0.0, method=G.map),
                             np.broadcast_to(w_avg, w.shape), atol=1e-6)
  np.testing.assert_allclose(G.apply(gv, z, 0.7, method=G.map),
                             w_avg + 0.7 * (w - w_avg), atol=1e-5)
  cut = G.apply(gv, z, 0.5, 2, method=G.map)
  np.testing.assert_allclose(cut[:, 2:], w[:, 2:], atol=1e-6)
  # psi = 0: every image is the same (the "average" image).
  imgs = G.apply(gv, z, 0.0, noise_mode="const")
  np.testing.assert_allclose(imgs[0], imgs[1], atol=1e-5)
  # w_avg tracking: w_avg <- mean(w) + beta * (w_avg - mean(w)).
  _, upd = G.apply(gv, z, update_emas=True, method=G.map, mutable=["buffers"])
  want = w[:, 0].mean(0) + 0.995 * (w_avg - w[:, 0].mean(0))
  np.testing.assert_allclose(upd["buffers"]["mapping"]["w_avg"], want,
                             atol=1e-5)


def test_noise_modes(small):
  G, _, gv, _ = small
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 16))
  const = G.apply(gv, z, noise_mode="const")
  np.testing.assert_array_equal(const, G.apply(gv, z, noise_mode="const"))
  r1 = G.apply(gv, z, noise_mode="random", rngs={"noise": jax.random.PRNGKey(1)})
  r2 = G.apply(gv, z, noise_mode="random", rngs={"noise": jax.random.PRNGKey(2)})
  none = G.apply(gv, z, noise_mode="none")
  assert float(jnp.abs(r1 - r2).max()) > 1e-4
  assert float(jnp.abs(const - none).max()) > 1e-4
  # Zero noise strengths make all modes agree.
  p = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x)
      if "noise_strength" in jax.tree_util.keystr(path) else x, gv["params"])
  v = {"params": p, "buffers": gv["buffers"]}
  np.testing.assert_allclose(G.apply(v, z, noise_mode="const"),
                             G.apply(v, z, noise_mode="none"), atol=1e-6)


def test_every_w_input_is_used_style_mixing(small):
  G, _, gv, _ = small
  ws = G.apply(gv, jax.random.normal(jax.random.PRNGKey(0), (2, 16)),
               method=G.map)
  grads = jax.grad(lambda ws: jnp.sum(
      G.apply(gv, ws, "const", method=G.synthesize) ** 2))(ws)
  per_w = jnp.abs(grads).sum(axis=(0, 2))
  assert per_w.shape == (G.num_ws,) and bool(jnp.all(per_w > 0))
  # Mixing: replacing the last ws changes the image but not the earlier layers'
  # contribution structure (the image differs, the shapes hold).
  mixed = ws.at[:, 3:].set(ws[::-1, 3:])
  a = G.apply(gv, ws, "const", method=G.synthesize)
  b = G.apply(gv, mixed, "const", method=G.synthesize)
  assert a.shape == b.shape and float(jnp.abs(a - b).max()) > 1e-4


def test_discriminator_features(small):
  _, D, _, dv = small
  img = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 5), minval=-1,
                           maxval=1)
  logits, feats = D.apply(dv, img, return_features=True)
  np.testing.assert_array_equal(logits, feats["logit"])
  np.testing.assert_array_equal(logits, D.apply(dv, img))
  assert feats["fc"].shape == (4, 32) and feats["fc"].dtype == jnp.float32
  assert feats["b16"].shape == (4, 32) and feats["b8"].shape == (4, 32)
  # fc is a leaky-ReLU output: the final logit is a linear map of it.
  w = dv["params"]["b4"]["out"]["weight"]
  b = dv["params"]["b4"]["out"]["bias"]
  np.testing.assert_allclose(feats["fc"] @ w / np.sqrt(32) + b, logits,
                             atol=1e-5)
  # Per-shard minibatch-stddev groups change the result only via grouping.
  same = D.apply(dv, img, mbstd_shards=1)
  sharded = D.apply(dv, img, mbstd_shards=2)
  assert float(jnp.abs(same - sharded).max()) > 0


def test_bfloat16_close_to_float32():
  """The inference tools' --compute_dtype=bfloat16: every block from 8x8 up."""
  cfg = _cfg(32, channel_base=512, channel_max=32, z=32)
  G32, D32 = networks.build(cfg, "float32")
  G16, D16 = networks.build(cfg, "bfloat16")
  assert (G16.num_bf16_res, D16.num_bf16_res) == (networks.ALL_BF16,) * 2
  gv, dv = networks.init(jax.random.PRNGKey(0), G32, D32)
  z = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
  a, b = G32.apply(gv, z, noise_mode="const"), G16.apply(gv, z, noise_mode="const")
  assert b.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b)))
  assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())
  la, fa = D32.apply(dv, a, return_features=True)
  lb, fb = D16.apply(dv, a, return_features=True)
  assert bool(jnp.all(jnp.isfinite(lb))) and fb["fc"].dtype == jnp.float32
  assert float(jnp.abs(fa["fc"] - fb["fc"]).max()) < 0.05 * float(
      jnp.abs(fa["fc"]).max())
  # Parameters stay float32 regardless of the compute dtype.
  gv16, _ = networks.init(jax.random.PRNGKey(0), G16, D16)
  assert all(x.dtype == jnp.float32
             for x in jax.tree_util.tree_leaves(gv16["params"]))


def test_init_cpu_compiler_options_give_the_default_values_bitwise():
  """networks.init compiles with CPU_INIT_COMPILER_OPTIONS on CPU (half the
  compile time); the initial variables must be XLA's default compilation's,
  bit for bit, and differ with the seed."""
  assert jax.default_backend() == "cpu"
  G, D = networks.build(_cfg(16, channel_base=256, channel_max=32, z=16))
  key = jax.random.PRNGKey(7)
  fast = jax.tree_util.tree_leaves(networks.init(key, G, D))
  plain = jax.tree_util.tree_leaves(networks.init(key, G, D,
                                                  compiler_options={}))
  assert len(fast) == len(plain) > 40
  for a, b in zip(fast, plain):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = jax.tree_util.tree_leaves(networks.init(jax.random.PRNGKey(8), G, D))
  assert any(not np.array_equal(a, b) for a, b in zip(fast, other))
  # Inside a trace (Trainer.abstract_state, interop) JAX refuses options on
  # a nested jit: init goes without them there.
  shapes = jax.tree_util.tree_leaves(jax.eval_shape(
      lambda k: networks.init(k, G, D), key))
  assert [s.shape for s in shapes] == [a.shape for a in fast]
