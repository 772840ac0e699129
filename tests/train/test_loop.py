"""The training job end to end on tiny synthetic shards: resume, preemption
(SIGTERM, kill -9), monitoring output, config validation."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tiny
from gandl_jax import checkpoint
from gandl_jax import config as config_lib
from gandl_jax.data import convert, synthetic
from gandl_jax import sharding
from gandl_jax.train import loop as train_loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Tiny synthetic RxRx19a converted at 8x8 and 32x32."""
  root = tmp_path_factory.mktemp("data")
  tree = synthetic.generate(str(root / "raw"), size=32, plates=1,
                            wells_per_plate=16, seed=0)
  out = {}
  for res in (8, 32):
    convert.convert("rxrx19a", tree, str(root / f"shards{res}"), res,
                    num_shards=2)
    out[res] = str(root / f"shards{res}" / "*.tfrecord")
  return out


tiny_config = tiny.train_config


def _leaves(workdir, step=None):
  model, meta = checkpoint.restore_model(workdir, step)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(model)], meta


def test_resume_equals_uninterrupted(shards, tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  straight = tiny_config(shards[8])
  s = train_loop.train(straight, str(tmp_path / "a"), mesh=mesh)
  assert s["step"] == 4 and s["reason"] == "finished"
  # Half, stop, resume the same command, the other half.
  first = train_loop.train(tiny_config(shards[8]), str(tmp_path / "b"),
                                   mesh=mesh, max_steps=2)
  assert first["step"] == 2
  second = train_loop.train(tiny_config(shards[8]),
                                    str(tmp_path / "b"), mesh=mesh)
  assert second["step"] == 4
  a, meta_a = _leaves(str(tmp_path / "a"))
  b, meta_b = _leaves(str(tmp_path / "b"))
  assert meta_a["step"] == meta_b["step"] == 4
  assert meta_b["nimg"] == 32 and meta_b["data_position"] == 4
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)

  # Monitoring: JSON lines with finite, moving losses; TensorBoard; grids.
  lines = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  for key in ("G/loss", "D/loss", "perf/img_per_sec", "progress/kimg"):
    assert all(np.isfinite(l[key]) for l in lines), key
  assert len({round(l["D/loss"], 6) for l in lines}) > 1
  assert any("D/r1_penalty" in l for l in lines)
  assert any("G/pl_penalty" in l for l in lines)
  assert glob.glob(str(tmp_path / "a" / "tb" / "events.out.tfevents.*"))
  assert len(glob.glob(str(tmp_path / "a" / "samples" / "fakes-*.png"))) == 2
  assert json.load(open(tmp_path / "a" / "config.json"))["batch_size"] == 8


def test_non_finite_loss_stops_with_clear_error(shards, tmp_path):
  config = tiny_config(shards[8], **{"optim.d_lr": float("inf")})
  mesh = sharding.make_mesh(jax.devices()[:1])
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d+"):
    train_loop.train(config, str(tmp_path / "w"), mesh=mesh)
  # Nothing non-finite was checkpointed.
  for step in checkpoint.list_steps(str(tmp_path / "w")) if os.path.isdir(
      tmp_path / "w" / "checkpoints") else ():
    leaves, _ = _leaves(str(tmp_path / "w"), step)
    assert all(np.all(np.isfinite(x)) for x in leaves)


def test_state_is_finite_checks_float_leaves_with_one_cached_program():
  state = {"a": np.ones((3, 2), np.float32), "n": np.arange(4),
           "b": [np.zeros(5, np.float32)]}
  assert train_loop._state_is_finite(state)
  before = train_loop._all_finite._cache_size()
  for bad in (np.nan, np.inf, -np.inf):
    broken = dict(state, b=[np.array([0, 0, bad, 0, 0], np.float32)])
    assert not train_loop._state_is_finite(broken), bad
  assert train_loop._state_is_finite(state)
  # Same structure, same program: nothing rebuilt per call.
  assert train_loop._all_finite._cache_size() == before


def _train_cmd(config_path, workdir, *flags):
  return [sys.executable, "-m", "gandl_jax.cli.train",
          f"--config={config_path}", f"--workdir={workdir}", *flags]


def _wait_for(predicate, timeout, proc):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return True
    if proc.poll() is not None:
      return predicate()
    time.sleep(0.2)
  return False


@pytest.mark.e2e
def test_sigterm_saves_and_kill9_mid_save_leaves_restorable_workdir(
    shards, tmp_path):
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
      "from test_loop import tiny_config\n"
      "def get_config(arg=''):\n"
      f"  c = tiny_config({shards[8]!r})\n"
      "  c.total_kimg = 100.0\n"
      "  c.checkpoint_every_kimg = float(arg or 100.0)\n"
      "  c.log_every_kimg = 0.008\n"
      "  c.image_grid_every_kimg = 100.0\n"
      "  return c\n")
  workdir = tmp_path / "w"
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  metrics = workdir / "metrics.jsonl"

  cache = tmp_path / "xla_cache"
  cache_flag = f"--compilation_cache_dir={cache}"
  # conftest.py's suite-wide cache (JAX_COMPILATION_CACHE_DIR) would take
  # precedence over the flag.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)

  # 1. SIGTERM: a final checkpoint at the current step, exit status 143.
  proc = subprocess.Popen(_train_cmd(cfg_file, workdir, cache_flag), env=env,
                          cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  try:
    assert _wait_for(lambda: metrics.exists() and len(
        metrics.read_text().splitlines()) >= 2, 300, proc), proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
  finally:
    proc.kill()
  assert proc.returncode == 143, out
  steps = checkpoint.list_steps(str(workdir))
  assert len(steps) == 1 and steps[0] >= 2, (steps, out)
  sigterm_step = steps[0]
  # The compiled phases went to the persistent compilation cache, which the
  # next run of the same configuration reads.
  assert "compiled the training phases in" in out, out
  assert len(list(cache.iterdir())) >= 4, list(cache.iterdir())

  # 2. kill -9 while asynchronous saves are being written (one per step).
  cfg_every_step = str(cfg_file) + ":0.008"
  proc = subprocess.Popen(_train_cmd(cfg_every_step, workdir, cache_flag,
                                     "--allow_config_change="
                                     "checkpoint_every_kimg"), env=env,
                          cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  try:
    assert _wait_for(lambda: len(checkpoint.list_steps(str(workdir))) >= 3,
                     300, proc), proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  latest = max(checkpoint.list_steps(str(workdir)))
  assert latest > sigterm_step
  _, meta = _leaves(str(workdir))          # restorable
  assert meta["step"] >= sigterm_step



def test_unreadable_latest_checkpoint_is_skipped_and_set_aside(tmp_path):
  from gandl_jax.train import checkpointer  # pylint: disable=import-outside-toplevel
  from gandl_jax.train import steps  # pylint: disable=import-outside-toplevel
  config = tiny_config("")
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  state = tr.init_state(0)
  ckpt = checkpointer.TrainCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {"model": config.model.to_dict(), "nimg": 8})
  later = state.replace(pl_mean=state.pl_mean + 1.0)
  ckpt.save(2, later, {"model": config.model.to_dict(), "nimg": 16})
  for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "train" / "**"),
                     recursive=True):
    if os.path.isfile(f):
      os.remove(f)
  restored, meta = ckpt.restore_latest(state)
  assert meta["step"] == 1 and float(restored.pl_mean) == 0.0
  assert ckpt.latest_step() == 1
  assert glob.glob(str(tmp_path / "checkpoints_unreadable" / "2-*"))
  ckpt.save(2, later, {"model": config.model.to_dict(), "nimg": 16})  # again
  ckpt.close()
  assert checkpoint.list_steps(str(tmp_path)) == (1, 2)


@pytest.mark.slow  # ~1-2 min of compilation; test_resume_* covers the same code
def test_demo_config_short_run(shards, tmp_path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "demo", os.path.join(REPO, "configs", "demo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.data.path = shards[32]
  config.log_every_kimg = 2 * config.batch_size / 1000
  config.image_grid_every_kimg = 4 * config.batch_size / 1000
  config.image_grid_size = 3
  s = train_loop.train(config, str(tmp_path), max_steps=4)
  assert s["step"] == 4
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert len(lines) == 2
  for key in ("G/loss", "D/loss"):
    assert all(np.isfinite(l[key]) for l in lines)
    assert lines[0][key] != lines[1][key]
  png = glob.glob(str(tmp_path / "samples" / "*.png"))
  assert len(png) == 1 and os.path.getsize(png[0]) > 100


@pytest.mark.parametrize("override,message", [
    ({"foo": 1}, "unknown key 'config.foo'"),
    ({"model.resolution": 48}, "power of two"),
    ({"batch_size": 12}, "multiple of the number of devices"),
    ({"model.img_channels": 3}, "5 channels but config.model expects 3"),
    ({"model.resolution": 16}, "resolution 8 but config.model expects 16"),
])
def test_config_errors_before_compilation(shards, tmp_path, override, message):
  config = tiny_config(shards[8], **override)
  with pytest.raises(ValueError, match=message):
    devices = jax.devices() if "batch_size" in override else jax.devices()[:1]
    train_loop.train(config, str(tmp_path),
                     mesh=sharding.make_mesh(devices))
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.e2e
def test_cli_reports_config_errors_in_one_line(tmp_path):
  cfg = tmp_path / "bad.py"
  cfg.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
      "from test_loop import tiny_config\n"
      "def get_config(arg=''):\n"
      "  return tiny_config('/nonexistent/*.tfrecord')\n")
  out = subprocess.run(
      _train_cmd(cfg, tmp_path / "w", "--config.model.resolution=48"),
      env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, capture_output=True,
      text=True, timeout=300)
  assert out.returncode == 1
  assert "gandl-train: error: invalid config" in out.stderr
  assert "power of two" in out.stderr and "Traceback" not in out.stderr


def test_run_length_and_config_changes_on_resume(shards, tmp_path):
  """Items 5 and 7: the run stops at the first nimg >= total_kimg * 1000; a
  changed config is refused with its diff before anything is touched, an
  allowed change is applied, a shape change never is, and an allowed batch
  size change keeps the images seen and the data position."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  w = str(tmp_path / "w")
  # 26 images at batch 8: 3.25 iterations -> 4 (rounding gave 3).
  s = train_loop.train(tiny_config(shards[8], total_kimg=0.026), w, mesh=mesh)
  assert s["step"] == 4 and s["kimg"] == 0.032
  steps_before = checkpoint.list_steps(w)
  cfg_json = (tmp_path / "w" / "config.json").read_text()

  def untouched():
    assert checkpoint.list_steps(w) == steps_before
    assert not os.path.exists(tmp_path / "w" / "checkpoints_unreadable")
    assert (tmp_path / "w" / "config.json").read_text() == cfg_json

  with pytest.raises(ValueError, match=r"(?s)total_kimg: 0\.026 -> 0\.042.*"
                     r"--allow_config_change=total_kimg"):
    train_loop.train(tiny_config(shards[8], total_kimg=0.042), w, mesh=mesh)
  untouched()
  # A new architecture: refused even when allowed (it used to move every
  # checkpoint aside and start again from step 0).
  with pytest.raises(ValueError, match="parameter shapes"):
    train_loop.train(tiny_config(shards[8], total_kimg=0.026,
                                 **{"model.channel_base": 128}), w,
                     mesh=mesh, allow_config_change=["model"])
  untouched()
  with pytest.raises(ValueError, match="no such config key"):
    train_loop.train(tiny_config(shards[8], total_kimg=0.042), w, mesh=mesh,
                     allow_config_change=["total_kimgs"])
  untouched()
  s = train_loop.train(tiny_config(shards[8], total_kimg=0.042), w,
                       mesh=mesh, allow_config_change=["total_kimg"])
  assert s["step"] == 6 and s["kimg"] == 0.048
  # Batch 8 -> 16: refused unless allowed; then 48 images seen = 3 batches
  # of 16, and 80 images need 2 more iterations.
  big = tiny_config(shards[8], total_kimg=0.080, batch_size=16)
  with pytest.raises(ValueError, match="batch_size: 8 -> 16"):
    train_loop.train(big, w, mesh=mesh, allow_config_change=["total_kimg"])
  s = train_loop.train(big, w, mesh=mesh,
                       allow_config_change=["total_kimg", "batch_size"])
  _, meta = _leaves(w)
  assert (meta["step"], meta["nimg"], meta["data_position"]) == (8, 80, 5)
  assert json.load(open(tmp_path / "w" / "config.json"))["batch_size"] == 16


def test_resume_position_remaps_batch_size():
  meta = {"step": 6, "nimg": 48, "data_position": 6,
          "config": {"batch_size": 8}}
  assert train_loop._resume_position(meta, 8) == {
      "step": 6, "nimg": 48, "data_position": 6}
  assert train_loop._resume_position(meta, 16)["data_position"] == 3
  assert train_loop._resume_position(meta, 32)["data_position"] == 2  # 48->64
  assert train_loop._resume_position(meta, 4)["data_position"] == 12
  assert train_loop.steps_to_reach(26, 8) == 4
  assert train_loop.steps_to_reach(0.032 * 1000, 8) == 4
  assert train_loop.steps_to_reach(0, 8) == 0


def _saved(tmp_path):
  from gandl_jax.train import checkpointer  # pylint: disable=import-outside-toplevel
  from gandl_jax.train import steps  # pylint: disable=import-outside-toplevel
  config = tiny_config("")
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  state = tr.init_state(0)
  ckpt = checkpointer.TrainCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {"model": config.model.to_dict(), "nimg": 8})
  ckpt.save(2, state, {"model": config.model.to_dict(), "nimg": 16})
  return checkpointer, ckpt, state


def test_transient_restore_error_propagates_and_moves_nothing(tmp_path,
                                                              monkeypatch):
  """Item 7: only clear corruption sets a checkpoint aside."""
  checkpointer, ckpt, state = _saved(tmp_path)
  real_restore = ckpt.manager.restore

  def flaky(step, args=None):
    if "train" in dict(args.items()):
      raise ValueError("UNAVAILABLE: connection reset by peer")
    return real_restore(step, args=args)
  monkeypatch.setattr(ckpt.manager, "restore", flaky)
  with pytest.raises(ValueError, match="UNAVAILABLE"):
    ckpt.restore_latest(state)
  assert checkpoint.list_steps(str(tmp_path)) == (1, 2)
  assert not os.path.exists(tmp_path / "checkpoints_unreadable")
  for error, corrupt in (
      (ValueError("UNAVAILABLE: x"), False), (MemoryError(), False),
      (ValueError("Requested shape: (1,) is not compatible with the stored "
                  "shape: (2,)"), False), (OSError("timeout"), False),
      (ValueError("DATA_LOSS: checksum"), True),
      (ValueError("OUT_OF_RANGE: Error opening ..."), True),
      (json.JSONDecodeError("x", "{", 1), True),
      (FileNotFoundError("x"), True)):
    assert checkpointer.is_corruption(error) == corrupt, error
  monkeypatch.undo()
  ckpt.close()


def test_corrupt_checkpoint_that_cannot_be_moved_is_never_deleted(
    tmp_path, monkeypatch):
  """Item 7: where a corrupt step cannot be renamed (GCS), stop with a
  message instead of deleting it."""
  checkpointer, ckpt, state = _saved(tmp_path)
  for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "train" / "**"),
                     recursive=True):
    if os.path.isfile(f):
      os.remove(f)

  def no_rename(src, dst):
    raise OSError("directories cannot be renamed here")
  monkeypatch.setattr(checkpointer, "_move", no_rename)
  with pytest.raises(ValueError, match="nothing was deleted"):
    ckpt.restore_latest(state)
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  ckpt.close()


def test_train_restores_the_previous_sigterm_handler(shards, tmp_path):
  """Item 9 (library half): the SIGTERM handler is scoped to training."""
  def mine(signum, frame):
    pass
  previous = signal.signal(signal.SIGTERM, mine)
  try:
    train_loop.train(tiny_config(shards[8]), str(tmp_path / "w"),
                     mesh=sharding.make_mesh(jax.devices()[:1]), max_steps=1)
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, previous)


def _config_module(name):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_paper_configs_clamp_at_256_like_the_reference():
  """Item 2: stylegan2-ada-pytorch's train.py sets conv_clamp=256 for every
  config (mixed precision) and None with --fp32; the paper configs compute
  in bfloat16, the demo in float32."""
  paper = _config_module("gandl_rxrx19a")
  for arg in ("256", "512", "1024", "256,runlocal"):
    config = paper.get_config(arg)
    assert config.model.conv_clamp == 256.0, arg
    config_lib.validate(config, 1, 1)
  demo_cfg = _config_module("demo").get_config()
  assert demo_cfg.num_bf16_res == 0
  assert paper.get_config("256").num_bf16_res == 4   # reference: num_fp16_res
  assert paper.get_config("256,runlocal").num_bf16_res == 0
  assert demo_cfg.model.conv_clamp is None


def test_compilation_cache_setting():
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert train_loop.use_compilation_cache("") is None
    assert train_loop.use_compilation_cache(None) is None
    assert not jax.config.jax_compilation_cache_dir
    assert train_loop.use_compilation_cache("~/x") == os.path.expanduser("~/x")
    assert jax.config.jax_compilation_cache_dir == os.path.expanduser("~/x")
    # A directory already chosen (JAX_COMPILATION_CACHE_DIR) is kept.
    assert train_loop.use_compilation_cache("/elsewhere") == (
        os.path.expanduser("~/x"))
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
  assert train_loop.DEFAULT_COMPILATION_CACHE_DIR.endswith(
      os.path.join("gandl_jax", "jax"))
