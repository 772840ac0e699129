"""Fault injection: `kill -9` at several points of a run with ADA and the
contrastive D on, each followed by a resume; the final state (networks,
optimizers, ADA's p and statistics, the projection heads) equals an
uninterrupted run's, and the run exports through gandl-export. The kill
windows are tests/killing.py's."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

import killing
import tiny
from gandl_jax import checkpoint, sharding
from gandl_jax.train import checkpointer, steps


@pytest.fixture(scope="module")
def shards(tiny_shards):
  return tiny_shards


def _config(path):
  """8 iterations of 8 images, checkpoints every 2 (steps 2, 4, 6, 8); ADA
  adjusts every 3 iterations (so a checkpoint holds part of an interval's
  statistics) and fast (p moves by 0.24 per adjustment), both ContraD terms
  on."""
  return tiny.train_config(
      path, total_kimg=0.064, image_grid_every_kimg=0.064,
      augment="ada", augment_p=0.3, ada_interval=3, ada_kimg=0.1,
      contrastive=True, contrastive_proj_dim=8)


def _train_state(workdir, config):
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  ckpt = checkpointer.TrainCheckpointer(workdir, async_save=False)
  try:
    state, meta = ckpt.restore_latest(tr.init_state(0))
  finally:
    ckpt.close()
  return jax.device_get(state), meta


def _metric_series(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  return {l["step"]: l[key] for l in lines if l.get(key) is not None}


def _arrays(state):
  """Every leaf of the state as a numpy array (typed PRNG keys as data)."""
  def as_array(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return [as_array(x) for x in jax.tree_util.tree_leaves(state)]


@pytest.mark.e2e
def test_kill_9_anywhere_then_resume_equals_uninterrupted_and_exports(
    shards, tmp_path):
  cfg = killing.config_file(tmp_path, __file__, shards)
  # The uninterrupted run, in a subprocess like the killed ones (they share
  # its compiled phases through the compilation cache).
  ref = tmp_path / "ref"
  code, out = killing.train(cfg, ref)
  assert code == 0, out[-3000:]
  want, want_meta = _train_state(str(ref), _config(shards))
  assert want_meta["step"] == 8
  # ADA moved p (from 0.3, by 0.24 a step, floored at 0) and logged it.
  p_series = _metric_series(str(ref), "augment_p")
  assert sorted(p_series) == list(range(1, 9))
  assert len({round(v, 6) for v in p_series.values()}) > 1
  assert set(_metric_series(str(ref), "ada_rt")) == {4, 7}
  assert np.isfinite(list(_metric_series(str(ref), "D/contrastive_loss")
                          .values())).all()

  workdir = tmp_path / "w"
  # (fault, on which call, the newest complete step afterwards). The resumed
  # steps 2 and 4 lie inside ADA intervals (iterations 0-2, 3-5).
  plan = [("meta_item", 2, 2),      # new run; killed saving step 4
          ("step_metadata", 2, 4),  # resumed at 2; killed saving step 6
          ("commit", 1, 4),         # resumed at 4; killed committing step 6
          ("step", 3, 6)]           # resumed at 4; killed after 3 iterations
  for fault, nth, latest in plan:
    code, out = killing.train(cfg, workdir, fault, nth)
    assert code == -signal.SIGKILL, (fault, out[-3000:])
    assert max(checkpoint.list_steps(str(workdir))) == latest, (
        fault, checkpoint.list_steps(str(workdir)))
  code, out = killing.train(cfg, workdir)
  assert code == 0, out[-3000:]
  assert not os.path.exists(workdir / "checkpoints_unreadable")
  got, meta = _train_state(str(workdir), _config(shards))
  assert meta["step"] == 8 and meta["nimg"] == 64
  for name in ("p", "rt", "sign_sum", "count"):
    assert float(got.ada[name]) == float(want.ada[name]), name
  for a, b in zip(_arrays(want), _arrays(got)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  got_p = _metric_series(str(workdir), "augment_p")
  for step in (7, 8):
    np.testing.assert_allclose(got_p[step], p_series[step], rtol=1e-6)

  # The exported embedding is the representation ContraD trains: D's `fc`.
  emb = str(tmp_path / "emb.parquet")
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.export",
                      f"--workdir={workdir}", f"--data={shards}",
                      f"--output={emb}", "--batch=8"],
                     capture_output=True, text=True, cwd=killing.REPO,
                     env=dict(os.environ, PYTHONPATH=killing.REPO,
                              XLA_FLAGS=""), timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  df = pd.read_parquet(emb)
  feats = [c for c in df.columns if c.startswith("f") and c[1:].isdigit()]
  dim = steps.Trainer(_config(shards), sharding.make_mesh(
      jax.devices()[:1])).representation_dim()
  assert len(feats) == dim == 16 and len(df) > 0
  assert np.isfinite(df[feats].to_numpy()).all()
