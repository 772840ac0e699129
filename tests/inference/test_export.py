"""gandl-export: every site once on 1 and 8 devices, features equal to
`Model.embed` on the same batches, file layouts and metadata, bad input."""
import json
import os

import jax
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gandl_jax import checkpoint
from gandl_jax import config as config_lib
from gandl_jax.data import convert
from gandl_jax.data import pipeline
from gandl_jax.data import synthetic
from gandl_jax import embeddings
from gandl_jax.evaluate import io as emb_io
from gandl_jax.inference import api
from gandl_jax.inference import export
from gandl_jax.model import networks
from gandl_jax import progress as progress_lib
from gandl_jax import schema
from gandl_jax import sharding

RES = 16
STEP = 7
BATCH = 24          # 256 sites = 10 full batches + 16: the last one is padded


def _save(directory, cfg, seed=0, step=STEP, meta=None):
  """A checkpoint of networks.init's variable tree, values drawn with numpy
  (the real init compiles G and D for ~30 s on 2 cores; shapes are what count
  here, and N(0, 1) is the equalized-lr weights' own init)."""
  G, D = networks.build(cfg)
  shapes = jax.eval_shape(lambda k: networks.init(k, G, D),
                          jax.random.PRNGKey(seed))
  rng = np.random.RandomState(seed)
  g_vars, d_vars = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  checkpoint.save_model(directory, step, {"G": g_vars, "G_ema": g_vars,
                                          "D": d_vars},
                        {"model": cfg.to_dict(), "kimg": 1.5, **(meta or {})})


def _tiny(**kw):
  return config_lib.model_config(resolution=RES, img_channels=5, z_dim=8,
                               w_dim=8, mapping_layers=1, channel_base=128,
                               channel_max=16, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  src = synthetic.generate(str(root / "src"), size=RES, plates=1,
                           wells_per_plate=16, workers=1)
  shards = str(root / "shards")
  convert.convert("rxrx19a", src, shards, resolution=RES, num_shards=3)
  workdir = root / "run"
  cfg = _tiny()
  _save(checkpoint.checkpoint_dir(workdir), cfg)
  sites = pd.read_csv(os.path.join(shards, "sites.csv"), dtype=str,
                      keep_default_na=False)
  model = api.load(str(workdir), batch_size=BATCH)
  return dict(root=root, shards=shards, workdir=str(workdir), cfg=cfg,
              sites=sites, model=model)


def _mesh(n):
  return sharding.make_mesh(jax.devices()[:n])


def _export(env, out, n_devices=8, **kw):
  kw.setdefault("batch", BATCH)
  return export.export_model(env["model"], env["shards"], str(out),
                             mesh=_mesh(n_devices), checkpoint=env["workdir"],
                             **kw)


def _features(table):
  cols = [c for c in table.column_names if c.startswith("f")]
  return np.stack([table.column(c).to_numpy() for c in cols], axis=1)


def _reference(env, layer, batch):
  """Model.embed (one device, plain jit) on exactly the exporter's batches."""
  model = api.load(env["workdir"], batch_size=batch)
  feats, ids = [], []
  for b in pipeline.eval_batches(env["shards"], global_batch=batch,
                                 mesh=_mesh(1)):
    images = np.asarray(b["image"])
    assert images.dtype == np.uint8 and len(images) == batch
    f = model.embed(images, layer=layer)
    feats.append(f[b["valid"]])
    ids += list(b["site_id"][b["valid"]])
  return np.concatenate(feats), ids


def test_every_site_once_on_1_and_8_devices(env, tmp_path):
  tables = {}
  for n in (1, 8):
    out = tmp_path / f"emb{n}.parquet"
    summary = _export(env, out, n_devices=n)
    assert summary.num_sites == 256 and summary.num_batches == 11
    tables[n] = pq.read_table(out)
  sites = env["sites"]
  for n, t in tables.items():
    ids = t.column("site_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(sites) == 256
    assert ids == sites["site_id"].tolist()          # shard order
    # Metadata columns, in the published order, with their values.
    assert t.column_names[:11] == list(
        schema.RXRX19A_COLUMNS)
    assert t.column("plate").type == pa.int64()
    assert t.column("well").to_pylist() == sites["well"].tolist()
    conc = [float(v) if v else np.nan for v in sites["treatment_conc"]]
    np.testing.assert_array_equal(t.column("treatment_conc").to_numpy(),
                                  np.asarray(conc))
    assert t.column("treatment").to_pylist() == sites["treatment"].tolist()
    assert _features(t).shape == (256, 16)
  # The device count does not change the result.
  np.testing.assert_allclose(_features(tables[1]), _features(tables[8]),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", ["fc", "b8"])
def test_features_equal_model_embed(env, tmp_path, layer):
  out = tmp_path / "emb.parquet"
  _export(env, out, layer=layer)
  t = pq.read_table(out)
  ref, ids = _reference(env, layer, BATCH)
  assert t.column("site_id").to_pylist() == ids
  got = _features(t)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # Batch mates matter (minibatch stddev): another batch size differs.
  if layer == "fc":
    other, _ = _reference(env, layer, 8)
    assert np.abs(other - ref).max() > 1e-4


def test_parquet_metadata_and_evaluator_reads_it(env, tmp_path):
  out = tmp_path / "emb.parquet"
  _export(env, out)
  kv = {k.decode(): v.decode() for k, v in
        pq.read_schema(out).metadata.items()}
  assert kv["gandl.layer"] == "fc"
  assert kv["gandl.checkpoint_step"] == str(STEP)
  assert kv["gandl.checkpoint_kimg"] == "1.5"
  assert kv["gandl.batch_size"] == str(BATCH)
  assert kv["gandl.mbstd_group_size"] == "4"
  assert kv["gandl.source_shards"] == env["shards"]
  assert kv["gandl.checkpoint"] == env["workdir"]
  assert json.loads(kv["gandl.model_config"]) == json.loads(
      json.dumps(env["cfg"].to_dict()))
  assert "minibatch-stddev" in kv["gandl.batching"]
  emb = emb_io.read_embeddings_file(str(out))
  assert emb.dim == 16 and len(emb.meta) == 256
  assert emb.file_metadata["gandl.layer"] == "fc"
  assert emb.file_metadata["gandl.checkpoint_step"] == str(STEP)
  joined = emb_io.join_metadata(emb, None)
  assert not joined.issues and len(joined.meta) == 256


def test_csv_layout(env, tmp_path):
  out = tmp_path / "emb.csv"
  summary = _export(env, out)
  assert summary.format == "csv"
  with open(out) as f:
    header = f.readline().strip().split(",")
  assert header == ["site_id"] + embeddings.feature_names(16)
  df = pd.read_csv(out)
  assert df["site_id"].tolist() == env["sites"]["site_id"].tolist()
  ref, _ = _reference(env, "fc", BATCH)
  np.testing.assert_allclose(df[header[1:]].to_numpy(np.float32), ref,
                             rtol=1e-5, atol=1e-5)
  assert emb_io.read_embeddings_file(str(out)).dim == 16


def _no_leftovers(directory):
  return [p for p in os.listdir(directory) if ".tmp" in p or "part" in p]


def test_failure_leaves_no_output(env, tmp_path):
  out = tmp_path / "emb.parquet"
  good = pipeline.eval_batches(env["shards"], global_batch=BATCH,
                               mesh=_mesh(8))

  def broken():
    yield next(good)
    raise OSError("shard read failed")

  with pytest.raises(OSError, match="shard read failed"):
    _export(env, out, batches=broken())
  assert not out.exists() and not _no_leftovers(tmp_path)


def test_errors(env, tmp_path):
  out = tmp_path / "emb.parquet"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.export_embeddings(str(tmp_path / "nowhere"), env["shards"],
                             str(out))
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no checkpoints found"):
    export.export_embeddings(str(tmp_path / "empty"), env["shards"], str(out))
  with pytest.raises(ValueError) as e:
    _export(env, out, layer="b32")
  for name in ("'b16'", "'b8'", "'conv'", "'fc'", "'logit'"):
    assert name in str(e.value)
  with pytest.raises(ValueError, match="multiple of 8"):
    _export(env, out, batch=12)
  with pytest.raises(FileNotFoundError, match="dataset_info.json"):
    export.export_model(env["model"], str(tmp_path), str(out), batch=BATCH,
                        mesh=_mesh(8))
  # A model at another resolution and channel count than the shards.
  other = tmp_path / "other"
  _save(checkpoint.checkpoint_dir(other),
        config_lib.model_config(resolution=32, img_channels=3, z_dim=8, w_dim=8,
                              mapping_layers=1, channel_base=128,
                              channel_max=16))
  with pytest.raises(ValueError) as e:
    export.export_embeddings(str(other), env["shards"], str(out), batch=BATCH)
  msg = str(e.value)
  assert env["shards"] in msg and "resolution 16" in msg and "32" in msg
  assert "5 channels" in msg and "expects 3" in msg
  with pytest.raises(ValueError, match="format"):
    embeddings.output_format("x.parquet", "tsv")
  assert not out.exists() and not _no_leftovers(tmp_path)


def test_merge_parts_restores_global_order(tmp_path):
  out = str(tmp_path / "emb.parquet")
  # Two hosts' parts: global order interleaves them batch by batch.
  index = {0: [0, 1, 4, 5, 8], 1: [2, 3, 6, 7]}
  for host, idx in index.items():
    feats = np.asarray(idx, np.float32)[:, None] * np.ones((1, 3), np.float32)
    table = pa.table({"site_id": [f"E_1_A0{i}_1" for i in idx],
                      "f0000": feats[:, 0], "f0001": feats[:, 1],
                      "f0002": feats[:, 2],
                      export.ROW_COLUMN: pa.array(idx, pa.int64())})
    pq.write_table(table, export.part_path(out, host))
  n = export.merge_parts(out, 2, "parquet", {"gandl.layer": "fc"})
  assert n == 9
  t = pq.read_table(out)
  assert t.column_names == ["site_id", "f0000", "f0001", "f0002"]
  assert t.column("f0001").to_pylist() == list(range(9))
  assert t.schema.metadata[b"gandl.layer"] == b"fc"
  assert not _no_leftovers(tmp_path)
  with pytest.raises(FileNotFoundError, match="all hosts share"):
    export.merge_parts(out, 1, "parquet", {})


def test_check_batch_and_progress():
  sharding.check_batch(24, 8, 1, 4)
  sharding.check_batch(2, 1, 1, 4)       # group shrinks to the batch
  with pytest.raises(ValueError, match="try 8 or 16"):
    sharding.check_batch(12, 8, 1, 4)
  with pytest.raises(ValueError, match="multiple of 4"):
    sharding.check_batch(6, 2, 1, 4)
  lines = []
  p = progress_lib.Progress(100, name="export", every_s=0.0, log=lines.append)
  p.start -= 10.0
  p.update(50)
  assert "50/100" in lines[-1] and "sites/s" in lines[-1]
  assert "ETA 00:00:1" in lines[-1]      # 50 sites left at ~5 sites/s


def test_cli(env, tmp_path):
  from absl import flags
  from gandl_jax.cli import export as cli
  out = tmp_path / "cli.csv"
  argv = ["gandl-export", "--workdir", env["workdir"], "--data",
          env["shards"], "--output", str(out), "--batch", str(BATCH)]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(argv[:1])
    assert e.value.code == 0
    df = pd.read_csv(out)
    assert len(df) == 256 and df.columns[1] == "f0000"
    # An existing output is refused, and kept...
    before = out.read_bytes()
    os.utime(out, (0, 0))
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    with pytest.raises(SystemExit) as e:
      cli.main(argv[:1])
    assert e.value.code == 1
    assert out.read_bytes() == before and out.stat().st_mtime == 0
    # ... unless --overwrite.
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv + ["--overwrite"])
    with pytest.raises(SystemExit) as e:
      cli.main(argv[:1])
    assert e.value.code == 0 and out.stat().st_mtime > 0
    assert out.read_bytes() == before
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv + ["--checkpoint", env["workdir"]])
    with pytest.raises(Exception, match="exactly one of"):
      cli.main(argv[:1])
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv + ["--layer", "nope"])
    with pytest.raises(SystemExit) as e:   # README "Exit status": 1
      cli.main(argv[:1])
    assert e.value.code == 1
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv + ["--step", "last"])
    with pytest.raises(Exception, match="step number or 'best'"):
      cli.main(argv[:1])
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv + ["--step", "best"])   # no probe scores in this workdir
    with pytest.raises(SystemExit) as e:
      cli.main(argv[:1])
    assert e.value.code == 1
  finally:
    flags.FLAGS.unparse_flags()


def test_existing_output_refused_unless_overwrite(env, tmp_path):
  """gandl-export never replaces a file silently."""
  out = tmp_path / "emb.parquet"
  out.write_bytes(b"an earlier export")
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export_embeddings(env["workdir"], env["shards"], str(out),
                             batch=BATCH)
  assert out.read_bytes() == b"an earlier export"


def _probe_meta(fc, conv, plates=("A_1", "B_2")):
  return {"probe": {"score": fc, "layer": "fc", "plates": list(plates),
                    "layers": {"fc": {"score": fc}, "conv": {"score": conv}}}}


def test_step_best_records_layer_and_probe_plates(env, tmp_path):
  """--step best selects on --layer (default the probe's selection layer),
  exports that layer and lists the probe plates; an explicit step does
  not."""
  wd = tmp_path / "run"
  d = checkpoint.checkpoint_dir(wd)
  _save(d, env["cfg"], seed=1, step=1, meta=_probe_meta(0.9, 0.6))
  _save(d, env["cfg"], seed=2, step=2, meta=_probe_meta(0.7, 0.8))
  kw = dict(batch=BATCH, mesh=_mesh(1))

  def kv(path):
    return {k.decode(): v.decode()
            for k, v in pq.read_schema(path).metadata.items()}

  out = tmp_path / "best.parquet"
  summary = export.export_embeddings(str(wd), env["shards"], str(out),
                                     step="best", **kw)
  assert (summary.step, summary.layer, summary.selected_on_layer) == (
      1, "fc", "fc")
  meta = kv(out)
  assert json.loads(meta["gandl.probe_plates"]) == ["A_1", "B_2"]
  assert json.loads(meta["gandl.checkpoint_selection"]) == {
      "by": "representation probe", "layer": "fc", "score": 0.9}
  assert meta["gandl.checkpoint_step"] == "1"

  out = tmp_path / "conv.parquet"
  summary = export.export_embeddings(str(wd), env["shards"], str(out),
                                     step="best", layer="conv", **kw)
  assert (summary.step, summary.layer, summary.selected_on_layer) == (
      2, "conv", "conv")
  assert kv(out)["gandl.layer"] == "conv"
  assert json.loads(kv(out)["gandl.checkpoint_selection"])["layer"] == "conv"

  out = tmp_path / "step2.parquet"
  summary = export.export_embeddings(str(wd), env["shards"], str(out),
                                     step=2, **kw)
  assert summary.selected_on_layer is None
  assert "gandl.probe_plates" not in kv(out)
  with pytest.raises(FileNotFoundError, match="for layer 'logit'"):
    export.export_embeddings(str(wd), env["shards"],
                             str(tmp_path / "x.parquet"), step="best",
                             layer="logit", **kw)


def test_checkpoint_fallback_is_explicit(env, tmp_path):
  """An unreadable latest checkpoint is refused unless
  --step or --allow_fallback; the step used is in summary and metadata."""
  wd = tmp_path / "run"
  d = checkpoint.checkpoint_dir(wd)
  _save(d, env["cfg"], step=7)
  _save(d, env["cfg"], seed=1, step=9)
  for root, _, files in os.walk(str(d / "9" / "model")):
    for name in files:
      with open(os.path.join(root, name), "w") as fh:
        fh.write("garbage")
  out = tmp_path / "emb.parquet"
  with pytest.raises(ValueError) as e:   # checkpoint.UnreadableCheckpointError
    export.export_embeddings(str(wd), env["shards"], str(out), batch=BATCH)
  msg = str(e.value)
  assert "step 9" in msg and "[7]" in msg and "--allow_fallback" in msg
  assert "--step" in msg and not out.exists()
  assert api.load(str(wd), step=7).step == 7         # explicit: fine
  summary = export.export_embeddings(str(wd), env["shards"], str(out),
                                     batch=BATCH, allow_fallback=True,
                                     filter="site == 1")
  assert summary.step == 7 and summary.fallback_from_step == 9
  assert summary.as_dict()["fallback_from_step"] == 9
  kv = {k.decode(): v.decode() for k, v in
        pq.read_schema(out).metadata.items()}
  assert kv["gandl.checkpoint_step"] == "7"
  fallback = json.loads(kv["gandl.checkpoint_fallback"])
  assert fallback["latest_step"] == 9 and "step 9" in fallback["unreadable"][0]


def test_shards_of_other_channels_refused(env, tmp_path):
  """RxRx1 shards converted with other channels than the
  model was trained on (same count) are refused, naming both."""
  src = synthetic.generate(str(tmp_path / "rx1"), dataset="rxrx1", size=RES,
                           plates=1, wells_per_plate=6, workers=1)
  shards = str(tmp_path / "shards")
  convert.convert("rxrx1", src, shards, resolution=RES, channels=[1, 2, 6])
  cfg = config_lib.model_config(
      resolution=RES, img_channels=3, z_dim=8, w_dim=8, mapping_layers=1,
      channel_base=128, channel_max=16)
  rx19 = pipeline.read_dataset_info(env["shards"])
  trained = {"dataset": {"dataset": "rxrx19a", "resolution": RES,
                         "channels": rx19["channels"][:3], "num_channels": 3}}
  wd = tmp_path / "run"
  _save(checkpoint.checkpoint_dir(wd), cfg, meta=trained)
  out = tmp_path / "emb.parquet"
  with pytest.raises(ValueError) as e:
    export.export_embeddings(str(wd), shards, str(out), batch=8)
  msg = str(e.value)
  assert "w6 MitoTracker Deep Red" in msg and "w3 Phalloidin" in msg
  assert "--channels 1,2,3" in msg and not out.exists()
  # The same stains (RxRx1 w1-w3) are accepted.
  info = dict(pipeline.read_dataset_info(shards),
              channels=pipeline.read_dataset_info(shards)["channels"][:2]
              + [rx19["channels"][2]])
  import types
  export.check_channels(types.SimpleNamespace(meta=trained), info, shards)


_HOST = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, workdir, shards, out, batch = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=int(pid))
from gandl_jax.inference import export
s = export.export_embeddings(workdir, shards, out, batch=int(batch))
print("SITES", s.num_sites)
"""


@pytest.mark.e2e
def test_two_hosts_write_parts_and_merge(env, tmp_path):
  """Two real JAX processes (2 CPU devices each): every site once, in shard
  order, features equal Model.embed on the global batches the two hosts
  form together (each host's files; B/2 sites from each)."""
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = str(tmp_path / "emb.parquet")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  penv = dict(os.environ, PYTHONPATH=repo)
  procs = [subprocess.Popen(
      [sys.executable, "-c", _HOST, str(port), str(i), env["workdir"],
       env["shards"], out, str(BATCH)], env=penv, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert "SITES 256" in logs[0]
  t = pq.read_table(out)
  assert t.schema.metadata[b"gandl.num_hosts"] == b"2"
  assert t.column("site_id").to_pylist() == env["sites"]["site_id"].tolist()
  assert export.ROW_COLUMN not in t.column_names
  assert not _no_leftovers(tmp_path)
  # Reference: the hosts' batches side by side, through Model.embed.
  model = api.load(env["workdir"], batch_size=BATCH)
  host = [pipeline.eval_host_batches(env["shards"], host_batch=BATCH // 2,
                                     process_index=h, process_count=2)[0]
          for h in range(2)]
  feats, index = [], []
  for b0, b1 in zip(*host):
    images = np.concatenate([b0["image"], b1["image"]])
    valid = np.concatenate([b0["valid"], b1["valid"]])
    feats.append(model.embed(images)[valid])
    index.append(np.concatenate([b0["index"], b1["index"]])[valid])
  ref = np.concatenate(feats)[np.argsort(np.concatenate(index))]
  np.testing.assert_allclose(_features(t), ref, rtol=1e-5, atol=1e-5)

