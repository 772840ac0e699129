"""The representation probe during training (gandl_jax/train/probe.py): the
probe set, the linear probes, metrics at the configured interval, the same
set after a resume, and the best-probe checkpoint (`--step best`)."""
import json
import math

import jax
import numpy as np
import pandas as pd
import pytest

import tiny
from gandl_jax import checkpoint
from gandl_jax import schema
from gandl_jax import sharding
from gandl_jax.data import pipeline
from gandl_jax.inference import api
from gandl_jax.train import checkpointer, probe, steps
from gandl_jax.train import loop as train_loop


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Synthetic RxRx19a, 4 experiments x 2 plates x 16 wells, at 8x8: 8
  plates (4 HRCE, 4 VERO), 320 untreated Mock / Active sites."""
  return tiny.make_shards(str(tmp_path_factory.mktemp("data")), plates=2)


def test_allocate_spreads_evenly():
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(probe._allocate([1, 10, 10], 13, rng),
                                [1, 6, 6])
  take = probe._allocate([1, 10, 10], 12, rng)
  assert take.sum() == 12 and take[0] == 1 and sorted(take[1:]) == [5, 6]
  np.testing.assert_array_equal(probe._allocate([3, 4], 50, rng), [3, 4])


def test_select_sites_metadata_only_stratified_deterministic(shards):
  table = pipeline.read_sites_index(shards)
  a = probe.select_sites(table, 64, seed=0)
  assert len(a) == 64 and list(a.columns) == list(probe.COLUMNS)
  full = table.set_index("site_id").loc[a["site_id"]]
  assert (full["treatment"] == "").all()
  assert set(full["disease_condition"]) == {schema.MOCK, schema.ACTIVE}
  # 2 conditions x 8 plates (each plate one cell type): 4 sites per stratum.
  counts = a.groupby(["disease_condition", "experiment", "plate"]).size()
  assert len(counts) == 16 and set(counts) == {4}
  pd.testing.assert_frame_equal(a, probe.select_sites(table, 64, seed=0))
  # Independent of the table's row order; another seed draws another set.
  shuffled = table.sample(frac=1.0, random_state=1)
  assert (set(probe.select_sites(shuffled, 64, seed=0)["site_id"])
          == set(a["site_id"]))
  assert set(probe.select_sites(table, 64, seed=1)["site_id"]) != set(
      a["site_id"])
  assert len(probe.select_sites(table, 10_000, seed=0)) == 320
  with pytest.raises(ValueError, match="no untreated"):
    probe.select_sites(table[table["treatment"] != ""], 64, seed=0)


def test_scores_on_constructed_features(shards):
  meta = probe.select_sites(pipeline.read_sites_index(shards), 10_000, 0)
  rng = np.random.default_rng(0)
  active = (meta["disease_condition"] == schema.ACTIVE).to_numpy(float)
  vero = (meta["cell_type"] == "VERO").to_numpy(float)
  noise = rng.normal(size=(len(meta), 6)).astype(np.float32)
  # Perfectly separating features: 1.0 on both tasks.
  X = np.concatenate([np.stack([active, vero], 1) * 5, noise], 1)
  s = probe.scores(X.astype(np.float32), meta)
  assert s[probe.CONTROL] == s[probe.CELL_TYPE] == s[probe.SCORE] == 1.0
  assert s["reasons"] == {}
  # Cell type only: that task 1.0, the control task at chance.
  X = np.concatenate([vero[:, None] * 5, noise], 1).astype(np.float32)
  s = probe.scores(X, meta)
  assert s[probe.CELL_TYPE] == 1.0 and s[probe.CONTROL] < 0.7
  assert s[probe.SCORE] == pytest.approx((1.0 + s[probe.CONTROL]) / 2)
  # One cell type only: that task cannot run (NaN, a reason), the score is
  # the control task's.
  hrce = (meta["cell_type"] == "HRCE").to_numpy()
  m1 = meta[hrce].reset_index(drop=True)
  X = np.concatenate([active[hrce, None] * 5, noise[hrce]], 1)
  s = probe.scores(X.astype(np.float32), m1)
  assert math.isnan(s[probe.CELL_TYPE]) and probe.CELL_TYPE in s["reasons"]
  assert s[probe.CONTROL] == s[probe.SCORE] == 1.0


@pytest.mark.parametrize("override,message", [
    ({"probe_every_kimg": -1.0}, "probe_every_kimg must be >= 0"),
    ({"probe_sites": 4}, "probe_sites must be >= 16"),
    ({"probe_plate_fraction": 0.0}, "probe_plate_fraction must be in"),
    ({"probe_plate_fraction": 1.5}, "probe_plate_fraction must be in"),
    ({"probe_layers": "fc,b16,pool"}, r"unknown layer name\(s\) \['pool'\]"),
])
def test_probe_config_errors(override, message):
  from gandl_jax import config as config_lib
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny.tiny_config("", **override))


def test_unknown_probe_layer_fails_before_training(shards, tmp_path):
  config = _config(shards, probe_layer="b64")
  with pytest.raises(ValueError, match="config.probe_layer: unknown layer"):
    train_loop.train(config, str(tmp_path), mesh=sharding.make_mesh(
        jax.devices()[:1]))
  assert not (tmp_path / "checkpoints").exists()


def _config(path, **overrides):
  return tiny.train_config(path, **{
      "probe_every_kimg": 0.016, "probe_sites": 64,
      "checkpoint_every_kimg": 1.0, **overrides})


def test_probe_during_training_resume_and_best(shards, tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  workdir = str(tmp_path / "w")
  first = train_loop.train(_config(shards), workdir, mesh=mesh, max_steps=2)
  assert first["step"] == 2 and first["metrics"][probe.SITES] == 64
  sites_file = tmp_path / "w" / probe.PROBE_SITES_FILE
  drawn = probe.read_sites(str(sites_file))
  table = pipeline.read_sites_index(shards)
  pd.testing.assert_frame_equal(
      drawn, probe.select_sites(table, 64, 0, plate_fraction=0.25))
  # The default fraction: 2 of the 4 plates of each cell type.
  plates = probe.plates_of(drawn)
  assert len(plates) == 4 and first["metrics"][probe.PLATES] == 4
  # A resumed run reads the recorded set back (here: edited to 32 sites)
  # instead of drawing it again.
  edited = drawn.iloc[::2].reset_index(drop=True)
  probe.write_sites(str(sites_file), edited)
  before = sites_file.read_bytes()
  second = train_loop.train(_config(shards), workdir, mesh=mesh)
  assert second["step"] == 4
  assert sites_file.read_bytes() == before

  lines = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  probed = {l["step"]: l for l in lines if probe.SCORE in l}
  assert sorted(probed) == [2, 4]                 # every 0.016 kimg = 2 steps
  assert probed[2][probe.SITES] == 64 and probed[4][probe.SITES] == 32
  for l in probed.values():
    for k in (probe.CONTROL, probe.CELL_TYPE, probe.SCORE):
      assert l[k] is None or 0.0 <= l[k] <= 1.0, (k, l)
    assert l[probe.SECONDS] >= l[probe.EMBED_SECONDS] > 0
    # Every layer of the 8x8 model in probe_layers (b16 and b32 are not in
    # it), from one pass; fc's are the selection layer's.
    per_layer = {k for k in l if k.count("/") == 2}
    assert per_layer == {probe.layer_key(t, layer) for t in probe.TASKS
                         for layer in ("fc", "conv", "b8")}, per_layer
    assert l[probe.layer_key("control", "fc")] == l[probe.CONTROL]
    assert l[probe.layer_key("score", "fc")] == l[probe.SCORE]

  # Checkpoints: step 2 (first score: a new best) and 4 (the end), each
  # with its probe result in the meta; 'best' is the highest score.
  steps_saved = checkpoint.list_steps(workdir)
  assert steps_saved == (2, 4), steps_saved
  for s in steps_saved:
    _, meta = checkpoint.restore_model(workdir, s)
    assert meta["probe"]["score"] == pytest.approx(probed[s][probe.SCORE])
    assert meta["probe"]["plates"] == plates
    assert meta["probe"]["layer"] == "fc"
    assert sorted(meta["probe"]["layers"]) == ["b8", "conv", "fc"]
    for layer in ("b8", "conv"):
      assert checkpoint.probe_score(meta, layer) == pytest.approx(
          probed[s][probe.layer_key("score", layer)], nan_ok=True)
  scores = {s: probed[s][probe.SCORE] for s in steps_saved}
  best = max(steps_saved, key=lambda s: (scores[s], s))
  assert checkpoint.best_step(workdir) == best
  assert api.load(workdir, step="best").step == best


def test_probe_features_are_the_exported_features(shards, tmp_path):
  """The probe embeds with gandl-export's function: the same features as
  `Model.embed` on the same batches."""
  config = _config(shards)
  mesh = sharding.make_mesh(jax.devices()[:1])
  tr = steps.Trainer(config, mesh)
  state = tr.init_state(0)
  tracker = probe.Tracker(config, str(tmp_path), mesh, tr.D, every=2)
  X = tracker.features(state.d_params)
  model = api.Model(state.model_variables(), {"model": config.model.to_dict()},
                    batch_size=config.batch_size)
  images, index = [], []
  for b in tracker._batches:   # 64 sites: 8 full batches, shard order
    images.append(b["image"])
    index.append(b["index"])
  feats = model.embed(np.concatenate(images))
  row = dict(zip(np.concatenate(index).tolist(), range(64)))
  order = [row[r] for r in tracker._order]
  np.testing.assert_allclose(X, feats[order], rtol=1e-5, atol=1e-5)


def _state(config):
  tr = steps.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  return tr.init_state(0)


def test_best_probe_checkpoint_survives_retention(tmp_path):
  config = tiny.tiny_config("")
  state = _state(config)
  model = config.model.to_dict()
  ckpt = checkpointer.TrainCheckpointer(str(tmp_path), keep=1,
                                        async_save=False, keep_best=True)
  for step, score in ((1, 0.6), (2, 0.9), (3, 0.7), (4, None)):
    meta = {"model": model}
    if score is not None:
      meta["probe"] = {"score": score}
    ckpt.save(step, state, meta)
  assert checkpoint.list_steps(str(tmp_path)) == (2, 4)
  ckpt.close()
  assert checkpoint.best_step(str(tmp_path)) == 2
  assert checkpoint.resolve_step(str(tmp_path), "best") == 2
  assert checkpoint.restore_model(str(tmp_path), "best")[1]["step"] == 2
  # A resumed run knows the best so far and keeps protecting it.
  ckpt = checkpointer.TrainCheckpointer(str(tmp_path), keep=1,
                                        async_save=False, keep_best=True)
  assert ckpt.best_score() == 0.9
  ckpt.save(5, state, {"model": model, "probe": {"score": 0.8}})
  ckpt.close()
  assert checkpoint.list_steps(str(tmp_path)) == (2, 5)
  with pytest.raises(ValueError, match="number or 'best'"):
    checkpoint.resolve_step(str(tmp_path), "last")


def _meta(model, score, layers):
  return {"model": model, "probe": {
      "score": score, "layer": "fc", "plates": ["e_1", "e_2"],
      "layers": {k: {"score": v} for k, v in dict(layers, fc=score).items()}}}


def test_each_layer_best_survives_retention_and_best_layer(tmp_path):
  """Retention keeps the best step of every probed layer; 'best' with a
  layer selects on that layer's score and records it."""
  config = tiny.tiny_config("")
  state = _state(config)
  model = config.model.to_dict()
  ckpt = checkpointer.TrainCheckpointer(str(tmp_path), keep=1,
                                        async_save=False, keep_best=True)
  for step, fc, b8 in ((1, 0.6, 0.9), (2, 0.8, 0.5), (3, 0.7, 0.6),
                       (4, 0.5, 0.7)):
    ckpt.save(step, state, _meta(model, fc, {"b8": b8}))
  ckpt.close()
  # 1: b8's best, 2: fc's best, 4: the latest.
  assert checkpoint.list_steps(str(tmp_path)) == (1, 2, 4)
  assert checkpoint.best_step(str(tmp_path)) == 2
  sel = checkpoint.best_selection(str(tmp_path), "b8")
  assert sel == {"step": 1, "layer": "b8", "score": 0.9,
                 "plates": ["e_1", "e_2"]}
  assert checkpoint.best_selection(str(tmp_path))["layer"] == "fc"
  with pytest.raises(FileNotFoundError, match="for layer 'b16'"):
    checkpoint.best_selection(str(tmp_path), "b16")


def test_read_curve_keeps_the_last_line_of_a_step(tmp_path):
  lines = [{"step": 2, "progress/kimg": 0.5, "probe/control_bacc": 0.6},
           {"step": 3, "progress/kimg": 0.75, "G/loss": 1.0},
           {"step": 4, "progress/kimg": 1.0, "probe/control_bacc": 0.7,
            "probe/cell_type_bacc": float("nan"), "augment_p": 0.1},
           # A resumed run logging step 4 again: this line wins.
           {"step": 4, "progress/kimg": 1.0, "probe/control_bacc": 0.65,
            "augment_p": 0.1}]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(l) + "\n" for l in lines))
  curve = probe.read_curve(str(tmp_path))
  assert [(r["step"], r["kimg"], r[probe.CONTROL]) for r in curve] == [
      (2, 0.5, 0.6), (4, 1.0, 0.65)]
  assert probe.CELL_TYPE not in curve[1] and curve[1]["augment_p"] == 0.1
  assert probe.curve_lines(curve)[2:] == ["| 0.50 | 0.600 | n/a | n/a |",
                                          "| 1.00 | 0.650 | n/a | 0.100 |"]
  assert probe.read_curve(str(tmp_path / "none")) == []


def test_new_best_per_layer():
  tracker = probe.Tracker.__new__(probe.Tracker)
  tracker.layers, tracker.layer = ["fc", "b8"], "fc"
  tracker.best, tracker.layer_best = -math.inf, {}
  m = lambda fc, b8: {probe.SCORE: fc, probe.layer_key("score", "fc"): fc,
                      probe.layer_key("score", "b8"): b8}
  assert tracker.new_best(m(0.6, 0.6))
  assert not tracker.new_best(m(0.6, 0.5))
  assert tracker.new_best(m(0.5, 0.7))       # b8 improved: saved
  assert tracker.best == 0.6 and tracker.layer_best == {"fc": 0.6, "b8": 0.7}
  assert tracker.new_best(m(0.65, math.nan))


def test_best_without_probe_scores_is_a_clear_error(tmp_path):
  config = tiny.tiny_config("")
  ckpt = checkpointer.TrainCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(config), {"model": config.model.to_dict()})
  ckpt.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint .* probe score"):
    checkpoint.restore_model(str(tmp_path), "best")


_HOST = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, workdir, shards, out = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=int(pid))
import json
import numpy as np
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests", "train"))
from test_probe import _host_probe
X, s = _host_probe(shards, workdir, None)
np.save(out + f".{pid}.npy", X)
print("SCORES", json.dumps(s))
"""


def _host_probe(shards, workdir, devices):
  """Features and scores of the probe at initialization (no minibatch
  stddev, so features depend on the image only)."""
  config = _config(shards, **{"model.mbstd_num_channels": 0})
  mesh = sharding.make_mesh(devices)
  tr = steps.Trainer(config, mesh)
  tracker = probe.Tracker(config, workdir, mesh, tr.D, every=2)
  X = tracker.features(tr.init_state(0).d_params)
  s = probe.scores(X, tracker.sites, tracker.cfg)
  return X, {k: s[k] for k in (probe.CONTROL, probe.CELL_TYPE)}


@pytest.mark.e2e
@pytest.mark.slow  # 1.5-5 min on the shared 2-core machine (two processes)
def test_two_hosts_gather_the_same_features_and_scores(shards, tmp_path):
  """Two JAX processes (2 CPU devices each), each embedding its own shards'
  probe sites: both hosts get the single-process features and scores."""
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = str(tmp_path / "X")
  workdir = str(tmp_path / "w")
  procs = [subprocess.Popen(
      [sys.executable, "-c", _HOST, str(port), str(i), workdir, shards, out],
      env=dict(os.environ, PYTHONPATH=repo), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  ref_X, ref_s = _host_probe(shards, str(tmp_path / "w1"), jax.devices()[:1])
  assert len(ref_X) == 64
  for i, log in enumerate(logs):
    X = np.load(f"{out}.{i}.npy")
    np.testing.assert_allclose(X, ref_X, rtol=1e-4, atol=1e-5)
    s = json.loads(log.split("SCORES ", 1)[1].splitlines()[0])
    assert s == pytest.approx(ref_s, nan_ok=True)
