"""Checkpoint selection by the representation probe never sees the scored
plates: the probe draws its sites from a recorded subset of plates, a
probe-selected export lists them, and gandl-evaluate scores the control task
without them.

The demonstration uses pure-noise checkpoints: random D's (no training) on
noise images, so every site's features are independent of its label and
every score is chance in expectation. Choosing the best of many such D's by
the probe inflates its probe score; the same checkpoint scored on the
held-out plates is at chance.
"""
import json
import math
import types

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from gandl_jax import checkpoint
from gandl_jax import config as config_lib
from gandl_jax import embeddings
from gandl_jax import sharding
from gandl_jax.data import convert, pipeline, synthetic
from gandl_jax.evaluate import inputs, normalize, tasks
from gandl_jax.evaluate import io as emb_io
from gandl_jax.inference import api, export
from gandl_jax.model import embed as embed_lib
from gandl_jax.model import networks
from gandl_jax.train import probe

RES = 8
BATCH = 32
CHECKPOINTS = 16
FRACTION = 0.25


def _cfg():
  # No minibatch stddev: a site's features depend on its image alone.
  return config_lib.model_config(resolution=RES, img_channels=5, z_dim=8,
                                 w_dim=8, mapping_layers=1, channel_base=64,
                                 channel_max=16, mbstd_num_channels=0)


def _random_variables(cfg, seed):
  """networks.init's variable tree with N(0, 1) values drawn by numpy (the
  equalized-lr weights' own init; no compilation of G)."""
  G, D = networks.build(cfg)
  shapes = jax.eval_shape(lambda k: networks.init(k, G, D),
                          jax.random.PRNGKey(0))
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes), D


def _noise_batches(shards, mesh):
  """gandl-export's batches with every image replaced by noise drawn from
  the site's row: labels carry no information about the images."""
  for b in pipeline.eval_batches(shards, global_batch=BATCH, mesh=mesh):
    index = np.asarray(b["index"])
    images = np.stack([
        np.random.default_rng([7, int(max(i, 0))]).integers(
            0, 256, (RES, RES, 5), dtype=np.uint8) for i in index])
    yield dict(b, image=sharding.host_to_global(images, mesh))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Synthetic RxRx19a, 4 experiments x 4 plates: 16 plates (8 HRCE,
  8 VERO), 640 untreated Mock / Active sites, at 8x8."""
  root = tmp_path_factory.mktemp("sel")
  tree = synthetic.generate(str(root / "raw"), size=16, plates=4,
                            wells_per_plate=16, seed=0, workers=1)
  convert.convert("rxrx19a", tree, str(root / "shards"), RES, num_shards=2)
  return str(root / "shards")


def test_select_plates_per_cell_type_deterministic(shards):
  table = pipeline.read_sites_index(shards)
  rows = table[tasks.control_rows(table)]
  plates = probe.select_plates(rows, FRACTION, seed=0)
  # ceil(0.25 x 8) = 2 plates of each cell type; at least 2 for tiny
  # fractions; all of a cell type's plates at fraction 1.
  cell = dict(zip(normalize.plate_keys(rows), rows["cell_type"]))
  assert sorted(cell[p] for p in plates) == ["HRCE"] * 2 + ["VERO"] * 2
  assert len(probe.select_plates(rows, 0.01, seed=0)) == 4
  assert len(probe.select_plates(rows, 0.5, seed=0)) == 8
  assert len(probe.select_plates(rows, 1.0, seed=0)) == 16
  assert probe.select_plates(rows.sample(frac=1.0, random_state=3),
                             FRACTION, seed=0) == plates
  assert any(probe.select_plates(rows, FRACTION, seed=s) != plates
             for s in range(1, 5))
  # The probe's sites come from those plates only.
  sites = probe.select_sites(table, 10_000, 0, plate_fraction=FRACTION)
  assert probe.plates_of(sites) == plates and len(sites) == 160


def test_best_by_probe_scores_at_chance_on_held_out_plates(shards, tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  table = pipeline.read_sites_index(shards)
  sites = probe.select_sites(table, 10_000, 0, plate_fraction=FRACTION)
  plates = probe.plates_of(sites)
  tracker = types.SimpleNamespace(layer="fc", layers=["fc"], plates=plates)
  cfg = _cfg()
  workdir = str(tmp_path / "noise")
  directory = checkpoint.checkpoint_dir(workdir)

  # Many random D's, each probed (as training does) and saved with its
  # probe record as a step of one workdir.
  _, D = _random_variables(cfg, 0)
  embed = embed_lib.data_parallel_layer_features(D, mesh, ("fc",))
  batches = list(_noise_batches(shards, mesh))
  probe_scores = {}
  for step in range(1, CHECKPOINTS + 1):
    (g_vars, d_vars), _ = _random_variables(cfg, step)
    xs, rows = [], []
    for b in batches:
      xs.append(np.asarray(embed({"params": d_vars["params"]},
                               b["image"])["fc"]))
      rows.append(np.asarray(b["index"]))
    X, index = np.concatenate(xs), np.concatenate(rows)
    by_row = {int(r): i for i, r in enumerate(index) if r >= 0}
    sid = table["site_id"].astype(str).tolist()
    pos = {s: by_row[i] for i, s in enumerate(sid)}
    feats = X[[pos[s] for s in sites["site_id"]]]
    result = probe.layer_scores({"fc": feats}, sites, probe.protocol(0))
    metrics = {probe.layer_key(t, "fc"): result[probe.layer_key(t, "fc")]
               for t in probe.TASKS}
    metrics[probe.SCORE] = metrics[probe.layer_key("score", "fc")]
    metrics[probe.CONTROL] = metrics[probe.layer_key("control", "fc")]
    probe_scores[step] = metrics[probe.SCORE]
    checkpoint.save_model(directory, step,
                          {"G": g_vars, "G_ema": g_vars, "D": d_vars},
                          {"model": cfg.to_dict(),
                           **probe.checkpoint_record(metrics, tracker)})

  selection = checkpoint.best_selection(workdir)
  best = max(probe_scores, key=lambda s: (probe_scores[s], s))
  assert selection["step"] == best and selection["layer"] == "fc"
  assert selection["plates"] == plates
  assert selection["score"] == pytest.approx(probe_scores[best])

  # The export of the selected step lists the probe plates.
  out = str(tmp_path / "best.parquet")
  model = api.load(workdir, selection["step"], batch_size=BATCH)
  export.export_model(model, shards, out, batch=BATCH, mesh=mesh,
                      batches=_noise_batches(shards, mesh),
                      selection=selection)
  kv = {k.decode(): v.decode()
        for k, v in pq.read_schema(out).metadata.items()}
  assert json.loads(kv[embeddings.META_KEY_PROBE_PLATES]) == plates
  assert json.loads(kv[export.META_SELECTION])["layer"] == "fc"

  # gandl-evaluate's control task on it: without the probe plates, and
  # the report's inputs notes say so.
  emb = emb_io.join_metadata(emb_io.read_embeddings_file(out), None)
  emb, _ = inputs.postprocess(emb, inputs.Options(), owned=True)
  assert (f"{len(plates)} plates used for checkpoint selection were "
          f"excluded from the control task") in emb.issues
  res, _ = tasks.control_classification(emb, inputs.Options().protocol)
  assert res["excluded_probe_plates"] == plates
  held_out = tasks.control_rows(emb.meta) & ~np.isin(
      normalize.plate_keys(emb.meta), plates)
  assert res["n_rows"] == int(held_out.sum()) == 480
  plate = res["plate"]
  assert plate["status"] == "ok", plate

  # Selection bias: each probe score is chance, so their mean is near 0.5,
  # while the best of 16 is lifted well above it (the expected maximum of
  # 16 draws is 1.8 standard deviations up). The probe's test part is one
  # of its 4 plates (40 sites): sd of a chance balanced accuracy
  # 0.5 / sqrt(40) = 0.079.
  sd_probe = 0.5 / math.sqrt(40)
  values = np.array(list(probe_scores.values()))
  assert abs(values.mean() - 0.5) < 3 * sd_probe / math.sqrt(CHECKPOINTS)
  assert selection["score"] > 0.5 + 1.0 * sd_probe, values
  # The held-out score of the selected checkpoint is chance: within 3 sd of
  # 0.5 for its test part (a quarter of the 12 held-out plates).
  n_test = 480 // 4
  bacc = plate["balanced_accuracy"]
  assert abs(bacc - 0.5) < 3 * 0.5 / math.sqrt(n_test), bacc
  assert bacc < selection["score"]
