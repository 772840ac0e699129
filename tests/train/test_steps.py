"""Training phases: schedules, Adam corrections, EMA, R1, path length, and
identical results on 1 and 8 devices."""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gandl_jax.model import losses
from gandl_jax import sharding
from gandl_jax.train import steps
import tiny
from tiny import tiny_config


def real_batch(n=8, res=8, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, res, res, 5)).astype(
      np.float32)


def test_lazy_regularization_schedule():
  tr = steps.Trainer(tiny_config(), sharding.make_mesh(jax.devices()[:1]))
  g_reg = [s for s in range(33) if "g_reg" in tr.phases_for_step(s)]
  d_reg = [s for s in range(33) if "d_reg" in tr.phases_for_step(s)]
  assert g_reg == list(range(0, 33, 4))
  assert d_reg == [0, 16, 32]
  assert tr.phases_for_step(5) == ("g_main", "d_main")
  assert tr.phases_for_step(16) == ("g_main", "g_reg", "d_main", "d_reg")
  off = steps.Trainer(tiny_config(**{"loss.r1_gamma": 0.0,
                                       "loss.pl_weight": 0.0}),
                        sharding.make_mesh(jax.devices()[:1]))
  assert off.phases_for_step(0) == ("g_main", "d_main")


def test_adam_lazy_correction_by_hand():
  lr, b2, eps, interval = 0.0025, 0.99, 1e-8, 16
  c = 16 / 17
  got_lr, (got_b1, got_b2) = losses.lazy_regularization(lr, (0.0, b2), interval)
  assert got_lr == pytest.approx(lr * c) and got_b1 == 0.0
  assert got_b2 == pytest.approx(b2 ** c)
  # Two Adam steps on one scalar, computed by hand.
  tx = steps.make_optimizer(lr, 0.0, b2, eps, interval)
  p = jnp.asarray(1.0)
  st = tx.init(p)
  g1, g2 = 0.5, -0.2
  u1, st = tx.update(jnp.asarray(g1), st, p)
  u2, st = tx.update(jnp.asarray(g2), st, p)
  bb = b2 ** c
  v1 = (1 - bb) * g1**2 / (1 - bb)
  v2 = (bb * (1 - bb) * g1**2 + (1 - bb) * g2**2) / (1 - bb**2)
  np.testing.assert_allclose(u1, -lr * c * g1 / (math.sqrt(v1) + eps), rtol=1e-5)
  np.testing.assert_allclose(u2, -lr * c * g2 / (math.sqrt(v2) + eps), rtol=1e-5)


def test_ema_beta_formula():
  assert losses.ema_beta(64, 0, 20.0) == pytest.approx(0.5 ** (64 / 20000))
  # Ramp-up caps the half-life at nimg * rampup.
  assert losses.ema_beta(64, 1000, 20.0, 0.05) == pytest.approx(0.5 ** (64 / 50))
  assert losses.ema_beta(64, 10**9, 20.0, 0.05) == pytest.approx(
      0.5 ** (64 / 20000))


@pytest.fixture(scope="module")
def one_device():
  tr = steps.Trainer(tiny_config(), sharding.make_mesh(jax.devices()[:1]))
  return tr, tr.init_state(0)


def test_d_main_updates_ema_and_step(one_device):
  tr, state = one_device
  state = jax.tree_util.tree_map(jnp.copy, state)
  g = jax.device_get(state.g_params)
  ema_old = jax.tree_util.tree_map(lambda x: x + 1.0, g)  # make EMA differ
  state = state.replace(ema_params=jax.tree_util.tree_map(jnp.asarray, ema_old))
  beta = 0.75
  new, metrics = tr.compiled("d_main", state)(
      state, sharding.host_to_global(real_batch(), tr.mesh), jnp.float32(beta))
  want = jax.tree_util.tree_map(lambda p, e: p + beta * (e - p), g, ema_old)
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(new.ema_params)),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert int(new.step) == 1
  # G is untouched by the D phase; D is.
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(new.g_params)),
                  jax.tree_util.tree_leaves(g)):
    np.testing.assert_array_equal(a, b)
  assert np.isfinite(float(metrics["D/loss"]))


def test_r1_penalty_equals_finite_differences(one_device):
  tr, state = one_device
  d_params = state.d_params
  x = jnp.asarray(real_batch(2, seed=3))
  fn = lambda img: tr.D.apply({"params": d_params}, img)
  penalty, _ = losses.r1_penalty(fn, x)
  # Central differences of sum(D(x)) along every input coordinate.
  eps = 1e-2
  flat = x.reshape(-1)
  eye = jnp.eye(flat.size, dtype=jnp.float32) * eps

  @jax.jit
  def fd(rows):
    plus = jax.vmap(lambda d: jnp.sum(fn((flat + d).reshape(x.shape))))(rows)
    minus = jax.vmap(lambda d: jnp.sum(fn((flat - d).reshape(x.shape))))(rows)
    return (plus - minus) / (2 * eps)

  grad = jnp.concatenate([fd(eye[i:i + 160]) for i in range(0, flat.size, 160)])
  want = jnp.sum(grad.reshape(2, -1) ** 2, axis=1)
  np.testing.assert_allclose(penalty, want, rtol=2e-2)
  assert float(jnp.min(penalty)) > 0


def test_path_lengths_match_explicit_jacobian(one_device):
  tr, state = one_device
  G = tr.G
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 16))
  ws = G.apply({"params": state.g_params, "buffers": state.g_buffers}, z,
               method=G.map)
  synth = lambda w: G.apply({"params": state.g_params,
                             "buffers": state.g_buffers}, w, "const",
                            method=G.synthesize)
  key = jax.random.PRNGKey(7)
  lengths, img = losses.path_lengths(synth, ws, key)
  y = jax.random.normal(key, img.shape) / math.sqrt(8 * 8)
  jac = jax.jacrev(synth)(ws)                 # (N, H, W, C, N, num_ws, w_dim)
  jty = jnp.einsum("nhwc,nhwcmkd->mkd", y, jac)
  want = jnp.sqrt(jnp.mean(jnp.sum(jty**2, axis=2), axis=1))
  np.testing.assert_allclose(lengths, want, rtol=1e-4)
  # Penalty uses the updated running mean, like the reference.
  pen, new_mean = losses.path_length_penalty(lengths, jnp.float32(0.5), 0.01)
  m = 0.5 + 0.01 * (float(jnp.mean(lengths)) - 0.5)
  np.testing.assert_allclose(new_mean, m, rtol=1e-6)
  np.testing.assert_allclose(pen, (lengths - m) ** 2, rtol=1e-5)


def _run_all_phases(num_devices, precompile=False):
  # A large Adam eps makes updates proportional to gradients, so float
  # reduction-order differences are not amplified into sign flips.
  config = tiny_config(**{"optim.eps": 1.0, "mbstd_shards": 8})
  config.batch_size = 16
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:num_devices]))
  state = tr.init_state(0)
  real = sharding.host_to_global(real_batch(16), tr.mesh)
  assert tr.phases_for_step(0) == ("g_main", "g_reg", "d_main", "d_reg")
  if precompile:
    ready = tr.precompile(state, real)
    assert sorted(ready) == ["d_main", "d_reg", "g_main", "g_reg"]
  state, metrics = tr.train_step(state, real, 0, 0)
  if precompile:   # train_step ran the concurrently compiled executables
    assert all(fn._cache_size() == 0 for fn in tr._compiled.values())
  return jax.device_get(state), jax.device_get(metrics)


def test_one_iteration_identical_on_1_and_8_devices():
  # The 8-device run also checks Trainer.precompile (as gandl-train runs):
  # its executables give the jitted phases' results.
  s1, m1 = _run_all_phases(1)
  s8, m8 = _run_all_phases(8, precompile=True)
  assert set(m1) == set(m8) and {"G/loss", "G/pl_penalty", "D/loss",
                                 "D/r1_penalty"} <= set(m1)
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(s1.step) == 1 and float(s1.pl_mean) > 0


def _all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x))))
             for x in jax.tree_util.tree_leaves(jax.device_get(tree))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_non_finite_gradients_are_sanitized_in_every_phase(one_device):
  """Item 1: like the reference (nan_to_num before every optimizer step), a
  non-finite gradient leaves the parameters and the Adam state finite."""
  tr, state = one_device
  real = real_batch()
  real[0, 0, 0, 0] = np.nan                 # D phases: a NaN pixel
  real = sharding.host_to_global(real, tr.mesh)
  # G phases: weights so large that the images overflow.
  huge = jax.tree_util.tree_map(lambda x: x * 1e20, state.g_params)
  for name in ("g_main", "g_reg", "d_main", "d_reg"):
    s = jax.tree_util.tree_map(jnp.copy, state)
    if name.startswith("g"):
      s = s.replace(g_params=jax.tree_util.tree_map(jnp.copy, huge))
    phase = tr._phase(name)
    new, metrics = tr.compiled(name, s)(
        *tr._args(phase, s, real, jnp.float32(0.5)))
    metrics = jax.device_get(metrics)
    bad = [v for k, v in metrics.items() if k.endswith("grad_nonfinite")]
    assert bad and bad[0] > 0, (name, metrics)   # the gradient was non-finite
    net = "g" if name.startswith("g") else "d"
    assert _all_finite(getattr(new, f"{net}_params")), name
    assert _all_finite(getattr(new, f"{net}_opt")), name
    assert np.isfinite(metrics[f"{net.upper()}/" + (
        "grad_norm" if name.endswith("main") else "reg_grad_norm")])


def test_sanitize_grads_matches_reference_values():
  g = {"a": jnp.asarray([np.nan, np.inf, -np.inf, 2.0])}
  clean, bad, norm = steps.sanitize_grads(g)
  np.testing.assert_array_equal(clean["a"], [0.0, 1e5, -1e5, 2.0])
  assert float(bad) == 3
  np.testing.assert_allclose(float(norm), np.sqrt(2e10 + 4.0), rtol=1e-6)


def test_sanitize_grads_on_a_random_pytree_equals_numpy_per_leaf():
  """The count and the norm come from all leaves raveled into one vector
  (fewer kernels to compile); each against numpy leaf by leaf, and the
  cleaned leaves bitwise numpy's nan_to_num."""
  rng = np.random.default_rng(0)
  shapes = {"w": (3, 3, 4, 5), "b": (5,), "s": (), "m": {"x": (7, 2)}}
  grads = jax.tree_util.tree_map(
      lambda s: rng.normal(size=s).astype(np.float32), shapes,
      is_leaf=lambda s: isinstance(s, tuple))
  grads["w"].flat[[0, 17, 42]] = [np.nan, np.inf, -np.inf]
  grads["m"]["x"][1, 1] = np.nan
  clean, bad, norm = jax.jit(steps.sanitize_grads)(grads)
  ref = jax.tree_util.tree_map(
      lambda g: np.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
  for got, want in zip(jax.tree_util.tree_leaves(clean),
                       jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert float(bad) == 4
  want_norm = np.sqrt(sum(np.sum(np.square(r, dtype=np.float64))
                          for r in jax.tree_util.tree_leaves(ref)))
  np.testing.assert_allclose(float(norm), want_norm, rtol=1e-6)
  np.testing.assert_allclose(float(norm), float(optax.global_norm(clean)),
                             rtol=1e-6)


def test_lazy_correction_kept_when_a_regularizer_is_off():
  """Item 4: the reference corrects lr and betas whenever an interval is set,
  also with pl_weight=0 or r1_gamma=0 (the reg phase then never runs)."""
  config = tiny_config(**{"loss.r1_gamma": 0.0, "loss.pl_weight": 0.0,
                          "optim.beta2": 0.99})
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  assert tr.phases_for_step(0) == ("g_main", "d_main")
  lr, b2, eps = 0.0025, 0.99, 1e-8
  for tx, interval in ((tr.g_tx, 4), (tr.d_tx, 16)):
    c = interval / (interval + 1)
    p = jnp.asarray(1.0)
    st = tx.init(p)
    u1, st = tx.update(jnp.asarray(0.5), st, p)
    u2, _ = tx.update(jnp.asarray(-0.2), st, p)
    bb = b2 ** c
    v2 = (bb * (1 - bb) * 0.25 + (1 - bb) * 0.04) / (1 - bb**2)
    np.testing.assert_allclose(u1, -lr * c * np.sign(0.5), rtol=1e-5)
    np.testing.assert_allclose(u2, -lr * c * -0.2 / (math.sqrt(v2) + eps),
                               rtol=1e-5)


def _cutoffs(ws):
  """Per-sample cutoff read off ws: the first layer that differs from layer
  0 (mapping output is the same for every layer), num_ws if none."""
  ws = np.asarray(ws)
  differs = np.any(ws != ws[:, :1], axis=2)          # (N, num_ws)
  return np.where(differs.any(1), differs.argmax(1), ws.shape[1])


def test_style_mixing_cutoff_drawn_per_slice():
  """Item 3: one cutoff and one Bernoulli draw per per-device slice (the
  reference draws per run_G call, i.e. per per-GPU batch)."""
  config = tiny_config(**{"mbstd_shards": 8})
  config.batch_size = 64
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  assert tr.mixing_slices(64) == 8 and tr.mixing_slices(32) == 8
  state = tr.init_state(0)
  num_ws = tr.G.num_ws
  gen = jax.jit(lambda k: tr._generate(state.g_params, state.g_buffers, 64,
                                       k)[1])
  per_slice, distinct = [], []
  for i in range(40):
    cut = _cutoffs(jax.device_get(gen(jax.random.PRNGKey(i)))).reshape(8, 8)
    assert np.all(cut == cut[:, :1]), cut           # one cutoff per slice
    per_slice += list(cut[:, 0])
    distinct.append(len(set(cut[:, 0])))
  per_slice = np.asarray(per_slice)
  assert set(per_slice) <= set(range(1, num_ws + 1))
  mixed = np.mean(per_slice < num_ws)
  # 320 Bernoulli(0.9) draws: 5 standard deviations is 0.084.
  assert abs(mixed - 0.9) < 0.085, mixed
  assert np.mean(np.asarray(distinct) > 1) > 0.9     # slices differ
  # The pure function: slices of the batch, the probability respected.
  cut = np.asarray(steps.mixing_cutoffs(jax.random.PRNGKey(0), 4000, 1000,
                                        8, 0.25)).reshape(1000, 4)
  assert np.all(cut == cut[:, :1])
  assert abs(np.mean(cut[:, 0] < 8) - 0.25) < 5 * math.sqrt(.25 * .75 / 1000)


def test_precompile_then_no_tracing_or_compilation_in_training():
  """After `precompile`, iterations (every phase, several times, changing
  EMA betas) and `flops_per_iteration` neither trace nor compile again: no
  second compilation at step 1, no re-lowering for the FLOPs."""
  from jax import monitoring   # pylint: disable=import-outside-toplevel
  # jax's event names (jax._src.dispatch), through the public monitoring API.
  dispatch = types.SimpleNamespace(
      JAXPR_TRACE_EVENT="/jax/core/compile/jaxpr_trace_duration",
      BACKEND_COMPILE_EVENT="/jax/core/compile/backend_compile_duration")
  config = tiny.train_config()
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  assert tr.compiler_options == steps.CPU_COMPILER_OPTIONS
  state = tr.init_state(0)
  real = sharding.host_to_global(real_batch(), tr.mesh)
  events = []

  def listen(event, duration, **kwargs):
    del duration
    if event in (dispatch.JAXPR_TRACE_EVENT, dispatch.BACKEND_COMPILE_EVENT):
      events.append((event, kwargs.get("fun_name")))
  monitoring.register_event_duration_secs_listener(listen)
  try:
    ready = tr.precompile(state, real)
    compiled = [f for e, f in events if e == dispatch.BACKEND_COMPILE_EVENT]
    assert sorted(compiled) == ["jit(d_main)", "jit(d_reg)", "jit(g_main)",
                                "jit(g_reg)"]
    assert sorted(ready) == sorted(tr.compile_stats) == [
        "d_main", "d_reg", "g_main", "g_reg"]
    events.clear()
    for step in range(5):
      state, metrics = tr.train_step(state, real, step, step * 8)
    jax.block_until_ready(state)
    flops = tr.flops_per_iteration(state, real)
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert events == []
  assert flops is None or flops > 0
  assert int(state.step) == 5 and np.isfinite(float(metrics["D/loss"]))
