"""ADA and the contrastive discriminator in training: the sign statistics
over every D pass, the p adjustment, G's gradient through the pipeline and
D's real/fake head. A run with both on through gandl-train, kill -9 and
resume (identical p, r_t, heads and networks) and gandl-export:
tests/train/test_faults.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.model import augment
from gandl_jax.train import steps


def one_device():
  return sharding.make_mesh(jax.devices()[:1])


def real_batch(n=8, res=8, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, res, res, 5)).astype(
      np.float32)


def test_config_keys_validated_and_pipes_match_the_pipeline_names():
  assert sorted(config_lib.AUGMENT_PIPES) == sorted(augment.PIPELINES)
  base = config_lib.base_config()
  assert base.augment == "none" and base.contrastive is False
  for overrides, message in (
      ({"augment": "adaptive"}, "config.augment must be one of"),
      ({"augment_pipe": "bgcfn"}, "config.augment_pipe must be one of"),
      ({"ada_interval": 0}, "config.ada_interval must be >= 1"),
      ({"ada_kimg": 0.0}, "config.ada_kimg must be > 0"),
      ({"contrastive": True, "contrastive_temperature": 0.0},
       "config.contrastive_temperature must be > 0")):
    with pytest.raises(ValueError, match=message):
      config_lib.validate(tiny.tiny_config(**overrides))
  # The state's layout follows these keys: they cannot change on resume.
  stored = tiny.tiny_config().to_dict()
  with pytest.raises(ValueError, match="what the training state holds"):
    config_lib.check_resume(stored, tiny.tiny_config(augment="ada"),
                            allow=["augment"])
  with pytest.raises(ValueError, match="what the training state holds"):
    config_lib.check_resume(stored, tiny.tiny_config(contrastive=True),
                            allow=["contrastive"])


def _signs(tr, d_params, real):
  return float(np.sum(np.sign(np.asarray(tr._d(d_params, real)))))


def test_signs_of_every_d_pass_accumulate_then_the_ada_phase_resets():
  """p = 0 makes the pipeline the identity, so sign(D(real)) of each pass
  can be computed independently: D main with the state's D, the R1 pass
  with D after D main (as the reference reports both)."""
  tr = steps.Trainer(tiny.tiny_config(augment="fixed", augment_p=0.0,
                                      ada_interval=3), one_device())
  assert tr.phases_for_step(0) == ("g_main", "g_reg", "d_main", "d_reg")
  assert [s for s in range(10) if "ada" in tr.phases_for_step(s)] == [3, 6, 9]
  assert tr.phases_for_step(3)[0] == "ada"
  state = tr.init_state(0)
  real = real_batch()
  beta = jnp.float32(0.5)
  want_main = _signs(tr, state.d_params, real)
  state, m = tr.compiled("d_main", state)(state, real, beta)
  assert float(m["augment_p"]) == 0.0
  assert float(state.ada["sign_sum"]) == want_main
  assert float(state.ada["count"]) == 8
  want_reg = _signs(tr, state.d_params, real)
  state, _ = tr.compiled("d_reg", state)(state, real)
  assert float(state.ada["sign_sum"]) == want_main + want_reg
  assert float(state.ada["count"]) == 16
  state, m = tr.compiled("ada", state)(state)
  np.testing.assert_allclose(float(m["ada_rt"]), (want_main + want_reg) / 16,
                             rtol=1e-6)
  assert float(state.ada["p"]) == 0.0             # fixed mode: p stays
  assert float(state.ada["sign_sum"]) == float(state.ada["count"]) == 0


@pytest.mark.parametrize("sign_sum, count, p0", [
    (12.0, 16.0, 0.3), (-16.0, 16.0, 0.001), (4.0, 8.0, 0.0), (0.0, 0.0, 0.2)])
def test_ada_phase_moves_p_by_the_reference_rule(sign_sum, count, p0):
  batch, interval, kimg, target = 8, 4, 0.5, 0.6
  tr = steps.Trainer(tiny.tiny_config(augment="ada", ada_interval=interval,
                                      ada_kimg=kimg, ada_target=target),
                     one_device())
  state = tr.init_state(0)
  f = lambda x: jnp.asarray(x, jnp.float32)
  state = state.replace(ada={"p": f(p0), "sign_sum": f(sign_sum),
                             "count": f(count), "rt": f(0.25)})
  state, m = tr.ada_update(state)
  # stylegan2-ada-pytorch's training_loop, in numpy.
  if count:
    rt = sign_sum / count
    want = max(p0 + np.sign(rt - target) * batch * interval / (kimg * 1000),
               0.0)
  else:
    rt, want = 0.25, p0       # no statistics: p and r_t kept
  np.testing.assert_allclose(float(state.ada["p"]), want, rtol=1e-6)
  np.testing.assert_allclose(float(m["ada_rt"]), rt, rtol=1e-6)


def test_g_gradient_flows_through_the_augmentation():
  """G main's images go through the pipeline (p = 1, every group): the
  gradient with respect to them is non-zero and differs from without."""
  tr = steps.Trainer(tiny.tiny_config(augment="fixed", augment_p=1.0),
                     one_device())
  state = tr.init_state(0)
  img = jnp.asarray(real_batch(seed=1))
  key = jax.random.PRNGKey(3)

  def loss(x, ada):
    return jnp.sum(tr._d(state.d_params, tr._seen(x, key, steps._FAKE, ada)))
  with_aug = jax.grad(loss)(img, state.ada)
  tr_off = steps.Trainer(tiny.tiny_config(), one_device())
  without = jax.grad(lambda x: jnp.sum(tr_off._d(state.d_params, x)))(img)
  assert float(jnp.max(jnp.abs(with_aug))) > 0
  assert not np.allclose(with_aug, without, atol=1e-4)


def test_real_fake_head_on_fc_is_d_logit():
  tr = steps.Trainer(tiny.tiny_config(contrastive=True,
                                      contrastive_proj_dim=8), one_device())
  state = tr.init_state(0)
  logit, feats = tr._d(state.d_params, real_batch(), return_features=True)
  assert feats["fc"].shape == (8, tr.representation_dim())
  np.testing.assert_allclose(tr.real_fake_head(state.d_params, feats["fc"]),
                             logit, rtol=1e-5, atol=1e-6)
  z, f = tr.heads.apply({"params": state.heads}, feats["fc"])
  assert z.shape == f.shape == (8, 8)


# ---------------------------------------------------------------------------
# gandl-train with ADA and ContraD: kill -9, resume, export.
