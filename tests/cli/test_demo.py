"""gandl-demo end to end with a tiny model: every stage runs for real, the
report compares the trained and the initial discriminator, re-runs reuse
finished stages."""
import json
import os

import jax

from gandl_jax.cli import demo
from gandl_jax import sharding
from tiny import train_config


def tiny_demo_config():
  return train_config(**{"data.shuffle_buffer": 64,
                         "probe_every_kimg": 0.016})


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
  lines = []
  mesh = sharding.make_mesh(jax.devices()[:1])
  # The DenseNet set is off here (1,920 sites through DenseNet-121 cost
  # about a minute); test_baseline_sets_densenet covers its wiring.
  out = demo.run_demo(str(tmp_path), size=32, config=tiny_demo_config(),
                      log=lines.append, mesh=mesh, densenet=False)
  report = tmp_path / "report" / "report.md"
  assert out["report"] == str(report) and report.exists()
  metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
  assert set(metrics["names"]) == {demo.TRAINED, demo.BASELINE,
                                   demo.CLASSICAL, demo.CONVAE}
  for name in metrics["names"]:
    res = metrics["embeddings"][name]
    assert {"control", "cell_model", "dose_response", "rxrx1"} <= set(res)
  text = report.read_text()
  assert demo.TRAINED in text and demo.BASELINE in text
  # Headline: each set's figures of metrics.json with their intervals, then
  # the paired differences against the first set.
  head = out["headline"]
  assert "Mock/Active" in head[1]
  for name in metrics["names"]:
    line = next(h for h in head[2:] if h.startswith(name))
    ctl = metrics["embeddings"][name]["control"]["plate"]
    iv = ctl["balanced_accuracy_interval"]
    assert f"{ctl['balanced_accuracy']:.3f} [" in line
    assert iv["low"] <= ctl["balanced_accuracy"] <= iv["high"]
  assert any(h.startswith("paired differences") for h in head)
  # The probe curve of training (every 0.016 kimg: at steps 2 and 4), in
  # the report and the headline.
  assert "## The probe during training" in text
  curve = [l for l in text.splitlines() if l.startswith(("| 0.02 |",
                                                          "| 0.03 |"))]
  assert len(curve) == 2, text
  assert any(h.startswith("probe Mock/Active during training (kimg: "
                          "balanced accuracy): 0.016: ") for h in head), head
  assert sum(f" - {demo.TRAINED}: " in h for h in head) >= 3
  assert text.index("## Summary") < text.index("## Inputs")
  # Both embedding sets were computed (trained D != initial D).
  assert (tmp_path / "embeddings" / "trained_rxrx19a.parquet").exists()
  assert (tmp_path / "embeddings" / "init_rxrx1.parquet").exists()
  import pandas as pd  # pylint: disable=import-outside-toplevel
  a = pd.read_parquet(tmp_path / "embeddings" / "trained_rxrx19a.parquet")
  b = pd.read_parquet(tmp_path / "embeddings" / "init_rxrx19a.parquet")
  assert len(a) == len(b) > 1000
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  # The ConvAE: trained for the GAN's budget, its bottleneck exported.
  train = json.loads((tmp_path / "stages" / "convae_train.done").read_text())
  assert train["reason"] == "finished" and train["step"] >= 1
  ae = pd.read_parquet(tmp_path / "embeddings" / "convae_rxrx19a.parquet")
  assert list(ae["site_id"]) == list(a["site_id"])
  assert pq.read_schema(tmp_path / "embeddings" / "convae_rxrx19a.parquet"
                        ).metadata[b"gandl.family"] == b"convae"
  feats = [c for c in a.columns if c.startswith("f0")]
  assert float((a[feats] - b[feats]).abs().to_numpy().max()) > 1e-4
  # Second run: every stage is reused.
  lines.clear()
  demo.run_demo(str(tmp_path), size=32, config=tiny_demo_config(),
                log=lines.append, mesh=mesh, densenet=False)
  reused = [l for l in lines if "already done" in l]
  assert len(reused) == 9, lines
  assert os.path.exists(tmp_path / "stages" / "train.done")


def test_baseline_sets_densenet(tmp_path, monkeypatch):
  """The demo's DenseNet set: named after its weights, computed once per
  dataset into EMB/densenet_<dataset>.parquet with the shards' sites resized
  up to Keras' 32x32 minimum, reused on a rerun (the export itself is
  tested against Keras in test_baselines_densenet.py)."""
  from gandl_jax.baselines import densenet  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(densenet, "load_backbone",
                      lambda weights, seed=0: ("backbone", weights))
  monkeypatch.setattr(pipeline, "read_dataset_info",
                      lambda data: {"resolution": 8 if "small" in data else 64})

  def export_concat(data, output, **kwargs):
    calls.append((data, output, kwargs))
    return {"output": output}
  monkeypatch.setattr(densenet, "export_concat", export_concat)
  stages = demo.Stages(str(tmp_path), lambda s: None)
  data = {"rxrx19a": "small/*.tfrecord", "rxrx1": "big/*.tfrecord"}
  emb = str(tmp_path / "emb")
  sets = demo.baseline_sets(stages, data, emb, classical=False, convae=False,
                            densenet_weights="none")
  assert sets == [("DenseNet-121 concat (random init)", "densenet")]
  assert [(c[0], c[1], c[2]["image_size"], c[2]["backbone"]) for c in calls] == [
      ("small/*.tfrecord", os.path.join(emb, "densenet_rxrx19a.parquet"), 32,
       ("backbone", "none")),
      ("big/*.tfrecord", os.path.join(emb, "densenet_rxrx1.parquet"), None,
       ("backbone", "none"))]
  assert all(c[2]["overwrite"] for c in calls)   # a killed stage is redone
  calls.clear()
  assert demo.baseline_sets(stages, data, emb, classical=False, convae=False,
                            densenet_weights="none") == sets
  assert not calls                                # the stage is reused
  assert demo.densenet_set_name("imagenet") == "DenseNet-121 concat (ImageNet)"
  assert demo.densenet_set_name("/w/dn.h5") == "DenseNet-121 concat (dn.h5)"


def test_preempted_training_is_not_marked_done(tmp_path, monkeypatch):
  """SIGTERM during training stops the demo after saving; the train
  stage is not marked done, and the SIGTERM handler is put back."""
  import signal  # pylint: disable=import-outside-toplevel
  from gandl_jax.train import checkpointer  # pylint: disable=import-outside-toplevel
  install = checkpointer.TrainCheckpointer.install_sigterm_handler

  def install_then_sigterm(self):
    install(self)
    os.kill(os.getpid(), signal.SIGTERM)    # a real signal, our handler
  monkeypatch.setattr(checkpointer.TrainCheckpointer,
                      "install_sigterm_handler", install_then_sigterm)

  def mine(signum, frame):
    pass
  previous = signal.signal(signal.SIGTERM, mine)
  try:
    out = demo.run_demo(str(tmp_path), size=32, config=tiny_demo_config(),
                        log=lambda s: None,
                        mesh=sharding.make_mesh(jax.devices()[:1]))
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert out["reason"] == "preempted" and out["stages"]["step"] == 1
  assert not os.path.exists(tmp_path / "stages" / "train.done")
  assert os.path.exists(tmp_path / "stages" / "convert.done")
  assert not os.path.exists(tmp_path / "embeddings")
  from gandl_jax import checkpoint  # pylint: disable=import-outside-toplevel
  assert checkpoint.list_steps(str(tmp_path / "train")) == (1,)
