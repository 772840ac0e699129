"""The TFDS builders on Apache Beam: `tfds build` as documented, the same
records / order / index / errors as gandl-convert, training and export on the
TFDS directory (same shuffling, per-host split and exact resume)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny
from gandl_jax.data import convert, pipeline, synthetic, tfds_builder
from gandl_jax import schema
from gandl_jax import sharding
from gandl_jax.train import loop as train_loop

pytest.importorskip("apache_beam")
tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES = 8
NUM_SHARDS = 3


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """A 16x16 synthetic RxRx19a (256 sites) with a corrupt PNG and a missing
  channel file."""
  out = tmp_path_factory.mktemp("tree")
  root = synthetic.generate(str(out), dataset="rxrx19a", size=16, plates=[1],
                            wells_per_plate=16, seed=3, workers=1)
  with open(os.path.join(root, "metadata.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  img = lambda r, ch: os.path.join(root, "images", schema.image_relpath(  # noqa: E731
      r["experiment"], int(r["plate"]), r["well"], int(r["site"]), ch))
  with open(img(rows[5], 2), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not a png")
  os.remove(img(rows[17], 4))
  return dict(root=root, corrupt=(rows[5]["site_id"], img(rows[5], 2)),
              missing=(rows[17]["site_id"], img(rows[17], 4)), n=len(rows))


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
  """The README's command (`tfds build FILE --config R --manual_dir DIR`, plus
  a data_dir and a shard count) and gandl-convert on the same tree."""
  out = tmp_path_factory.mktemp("out")
  data_dir = str(out / "tfds")
  # The parent of RxRx19a/, as the docs allow.
  cmd = [os.path.join(os.path.dirname(sys.executable), "tfds"), "build",
         "gandl_jax/data/tfds_rxrx19a.py", "--config", str(RES),
         "--manual_dir", os.path.dirname(tree["root"]), "--data_dir", data_dir,
         "--num_shards", str(NUM_SHARDS)]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  shards = str(out / "shards")
  convert.convert("rxrx19a", tree["root"], shards, RES, num_shards=4)
  return dict(tfds=os.path.join(data_dir, "rxrx19a", str(RES), "2.0.0"),
              shards=shards, data_dir=data_dir)


def _records(path):
  return [tf.train.Example.FromString(r) for f in pipeline.list_shards(path)
          for r in tf.data.TFRecordDataset(f).as_numpy_iterator()]


def _csv_rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_tfds_build_matches_gandl_convert(tree, built):
  d, shards = built["tfds"], built["shards"]
  names = sorted(os.listdir(d))
  assert [n for n in names if "tfrecord" in n] == [
      f"rxrx19a-train.tfrecord-{i:05d}-of-{NUM_SHARDS:05d}" for i in range(NUM_SHARDS)]
  assert not [n for n in names if n.startswith("_gandl")]   # scratch removed
  # The same records (every feature: image bytes, shape, metadata), in the
  # same order; protos compared, not bytes (map order is not fixed).
  got, want = _records(d), _records(shards)
  assert len(got) == len(want) == tree["n"] - 2
  assert all(a == b for a, b in zip(got, want))
  # The same index, up to the shard files and positions.
  a, b = _csv_rows(os.path.join(d, "sites.csv")), _csv_rows(os.path.join(shards, "sites.csv"))
  drop = lambda r: {k: v for k, v in r.items() if k not in ("shard", "position")}  # noqa: E731
  assert [drop(r) for r in a] == [drop(r) for r in b]
  info = pipeline.read_dataset_info(d)
  assert [s["num_examples"] for s in info["shards"]] == [
      sum(r["shard"] == s["file"] for r in a) for s in info["shards"]]
  assert all([int(r["position"]) for r in a if r["shard"] == s["file"]]
             == list(range(s["num_examples"])) for s in info["shards"])
  # dataset_info.json's fields: equal but for the files and the command
  # (and gandl-convert's resume fingerprint: TFDS versions its datasets).
  other = pipeline.read_dataset_info(shards)
  for k in other:
    if k not in ("shards", "num_shards", "command", "created", "fingerprint",
                 "sites_bytes"):
      assert info[k] == other[k], k
  assert info["builder"] == f"rxrx19a/{RES}:2.0.0"
  # Failed sites: an errors table next to the dataset, as gandl-convert's.
  with open(os.path.join(d, "errors.csv")) as f1, \
      open(os.path.join(shards, "errors.csv")) as f2:
    assert f1.read() == f2.read()
  errs = {r["site_id"]: r for r in _csv_rows(os.path.join(d, "errors.csv"))}
  sid, path = tree["corrupt"]
  assert errs[sid]["path"] == path and "corrupt" in errs[sid]["reason"]
  sid, path = tree["missing"]
  assert errs[sid]["path"] == path and "missing channel file w4" in errs[sid]["reason"]
  # TFDS's own reader agrees (tfds.load users get uint8 images).
  builder = tfds.builder_from_directory(d)
  assert builder.info.metadata["num_failed"] == 2
  first = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
  assert first["image"].shape == (RES, RES, 5) and first["image"].dtype == np.uint8
  want0 = np.frombuffer(want[0].features.feature["image"].bytes_list.value[0],
                        np.uint8).reshape(RES, RES, 5)
  np.testing.assert_array_equal(first["image"], want0)


def test_without_beam_the_same_dataset(tree, built, tmp_path, monkeypatch):
  """No apache_beam: the same functions in this process, the same output."""
  monkeypatch.setattr(tfds_builder, "have_beam", lambda: False)
  out = tfds_builder.build("rxrx19a", tree["root"], str(tmp_path), RES,
                           num_shards=NUM_SHARDS)   # what gandl-demo calls
  d = os.path.join(str(tmp_path), "rxrx19a", str(RES), "2.0.0")
  assert out["path"] == d and out["num_failed"] == 2
  assert out["num_examples"] == tree["n"] - 2
  got, want = _records(d), _records(built["tfds"])
  assert len(got) == len(want) and all(a == b for a, b in zip(got, want))
  for name in ("sites.csv", "errors.csv"):
    with open(os.path.join(d, name)) as f1, open(os.path.join(built["tfds"], name)) as f2:
      assert f1.read() == f2.read(), name


def test_input_pipeline_on_tfds_dir_same_stream_split_and_resume(built):
  d, shards = built["tfds"], built["shards"]
  kw = dict(host_batch=8, seed=11, shuffle_buffer=32, normalize=False,
            x_flip=False, rot90=False)
  ds, n = pipeline.train_dataset(d, **kw)
  assert n == len(_records(d))
  stream = list(ds.take(2 * n // 8 + 3).as_numpy_iterator())
  # Exact resume: starting at batch k gives the stream's batches from k on.
  for k in (5, n // 8 + 1):
    ds_k, _ = pipeline.train_dataset(d, start_batch=k, **kw)
    for a, b in zip(ds_k.take(3).as_numpy_iterator(), stream[k:k + 3]):
      np.testing.assert_array_equal(a, b)
  # Each epoch sees every site once.
  keys = {np.frombuffer(r.features.feature["image"].bytes_list.value[0],
                        np.uint8).tobytes() for r in _records(shards)}
  epoch = [x.tobytes() for b in stream[:n // 8] for x in b]
  assert len(set(epoch)) == len(epoch) and set(epoch) <= keys
  # Two hosts read disjoint files covering every site; eval merges by index.
  sites = [set(pipeline.host_sites(d, None, h, 2)["site_id"]) for h in (0, 1)]
  assert not sites[0] & sites[1] and len(sites[0] | sites[1]) == n
  rows = []
  for h in (0, 1):
    it, _ = pipeline.eval_host_batches(d, host_batch=16, process_index=h,
                                       process_count=2)
    for b in it:
      rows += [(int(i), s) for i, s, v in zip(b["index"], b["site_id"], b["valid"]) if v]
  index = pipeline.read_sites_index(d)
  assert sorted(rows) == list(enumerate(index["site_id"]))
  # And the eval rows come in the same order as from gandl-convert's shards.
  it, _ = pipeline.eval_host_batches(shards, host_batch=16)
  conv = [s for b in it for s, v in zip(b["site_id"], b["valid"]) if v]
  assert list(index["site_id"]) == conv


def test_training_reads_tfds_dataset(built, tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  cfg = tiny.train_config(built["tfds"])
  s = train_loop.train(cfg, str(tmp_path / "run"), mesh=mesh)
  assert s["step"] == 4 and s["reason"] == "finished"
  # A config directory (not the version) is refused with a pointer to it.
  with pytest.raises(FileNotFoundError, match="2.0.0"):
    pipeline.read_dataset_info(os.path.dirname(built["tfds"]))
  # A TFDS directory of another builder is refused, naming the missing file.
  other = tmp_path / "other"
  shutil.copytree(built["tfds"], other)
  os.remove(other / schema.TFDS_METADATA_FILE)
  with pytest.raises(FileNotFoundError, match="not one built by gandl_jax"):
    pipeline.read_dataset_info(str(other))
  with open(os.path.join(built["tfds"], schema.TFDS_METADATA_FILE)) as f:
    assert json.load(f)["resolution"] == RES


def test_tfds_dir_with_a_missing_or_resized_shard_refused(built, tmp_path):
  """metadata.json lists each shard's size; the reader checks the files as
  for gandl-convert's directories."""
  with open(os.path.join(built["tfds"], schema.TFDS_METADATA_FILE)) as f:
    meta = json.load(f)
  for s in meta["shards"]:
    assert s["bytes"] == os.path.getsize(os.path.join(built["tfds"], s["file"]))
  assert meta["sites_bytes"] == os.path.getsize(
      os.path.join(built["tfds"], schema.SITES_INDEX_FILE))
  name = meta["shards"][1]["file"]
  for damage in ("remove", "append"):
    d = tmp_path / damage
    shutil.copytree(built["tfds"], d)
    if damage == "remove":
      os.remove(d / name)
    else:
      with open(d / name, "ab") as f:
        f.write(b"\0")
    with pytest.raises(FileNotFoundError) as e:
      pipeline.list_shards(str(d))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d}: not a complete conversion")
    assert name in msg and "tfds" in msg.split("complete it with: ")[1]
