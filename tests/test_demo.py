"""gandl-demo end to end with a tiny model: every stage runs for real, the
report compares the trained and the initial discriminator, re-runs reuse
finished stages."""
import json
import os

import jax

from gandl_jax import demo
from gandl_jax import sharding
from tiny import tiny_config


def tiny_demo_config():
  # test_train.py's programs (XLA's persistent cache compiles them once).
  return tiny_config(**{"loss.r1_interval": 2, "loss.pl_interval": 2,
                        "data.shuffle_buffer": 64})


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
  lines = []
  mesh = sharding.make_mesh(jax.devices()[:1])
  out = demo.run_demo(str(tmp_path), size=32, config=tiny_demo_config(),
                      log=lines.append, mesh=mesh)
  report = tmp_path / "report" / "report.md"
  assert out["report"] == str(report) and report.exists()
  metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
  densenet = demo.densenet_set_name("none")
  assert densenet == "DenseNet-121 concat (random init)"
  assert set(metrics["names"]) == {demo.TRAINED, demo.BASELINE,
                                   demo.CLASSICAL, densenet, demo.CONVAE}
  for name in metrics["names"]:
    res = metrics["embeddings"][name]
    assert {"control", "cell_model", "dose_response", "rxrx1"} <= set(res)
  text = report.read_text()
  assert demo.TRAINED in text and demo.BASELINE in text
  # Headline: a header, then the five sets side by side with the figures
  # of metrics.json.
  assert len(out["headline"]) == 6 and "Mock/Active" in out["headline"][0]
  for line in out["headline"][1:]:
    name = next(n for n in metrics["names"] if line.startswith(n))
    acc = metrics["embeddings"][name]["control"]["plate"]["balanced_accuracy"]
    assert f"{acc:.3f}" in line
  assert text.index("## Summary") < text.index("## Inputs")
  # Both embedding sets were computed (trained D != initial D).
  assert (tmp_path / "embeddings" / "trained_rxrx19a.parquet").exists()
  assert (tmp_path / "embeddings" / "init_rxrx1.parquet").exists()
  import pandas as pd  # pylint: disable=import-outside-toplevel
  a = pd.read_parquet(tmp_path / "embeddings" / "trained_rxrx19a.parquet")
  b = pd.read_parquet(tmp_path / "embeddings" / "init_rxrx19a.parquet")
  assert len(a) == len(b) > 1000
  # The DenseNet set: every site once, 5 x 1024 features of the 8x8 shards
  # resized to Keras' 32x32 minimum, random weights recorded as such.
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  path = tmp_path / "embeddings" / "densenet_rxrx19a.parquet"
  dn = pd.read_parquet(path)
  assert list(dn["site_id"]) == list(a["site_id"])
  assert len([c for c in dn.columns if c.startswith("f")]) == 5 * 1024
  meta = pq.read_schema(path).metadata
  assert meta[b"gandl.weights"] == b"random"
  assert meta[b"gandl.image_size"] == b"32"
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
                log=lines.append, mesh=mesh)
  reused = [l for l in lines if "already done" in l]
  assert len(reused) == 10, lines
  assert os.path.exists(tmp_path / "stages" / "train.done")


def test_preempted_training_is_not_marked_done(tmp_path, monkeypatch):
  """Item 9: SIGTERM during training stops the demo after saving; the train
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
