"""ADA and the contrastive discriminator in training: the sign statistics
over every D pass, the p adjustment, G's gradient through the pipeline,
D's real/fake head, and a run with both on through gandl-train (kill -9,
resume: identical p, r_t, heads and networks) and gandl-export."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import tiny
from gandl_jax import config as config_lib
from gandl_jax import sharding
from gandl_jax.data import convert, synthetic
from gandl_jax.model import augment
from gandl_jax.train import checkpointer, steps
from gandl_jax.train import loop as train_loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


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


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  tree = synthetic.generate(str(root / "raw"), size=32, plates=1,
                            wells_per_plate=16, seed=0)
  convert.convert("rxrx19a", tree, str(root / "shards"), 8, num_shards=2)
  return str(root / "shards" / "*.tfrecord")


def _config(path):
  """8 iterations of 8 images, checkpoints every 2; ADA adjusts every 3
  iterations (so a checkpoint holds part of an interval's statistics) and
  fast (p moves by 0.24 per adjustment), both ContraD terms on."""
  return tiny.tiny_config(
      path, total_kimg=0.064, image_grid_every_kimg=0.064,
      augment="ada", augment_p=0.3, ada_interval=3, ada_kimg=0.1,
      contrastive=True, contrastive_proj_dim=8,
      **{"loss.r1_interval": 2, "loss.pl_interval": 2})


def _train_state(workdir, config):
  tr = steps.Trainer(config, one_device())
  ckpt = checkpointer.TrainCheckpointer(workdir, async_save=False)
  try:
    state, meta = ckpt.restore_latest(tr.init_state(0))
  finally:
    ckpt.close()
  return jax.device_get(state), meta


def _metric_series(workdir, key):
  lines = [json.loads(l) for l in open(os.path.join(workdir,
                                                    "metrics.jsonl"))]
  return {l["step"]: l[key] for l in lines if l.get(key) is not None}


@pytest.mark.e2e
def test_ada_and_contrastive_survive_kill_9_and_export(shards, tmp_path):
  sys.path.insert(0, HERE)
  from test_faults import _DRIVER  # pylint: disable=import-outside-toplevel
  ref = str(tmp_path / "ref")
  train_loop.train(_config(shards), ref, mesh=one_device())
  want, want_meta = _train_state(ref, _config(shards))
  assert want_meta["step"] == 8
  # ADA moved p (from 0.3, by 0.24 a step, floored at 0) and logged it.
  p_series = _metric_series(ref, "augment_p")
  assert sorted(p_series) == list(range(1, 9))
  assert len({round(v, 6) for v in p_series.values()}) > 1
  assert set(_metric_series(ref, "ada_rt")) == {4, 7}
  assert np.isfinite(list(_metric_series(ref, "D/contrastive_loss").values())
                     ).all()

  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      f"sys.path.insert(0, {HERE!r})\n"
      "from test_ada import _config\n"
      "def get_config(arg=''):\n"
      f"  return _config({shards!r})\n")
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER)
  workdir = tmp_path / "w"
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")

  def run(fault="", nth=1):
    proc = subprocess.run(
        [sys.executable, str(driver), f"--config={cfg}",
         f"--workdir={workdir}"], env=dict(env, FAULT=fault,
                                           FAULT_AT=str(nth)),
        cwd=REPO, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr

  # Killed after 5 iterations: the newest checkpoint is step 4, inside the
  # second ADA interval (iterations 3-5).
  code, out = run("step", 5)
  assert code == -signal.SIGKILL, out[-3000:]
  code, out = run()
  assert code == 0, out[-3000:]
  got, meta = _train_state(str(workdir), _config(shards))
  assert meta["step"] == 8
  for name in ("p", "rt", "sign_sum", "count"):
    assert float(got.ada[name]) == float(want.ada[name]), name
  for a, b in zip(jax.tree_util.tree_leaves((want.heads, want.d_params,
                                             want.g_params)),
                  jax.tree_util.tree_leaves((got.heads, got.d_params,
                                             got.g_params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  got_p = _metric_series(str(workdir), "augment_p")
  for step in (6, 7, 8):
    np.testing.assert_allclose(got_p[step], p_series[step], rtol=1e-6)

  # The exported embedding is the representation ContraD trains: D's `fc`.
  emb = str(tmp_path / "emb.parquet")
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.export",
                      f"--workdir={workdir}", f"--data={shards}",
                      f"--output={emb}", "--batch=8"],
                     capture_output=True, text=True, env=env, cwd=REPO,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  df = pd.read_parquet(emb)
  feats = [c for c in df.columns if c.startswith("f") and c[1:].isdigit()]
  dim = steps.Trainer(_config(shards), one_device()).representation_dim()
  assert len(feats) == dim == 16 and len(df) > 0
  assert np.isfinite(df[feats].to_numpy()).all()
