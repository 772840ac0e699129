"""Mixed precision as stylegan2-ada-pytorch's policy (`num_bf16_res`, the
reference's `num_fp16_res` in bfloat16): which blocks run in bfloat16, how
close the bfloat16 forward and a short bfloat16 training run stay to float32,
and that `num_bf16_res=0` is the float32 program (no bfloat16 anywhere)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.model import losses, networks
from gandl_jax.train import steps
import tiny
from tiny import tiny_config

# Measured on CPU (XLA:CPU, jax 0.10): relative L2 error of the bfloat16
# forward against float32 at 16x16 (num_bf16_res 1 and all) at most 0.008 for
# G's image and every D feature; the bound leaves 2.5x margin.
FORWARD_REL_BOUND = 2e-2
# Over 8 iterations of the tiny config (8x8, every block but 4x4 in
# bfloat16, both regularizers every 2nd iteration), the largest relative
# difference from the float32 run of G/loss, D/loss, R1 and the path-length
# penalty was measured at 0.019 (path length; R1 0.009, the losses 0.001);
# bound 0.1.
TRAIN_REL_BOUND = 0.1


def _cfg(resolution=16):
  return config_lib.model_config(
      resolution=resolution, z_dim=16, w_dim=16, channel_base=256,
      channel_max=32, mbstd_group_size=4, conv_clamp=256.0)


def _reference_fp16_blocks(resolution, num_fp16_res):
  """stylegan2-ada-pytorch networks.py: fp16_resolution = max(2 **
  (log2(R) + 1 - num_fp16_res), 8); a block uses fp16 iff res >= it."""
  log2 = int(np.log2(resolution))
  fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
  return {2**i for i in range(2, log2 + 1) if 2**i >= fp16_resolution}


@pytest.mark.parametrize("resolution", [8, 32, 256, 1024])
def test_block_dtype_follows_the_reference_formula(resolution):
  log2 = int(np.log2(resolution))
  for n in range(0, log2 + 2):
    got = {2**i for i in range(2, log2 + 1)
           if networks.block_dtype(2**i, resolution, n) == jnp.bfloat16}
    assert got == _reference_fp16_blocks(resolution, n), n
  every = {2**i for i in range(3, log2 + 1)}   # never 4x4
  for n in (-1, "all"):
    got = {2**i for i in range(2, log2 + 1)
           if networks.block_dtype(2**i, resolution, n) == jnp.bfloat16}
    assert got == every
  # The paper configs' default: the 4 highest resolutions.
  if resolution == 256:
    assert _reference_fp16_blocks(256, 4) == {32, 64, 128, 256}


def test_bad_values_are_rejected_with_the_key_name():
  for bad in (-2, 1.0, "half", True):
    with pytest.raises(ValueError, match="num_bf16_res"):
      networks.check_num_bf16_res(bad)
  config = tiny_config(num_bf16_res=-3)
  with pytest.raises(ValueError, match="config.num_bf16_res"):
    config_lib.validate(config)


@pytest.fixture(scope="module")
def nets():
  cfg = _cfg(16)
  G, D = networks.build(cfg, 0)
  gv, dv = networks.init(jax.random.PRNGKey(0), G, D)
  # Non-zero noise strengths and biases so that every add matters.
  def perturb(tree, seed):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    key = jax.random.PRNGKey(seed)
    for i, (path, v) in enumerate(sorted(flat.items())):
      if path[-1] == "noise_strength" or (path[-1] == "bias" and
                                          "affine" not in path):
        flat[path] = v + 0.1 * jax.random.normal(jax.random.fold_in(key, i),
                                                  v.shape)
    return flax.traverse_util.unflatten_dict(flat)
  gv = dict(gv, params=perturb(gv["params"], 5))
  dv = dict(dv, params=perturb(dv["params"], 6))
  z = jax.random.normal(jax.random.PRNGKey(1), (8, 16))
  img = G.apply(gv, z, noise_mode="const")
  logits, feats = D.apply(dv, img, return_features=True)
  return cfg, gv, dv, z, img, feats


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("num_bf16_res", [1, -1])
def test_bfloat16_forward_close_to_float32_at_every_resolution(
    nets, num_bf16_res):
  cfg, gv, dv, z, img32, feats32 = nets
  G, D = networks.build(cfg, num_bf16_res)
  img = G.apply(gv, z, noise_mode="const")
  assert img.dtype == jnp.float32
  errors = {"G": _rel(img, img32)}
  _, feats = D.apply(dv, img32, return_features=True)
  for name in networks.embedding_layers(16):   # b16, b8, conv, fc, logit
    assert feats[name].dtype == jnp.float32, name
    errors[name] = _rel(feats[name], feats32[name])
  assert max(errors.values()) < FORWARD_REL_BOUND, errors
  assert min(errors.values()) > 0, errors   # bfloat16 did run


def _block_dtypes(module, variables, *args, **kw):
  _, state = module.apply(variables, *args, capture_intermediates=True,
                          mutable=["intermediates"], **kw)
  inter = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(state["intermediates"]))
  out = {}
  for path, value in inter.items():
    if len(path) >= 2 and path[-2].startswith("b") and path[-1] == (
        "__call__"):
      value = value[0]
      out[path[-2]] = jax.tree_util.tree_map(lambda x: x.dtype, value)
  return out


def test_blocks_run_in_their_dtype_and_image_stays_float32(nets):
  """num_bf16_res=1 at 16x16: only the 16x16 blocks in bfloat16; G's image
  (each toRGB's output) float32; D's epilogue float32."""
  cfg, gv, dv, z, img32, _ = nets
  G, D = networks.build(cfg, 1)
  g = _block_dtypes(G, gv, z, noise_mode="const")
  assert g["b16"] == (jnp.bfloat16, jnp.float32)   # (features x, image)
  assert g["b8"] == (jnp.float32, jnp.float32)
  assert g["b4"] == (jnp.float32, jnp.float32)
  d = _block_dtypes(D, dv, img32)
  assert d["b16"] == jnp.bfloat16 and d["b8"] == jnp.float32
  assert d["b4"][0] == jnp.float32   # epilogue logits


def _dtypes_in(fn, *args):
  """Every dtype of every value in `fn`'s jaxpr (sub-jaxprs included)."""
  found = set()
  def walk(jaxpr):
    for v in list(jaxpr.invars) + list(jaxpr.outvars) + list(
        jaxpr.constvars):
      if hasattr(v, "aval"):
        found.add(str(v.aval.dtype))
    for eqn in jaxpr.eqns:
      for v in list(eqn.invars) + list(eqn.outvars):
        if hasattr(v, "aval"):
          found.add(str(v.aval.dtype))
      for val in eqn.params.values():
        for sub in (val if isinstance(val, (tuple, list)) else (val,)):
          sub = getattr(sub, "jaxpr", sub)   # ClosedJaxpr -> Jaxpr
          if hasattr(sub, "eqns"):
            walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_num_bf16_res_zero_is_the_float32_program(nets):
  """With num_bf16_res=0 no value anywhere in G, D or R1's
  gradient-of-gradient is bfloat16 (so the float32 path, bit for bit);
  with 1, there is."""
  cfg, gv, dv, z, img32, _ = nets
  for n, want in ((0, False), (1, True)):
    G, D = networks.build(cfg, n)
    fn = lambda gp, dp, z: losses.r1_penalty(
        lambda x: D.apply(dict(dv, params=dp), x),
        G.apply(dict(gv, params=gp), z, noise_mode="const"))[0]
    grad = jax.grad(lambda dp: jnp.sum(fn(gv["params"], dp, z)))
    assert ("bfloat16" in _dtypes_in(grad, dv["params"])) == want, n
  # And the same values as the inference tools' 'float32' build.
  G0, D0 = networks.build(cfg, 0)
  Gf, Df = networks.build(cfg, "float32")
  np.testing.assert_array_equal(G0.apply(gv, z, noise_mode="const"),
                                Gf.apply(gv, z, noise_mode="const"))
  np.testing.assert_array_equal(D0.apply(dv, img32), Df.apply(dv, img32))


def _train(num_bf16_res, iterations=8):
  """`iterations` of tiny.train_config on fixed batches: the float32 run as
  the suite's other runs (no clamp, as the reference's --fp32), the
  bfloat16 one clamped at 256 as the paper configs. Returns the Trainer,
  the final state and the metrics of every iteration."""
  clamp = {"model.conv_clamp": 256.0} if num_bf16_res else {}
  config = tiny.train_config(num_bf16_res=num_bf16_res, **clamp)
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  state = tr.init_state(0)
  rng = np.random.RandomState(0)
  history = []
  for step in range(iterations):
    real = sharding.host_to_global(
        rng.randint(0, 256, (8, 8, 8, 5)).astype(np.uint8), tr.mesh)
    state, metrics = tr.train_step(state, real, step, step * 8)
    history.append(jax.device_get(metrics))
  return tr, state, history


def test_bfloat16_training_tracks_float32():
  """8 iterations (every phase 4-8 times): the bfloat16 run's losses, R1 and
  path-length penalty stay within TRAIN_REL_BOUND of the float32 run's;
  parameters, EMA, optimizer state and metrics stay float32; no phase
  compiles twice."""
  _, _, h32 = _train(0)
  tr, s16, h16 = _train(-1)
  keys = ("G/loss", "D/loss", "D/r1_penalty", "G/pl_penalty")
  worst = {}
  for k in keys:
    a = np.array([m[k] for m in h32 if k in m], np.float64)
    b = np.array([m[k] for m in h16 if k in m], np.float64)
    assert len(a) == len(b) >= 4, k
    assert b.dtype == np.float64 and np.all(np.isfinite(b)), k
    worst[k] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-3)))
  assert max(worst.values()) < TRAIN_REL_BOUND, worst
  assert max(worst.values()) > 0, worst   # the runs differ: bf16 did run
  for m in h16:
    assert all(np.asarray(v).dtype == np.float32 for v in m.values())
  leaves = jax.tree_util.tree_leaves((s16.g_params, s16.d_params,
                                      s16.ema_params, s16.g_opt, s16.d_opt,
                                      s16.pl_mean))
  floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) > 100 and all(x.dtype == jnp.float32 for x in floats)
  # No recompilation after the first call of each phase.
  assert sorted(tr._compiled) == ["d_main", "d_reg", "g_main", "g_reg"]  # pylint: disable=protected-access
  assert all(fn._cache_size() == 1 for fn in tr._compiled.values())  # pylint: disable=protected-access
