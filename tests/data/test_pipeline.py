"""Input pipeline: per-host coverage, filters, resume, global arrays, errors."""
import os
import shutil

import jax
import numpy as np
import pytest

from gandl_jax.data import convert
from gandl_jax.data import pipeline
from gandl_jax.data import synthetic
from gandl_jax import images as image_lib
from gandl_jax import schema
from gandl_jax import sharding


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  out = tmp_path_factory.mktemp("pipe")
  root = synthetic.generate(str(out), dataset="rxrx19a", size=32, plates=[1],
                            wells_per_plate=16, seed=2, workers=1)
  path = str(out / "shards")
  convert.convert("rxrx19a", root, path, 16, num_shards=8, workers=1)
  return path


def _site_table(path):
  return pipeline.read_sites_index(path)


def _eval_ids(path, host_batch, filter=None, pc=1):
  per_host, nbatches = [], []
  for h in range(pc):
    it, n = pipeline.eval_host_batches(path, host_batch=host_batch, filter=filter,
                                       process_index=h, process_count=pc)
    batches = list(it)
    assert len(batches) == n
    nbatches.append(n)
    rows = []
    for b in batches:
      assert b["image"].shape == (host_batch, 16, 16, 5)
      assert b["image"].dtype == np.uint8
      rows += list(zip(b["index"][b["valid"]], b["site_id"][b["valid"]]))
      assert (b["index"][~b["valid"]] == -1).all()
      assert (b["image"][~b["valid"]] == 0).all()
    per_host.append(rows)
  return per_host, nbatches


@pytest.mark.parametrize("pc", [1, 2, 4])
def test_per_host_split_is_disjoint_and_complete(shards, pc):
  table = _site_table(shards)
  per_host, nb = _eval_ids(shards, host_batch=12, pc=pc)
  assert len(set(nb)) == 1                          # hosts stay in lock step
  ids = [s for rows in per_host for _, s in rows]
  assert len(ids) == len(set(ids)) == len(table)
  assert set(ids) == set(table.site_id)
  # Process 0's merge: sort by index -> sites.csv order, for any host count.
  merged = sorted(r for rows in per_host for r in rows)
  assert [s for _, s in merged] == list(table.site_id)

  # Training: one epoch of each host's stream covers its files exactly once.
  info = pipeline.read_dataset_info(shards)
  images = {}
  for b in pipeline.eval_host_batches(shards, host_batch=64)[0]:
    for i in np.nonzero(b["valid"])[0]:
      images[b["image"][i].tobytes()] = b["site_id"][i]
  seen = []
  for h in range(pc):
    ds, n_host = pipeline.train_dataset(shards, host_batch=1, seed=0, x_flip=False,
                                        rot90=False, normalize=False,
                                        process_index=h, process_count=pc)
    got = [images[x[0].tobytes()] for x in ds.take(n_host).as_numpy_iterator()]
    assert len(got) == len(set(got)) == n_host
    seen += got
  assert sorted(seen) == sorted(table.site_id)
  assert info["num_examples"] == len(table)


def test_filters_expression_dict_and_errors(shards):
  table = _site_table(shards)
  pipeline.read_dataset_info(shards)   # a complete directory: no error
  expr = ("disease_condition in ['Mock', 'Active SARS-CoV-2'] and "
          "cell_type == 'HRCE'")
  want = table[table.disease_condition.isin([schema.MOCK, schema.ACTIVE])
               & (table.cell_type == "HRCE")]
  (rows,), _ = _eval_ids(shards, host_batch=16, filter=expr)
  assert sorted(s for _, s in rows) == sorted(want.site_id) and len(want) > 0
  (rows,), _ = _eval_ids(shards, host_batch=16, filter={
      "disease_condition": [schema.MOCK, schema.ACTIVE], "cell_type": "HRCE"})
  assert sorted(s for _, s in rows) == sorted(want.site_id)

  # The pandas mask and the records tf.data selects agree on a richer
  # expression, checked against an independent pandas computation.
  expr = ("(treatment_conc >= 1.0 or treatment == '') and not plate != 1 "
          "and site not in [2, 3]")
  mask = pipeline.select_sites(table, expr)
  t = table
  ref = (((t.treatment_conc >= 1.0) | (t.treatment == "")) & (t.plate == 1)
         & ~t.site.isin([2, 3])).to_numpy()
  np.testing.assert_array_equal(mask, ref)
  assert 0 < mask.sum() < len(table)
  (rows,), _ = _eval_ids(shards, host_batch=16, filter=expr)
  assert sorted(s for _, s in rows) == sorted(table.site_id[mask])
  empty = pipeline.select_sites(table, "disease_condition == ''")
  np.testing.assert_array_equal(empty, (table.disease_condition == "").to_numpy())
  assert 0 < empty.sum() < len(table)
  # pandas query syntax beyond the comparisons: chains, .str methods.
  np.testing.assert_array_equal(
      pipeline.select_sites(table, "1 <= site < 3 and well.str.startswith('B')"),
      ((t.site >= 1) & (t.site < 3) & t.well.str.startswith("B")).to_numpy())
  # A value of another type matches nothing (pandas semantics).
  assert not pipeline.select_sites(table, "plate == 'one'").any()

  for bad, msg in [("cell_typ == 'HRCE'", r"'cell_typ'.*columns \['site_id'"),
                   ({"wells": "A01"}, "unknown column 'wells'"),
                   ("plate < 'a'", "filter \"plate < 'a'\": Invalid comparison"),
                   ("cell_type = 'HRCE'", "not a condition.*not ="),
                   ("plate", "not a condition"),
                   ("cell_type ==", "filter 'cell_type ==': .*syntax"),
                   ("@x > 1", "'x' is not defined")]:
    with pytest.raises(ValueError, match=msg):
      pipeline.select_sites(table, bad)
  with pytest.raises(ValueError, match=r"no sites match .*columns: .*plate \(int64\)"):
    pipeline.eval_host_batches(shards, host_batch=4, filter="plate == 99")


def test_train_stream_holds_exactly_the_filtered_sites(shards):
  table = _site_table(shards)
  images = {}
  for b in pipeline.eval_host_batches(shards, host_batch=64)[0]:
    for i in np.nonzero(b["valid"])[0]:
      images[b["image"][i].tobytes()] = b["site_id"][i]
  want = set(table.site_id[table.cell_type == "VERO"])
  assert 0 < len(want) < len(table)
  for flt in ("cell_type == 'VERO'", {"cell_type": "VERO"}):
    ds, n_host = pipeline.train_dataset(shards, host_batch=1, seed=0,
                                        filter=flt, x_flip=False, rot90=False,
                                        normalize=False)
    got = [images[x[0].tobytes()] for x in ds.take(n_host).as_numpy_iterator()]
    assert n_host == len(want) and len(got) == len(set(got)) == n_host
    assert set(got) == want


def test_train_batches_global_arrays_and_exact_resume(shards):
  mesh = sharding.make_mesh()
  n_dev = mesh.devices.size
  cfg = dict(path=shards + "/*.tfrecord", filter="cell_type == 'VERO'",
             shuffle_buffer=32, x_flip=True, rot90=True, num_parallel_calls=2,
             prefetch=1)
  gb = 2 * n_dev
  it = pipeline.train_batches(cfg, global_batch=gb, mesh=mesh, seed=7,
                              resolution=16, channels=5)
  n_vero = int((_site_table(shards).cell_type == "VERO").sum())
  steps = n_vero // gb + 4            # runs past an epoch boundary
  ref = [np.asarray(next(it)["image"]) for _ in range(steps)]
  b = next(it)["image"]
  # uint8 to the devices (the training step normalizes there).
  assert isinstance(b, jax.Array) and b.dtype == np.uint8
  assert b.shape == (gb, 16, 16, 5)
  assert b.sharding.is_equivalent_to(sharding.data_sharded(mesh), 4)
  # The same pixels as the host stream, whose float32 form (normalize=True)
  # the device mapping reproduces to within one float32 rounding.
  host_kw = dict(host_batch=gb, seed=7, filter="cell_type == 'VERO'",
                 shuffle_buffer=32, num_parallel_calls=2)
  host_u8 = next(pipeline.train_dataset(
      shards, **host_kw)[0].as_numpy_iterator())
  host_f32 = next(pipeline.train_dataset(
      shards, normalize=True, **host_kw)[0].as_numpy_iterator())
  np.testing.assert_array_equal(ref[0], host_u8)
  dev = np.asarray(jax.jit(image_lib.to_float)(ref[0]))
  assert dev.dtype == np.float32
  np.testing.assert_allclose(dev, host_f32, rtol=0, atol=2e-7)
  assert dev.min() >= -1.0 and dev.max() <= 1.0

  for start in (3, n_vero // gb + 1):
    it2 = pipeline.train_batches(cfg, global_batch=gb, mesh=mesh, seed=7,
                                 resolution=16, channels=5, start_batch=start)
    for k in range(start, steps):
      np.testing.assert_array_equal(np.asarray(next(it2)["image"]), ref[k])
  other = pipeline.train_batches(cfg, global_batch=gb, mesh=mesh, seed=8,
                                 resolution=16, channels=5)
  assert not np.array_equal(np.asarray(next(other)["image"]), ref[0])


def test_prefetch_to_device_keeps_batches_in_flight_in_order():
  puts = []
  def put(x):
    puts.append(x)
    return -x
  it = pipeline.prefetch_to_device(iter(range(5)), 2, put)
  assert puts == []                      # a generator: nothing before next()
  assert next(it) == 0 and puts == [0, 1]   # the next batch is already put
  assert next(it) == -1 and puts == [0, 1, 2]
  assert list(it) == [-2, -3, -4] and puts == list(range(5))
  # size <= 1: each batch put when it is taken.
  puts.clear()
  it = pipeline.prefetch_to_device(iter(range(3)), 0, put)
  assert next(it) == 0 and puts == [0]


def test_augmentation_is_flip_and_rot90_of_a_stored_site(shards):
  images = []
  for b in pipeline.eval_host_batches(shards, host_batch=64)[0]:
    images += list(b["image"][b["valid"]])
  variants = {}
  for i, im in enumerate(images):
    for flip in (False, True):
      x = im[:, ::-1] if flip else im
      for k in range(4):
        variants[np.rot90(x, k).tobytes()] = i
  ds, _ = pipeline.train_dataset(shards, host_batch=8, seed=1, normalize=False)
  out = next(ds.as_numpy_iterator())
  assert all(x.tobytes() in variants for x in out)
  assert any(x.tobytes() not in {im.tobytes() for im in images} for x in out)


def test_eval_batches_global_uint8_with_padding(shards):
  mesh = sharding.make_mesh()
  table = _site_table(shards)
  gb = 40                                       # 256 sites -> 7 batches, last padded
  batches = list(pipeline.eval_batches(shards, global_batch=gb, mesh=mesh))
  assert len(batches) == -(-len(table) // gb)
  assert pipeline.num_eval_batches(shards, global_batch=gb) == len(batches)
  last = batches[-1]
  assert isinstance(last["image"], jax.Array) and last["image"].dtype == np.uint8
  assert last["image"].shape == (gb, 16, 16, 5)
  assert last["valid"].sum() == len(table) - gb * (len(batches) - 1)
  # host_rows brings a model output back to the host's rows.
  rows = pipeline.host_rows(last["image"], mesh)
  np.testing.assert_array_equal(rows[last["valid"]].reshape(-1),
                                np.asarray(last["image"])[last["valid"]].reshape(-1))
  for col in schema.RXRX19A_COLUMNS:
    assert len(last[col]) == gb


def test_clear_errors_before_compilation(shards, tmp_path):
  mesh = sharding.make_mesh()
  cfg = dict(path=shards)
  with pytest.raises(ValueError, match="resolution 16 but the model expects 32"):
    pipeline.train_batches(cfg, global_batch=8, mesh=mesh, seed=0, resolution=32,
                           channels=5)
  with pytest.raises(ValueError, match="5 channels but the model expects 3"):
    pipeline.train_batches(cfg, global_batch=8, mesh=mesh, seed=0, resolution=16,
                           channels=3)
  with pytest.raises(ValueError, match="multiple of"):
    pipeline.train_batches(cfg, global_batch=12, mesh=mesh, seed=0, resolution=16,
                           channels=5)
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(shards, "rxrx19a-00000-of-00008.tfrecord"), bare)
  with pytest.raises(FileNotFoundError, match="dataset_info.json"):
    pipeline.read_dataset_info(str(bare))
  with pytest.raises(FileNotFoundError, match="no TFRecord shards"):
    pipeline.list_shards(str(tmp_path / "empty*.tfrecord"))
  with pytest.raises(ValueError, match="config.data.path"):
    pipeline.list_shards("")
  with pytest.raises(ValueError, match="2 hosts|shard files for"):
    pipeline.train_dataset(shards, host_batch=4, seed=0, process_index=0,
                           process_count=16)
  info = pipeline.read_dataset_info(shards + "/rxrx19a-0000[0-3]-of-00008.tfrecord")
  assert info["num_shards"] == 8
