"""config.remat (jax.checkpoint around G/D blocks) changes memory, not numbers:
same parameters, values, first- and second-order gradients as without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandl_jax import config as config_lib
from gandl_jax.model import losses, networks

CFG = dict(resolution=8, img_channels=5, z_dim=16, w_dim=16, mapping_layers=3,
           channel_base=64, channel_max=16, mbstd_group_size=2)


def _grads(remat, g_vars, d_vars, z, real, keys):
  """G's non-saturating loss (grads wrt G and D), R1 (second order through D)
  and the path-length penalty (second order through G), under `remat`."""
  G, D = networks.build(CFG, "float32", remat)
  k_noise, k_pl, k_dir = keys

  def g_loss(g_params, d_params):
    img = G.apply({"params": g_params, "buffers": g_vars["buffers"]}, z,
                  rngs={"noise": k_noise})
    return losses.g_nonsaturating_loss(D.apply({"params": d_params}, img))

  def r1(d_params):
    penalty, _ = losses.r1_penalty(
        lambda x: D.apply({"params": d_params}, x), real)
    return jnp.mean(penalty)

  def pl(g_params):
    v = {"params": g_params, "buffers": g_vars["buffers"]}
    ws = G.apply(v, z, method=G.map)
    synth = lambda w: G.apply(v, w, method=G.synthesize,
                              rngs={"noise": k_pl})
    lengths, _ = losses.path_lengths(synth, ws, k_dir)
    return jnp.mean(jnp.square(lengths - 0.5))

  @jax.jit
  def run(g_params, d_params):
    return (jax.value_and_grad(g_loss, argnums=(0, 1))(g_params, d_params),
            jax.value_and_grad(r1)(d_params),
            jax.value_and_grad(pl)(g_params))
  return run(g_vars["params"], d_vars["params"])


@pytest.fixture(scope="module")
def reference():
  G, D = networks.build(CFG, "float32")
  g_vars, d_vars = networks.init(jax.random.PRNGKey(0), G, D)
  z = jax.random.normal(jax.random.PRNGKey(1), (4, CFG["z_dim"]))
  real = jax.random.uniform(jax.random.PRNGKey(2), (4, 8, 8, 5),
                            minval=-1, maxval=1)
  keys = tuple(jax.random.split(jax.random.PRNGKey(3), 3))
  inputs = (g_vars, d_vars, z, real, keys)
  return inputs, _grads("none", *inputs)


# blocks_dots wraps the same blocks under another policy: slow-marked to keep
# the default suite short (~1 min of compilation each on 2 cores).
@pytest.mark.parametrize("remat", [
    "blocks", pytest.param("blocks_dots", marks=pytest.mark.slow)])
def test_remat_same_values_and_gradients(reference, remat):
  inputs, expected = reference
  got = _grads(remat, *inputs)
  flat_e = jax.tree_util.tree_leaves_with_path(expected)
  flat_g = jax.tree_util.tree_leaves(got)
  assert len(flat_e) == len(flat_g) > 50
  nonzero = 0
  for (path, e), g in zip(flat_e, flat_g):
    e, g = np.asarray(e), np.asarray(g)
    scale = float(np.max(np.abs(e))) or 1.0
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))
    nonzero += bool(np.any(e != 0))
  assert nonzero > 50     # the gradients compared are real, not all zero


def test_remat_same_parameter_tree():
  shapes = {}
  for remat in config_lib.REMAT_OPTIONS:
    G, D = networks.build(CFG, "float32", remat)
    g, d = jax.eval_shape(lambda k: networks.init(k, G, D),
                          jax.random.PRNGKey(0))
    shapes[remat] = jax.tree_util.tree_map(lambda x: x.shape, (g, d))
  assert shapes["blocks"] == shapes["none"] == shapes["blocks_dots"]


def test_remat_bad_value():
  with pytest.raises(ValueError, match="remat must be one of"):
    networks.build(CFG, "float32", "everything")
  config = config_lib.base_config()
  config.remat = "all"
  with pytest.raises(ValueError, match="config.remat must be one of"):
    config_lib.validate(config)


def test_remat_change_allowed_on_resume():
  old, new = config_lib.base_config(), config_lib.base_config()
  new.remat = "blocks"
  assert config_lib.check_resume(old, new) == [("remat", "none", "blocks")]
