"""gandl-train in a subprocess, killed with SIGKILL in a chosen window: the
driver of the fault-injection tests (tests/train/test_faults.py,
tests/baselines/test_convae.py).

The driver patches one function so that the process kills itself on that
function's N-th call (`train(fault=..., nth=N)`), which lands the kill in
the window named, deterministically:

  step           after an iteration, no save in flight (saves are waited
                 for); `trainer` names the class whose train_step counts
  meta_item      inside an async save: the `model` and `train` items are
                 being written, the `meta` item not yet
  step_metadata  between the save of the items and Orbax's step metadata
  commit         everything written, before the atomic rename of the step

No fault: an uninterrupted gandl-train. Every run has one CPU device
(XLA_FLAGS=""), so runs of one config share conftest's compilation cache.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
GAN_TRAINER = "gandl_jax.train.steps:Trainer"
CONVAE_TRAINER = "gandl_jax.baselines.convae.train:ConvAETrainer"

DRIVER = r"""
import importlib, os, signal, sys
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
  from gandl_jax.train import checkpointer
  module, _, name = os.environ["FAULT_TRAINER"].partition(":")
  trainer = getattr(importlib.import_module(module), name)
  save = checkpointer.TrainCheckpointer.save
  def waited_save(self, *args, **kwargs):
    out = save(self, *args, **kwargs)
    self.manager.wait_until_finished()
    return out
  checkpointer.TrainCheckpointer.save = waited_save
  orig = trainer.train_step
  def train_step(self, *args, **kwargs):
    out = orig(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
      jax.block_until_ready(out)
      os.kill(os.getpid(), signal.SIGKILL)
    return out
  trainer.train_step = train_step
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


def config_file(tmp_path, test_file: str, data: str,
                function: str = "_config") -> str:
  """TMP_PATH/cfg.py: a gandl-train config whose get_config returns
  FUNCTION(data) of the test module `test_file` (its __file__)."""
  path = tmp_path / "cfg.py"
  module = os.path.splitext(os.path.basename(test_file))[0]
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {TESTS!r})\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.abspath(test_file))!r})\n"
      f"from {module} import {function}\n"
      "def get_config(arg=''):\n"
      f"  return {function}({data!r})\n")
  return str(path)


def train(config: str, workdir, fault: str = "", nth: int = 1,
          trainer: str = GAN_TRAINER, timeout: float = 900):
  """Runs gandl-train --config=CONFIG --workdir=WORKDIR through the driver,
  killed by `fault` on its `nth` call; returns (exit status, output)."""
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", FAULT=fault,
             FAULT_AT=str(nth), FAULT_TRAINER=trainer)
  proc = subprocess.run(
      [sys.executable, "-c", DRIVER, f"--config={config}",
       f"--workdir={workdir}"], env=env, cwd=REPO, capture_output=True,
      text=True, timeout=timeout)
  return proc.returncode, proc.stdout + proc.stderr
