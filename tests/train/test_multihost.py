"""Multi-host SIGTERM: two real JAX processes on the
loopback address; SIGTERM to one of them; both save the same step and exit
with the preempted status (143)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from gandl_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HOST = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, cfg, workdir = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=int(pid))
from gandl_jax.cli import train
sys.argv = ["gandl-train", f"--config={cfg}", f"--workdir={workdir}"]
train.run()
"""


@pytest.fixture(scope="module")
def shards(tiny_shards):
  return tiny_shards


@pytest.mark.e2e
def test_sigterm_to_one_host_stops_both_at_the_same_step(shards, tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      "from tiny import tiny_config\n"
      "def get_config(arg=''):\n"
      f"  c = tiny_config({shards!r})\n"
      "  c.total_kimg = 100.0\n"
      "  c.checkpoint_every_kimg = 100.0\n"
      "  c.image_grid_every_kimg = 100.0\n"
      "  return c\n")
  workdir = tmp_path / "w"
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = [subprocess.Popen(
      [sys.executable, "-c", _HOST, str(port), str(i), str(cfg),
       str(workdir)], env=env, cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  metrics = workdir / "metrics.jsonl"
  try:
    t0 = time.time()
    while not (metrics.exists() and
               len(metrics.read_text().splitlines()) >= 2):
      assert time.time() - t0 < 1200, "training did not start"
      assert all(p.poll() is None for p in procs), procs[0].stdout.read()
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)    # the non-coordinator host only
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 143, log[-3000:]
  stopped = [re.findall(r"Training preempted at step (\d+)", log)
             for log in logs]
  assert all(len(s) == 1 for s in stopped), [l[-2000:] for l in logs]
  assert stopped[0] == stopped[1]
  step = int(stopped[0][0])
  assert step >= 2 and checkpoint.list_steps(str(workdir)) == (step,)
  _, meta = checkpoint.restore_model(str(workdir))
  assert meta["step"] == step and meta["nimg"] == 8 * step
