"""Fault injection (issue 11): `kill -9` at several points of a run, each
followed by a resume; the final networks equal an uninterrupted run's.

Each killed run is a real `gandl-train` process whose driver patches one
function to SIGKILL the process on its N-th call, so the kill lands in the
window named, deterministically:

  step           after an iteration, no save in flight (saves are waited for)
  meta_item      inside an async save: the `model` and `train` items are being
                 written, the `meta` item not yet
  step_metadata  between the save of the items and Orbax's step metadata
  commit         everything written, before the atomic rename of the step
"""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from gandl_jax import checkpoint
from gandl_jax.data import convert, synthetic
from gandl_jax import sharding
from gandl_jax.train import loop as train_loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_loop import tiny_config  # pylint: disable=wrong-import-position

_DRIVER = r"""
import os, signal, sys
import jax
fault, nth = os.environ.get("FAULT", ""), int(os.environ.get("FAULT_AT", "1"))
calls = [0]

def kill_on_nth(orig, counts=lambda args, kwargs: True):
  def wrapped(*args, **kwargs):
    if counts(args, kwargs):
      calls[0] += 1
      if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*args, **kwargs)
  return wrapped

def meta_item(args, kwargs):
  # JSON items of a save: our `meta` and, with the probe on, Orbax's metrics.
  save_args = kwargs.get("args", args[3] if len(args) > 3 else None)
  item = getattr(save_args, "item", None) or kwargs.get("item") or {}
  return isinstance(item, dict) and "data_position" in item

if fault == "step":
  from gandl_jax.train import checkpointer, steps
  save = checkpointer.TrainCheckpointer.save
  def waited_save(self, *args, **kwargs):
    out = save(self, *args, **kwargs)
    self.manager.wait_until_finished()
    return out
  checkpointer.TrainCheckpointer.save = waited_save
  orig = steps.Trainer.train_step
  def train_step(self, *args, **kwargs):
    out = orig(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
      jax.block_until_ready(out)
      os.kill(os.getpid(), signal.SIGKILL)
    return out
  steps.Trainer.train_step = train_step
elif fault == "meta_item":
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as m
  m.JsonCheckpointHandler.async_save = kill_on_nth(
      m.JsonCheckpointHandler.async_save, meta_item)
elif fault == "step_metadata":
  from orbax.checkpoint._src.checkpointers import async_checkpointer as m
  m.AsyncCheckpointer._save_step_metadata = kill_on_nth(
      m.AsyncCheckpointer._save_step_metadata)
elif fault == "commit":
  from orbax.checkpoint._src.checkpointers import async_checkpointer as m
  m._on_commit_callback = kill_on_nth(m._on_commit_callback)
elif fault:
  sys.exit("unknown FAULT " + fault)
from gandl_jax.cli import train
sys.argv = ["gandl-train"] + sys.argv[1:]
train.run()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  tree = synthetic.generate(str(root / "raw"), size=32, plates=1,
                            wells_per_plate=16, seed=0)
  convert.convert("rxrx19a", tree, str(root / "shards"), 8, num_shards=2)
  return str(root / "shards" / "*.tfrecord")


def _config(path):
  # 8 iterations of 8 images, a checkpoint every 2: steps 2, 4, 6, 8.
  return tiny_config(path, total_kimg=0.064, image_grid_every_kimg=0.064)


def _leaves(workdir):
  model, meta = checkpoint.restore_model(workdir)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(model)], meta


@pytest.mark.e2e
def test_kill_9_anywhere_then_resume_equals_uninterrupted(shards, tmp_path):
  ref = str(tmp_path / "ref")
  train_loop.train(_config(shards), ref,
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  want, want_meta = _leaves(ref)
  assert want_meta["step"] == 8

  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      "from test_faults import _config\n"
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
        cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr

  # (fault, on which call, the newest complete step afterwards)
  plan = [("meta_item", 2, 2),      # new run; killed saving step 4
          ("step_metadata", 2, 4),  # resumed at 2; killed saving step 6
          ("commit", 1, 4),         # resumed at 4; killed committing step 6
          ("step", 3, 6)]           # resumed at 4; killed after 3 iterations
  for fault, nth, latest in plan:
    code, out = run(fault, nth)
    assert code == -signal.SIGKILL, (fault, out[-3000:])
    assert max(checkpoint.list_steps(str(workdir))) == latest, (
        fault, checkpoint.list_steps(str(workdir)))
  code, out = run()
  assert code == 0, out[-3000:]
  got, meta = _leaves(str(workdir))
  assert meta["step"] == 8 and meta["nimg"] == 64
  assert not os.path.exists(workdir / "checkpoints_unreadable")
  for x, y in zip(want, got):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
