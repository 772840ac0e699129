"""gandl-convert: round trip, bad inputs, refusal, resume, determinism, TFDS."""
import csv
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gandl_jax.data import convert
from gandl_jax.data import imagefile
from gandl_jax.data import pipeline
from gandl_jax.data import rxrx
from gandl_jax.data import synthetic
from gandl_jax import schema

SMILES_WITH_COMMAS = "C[C@H](N)C(=O)O.Cl |r,c:1,t:2|"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  out = tmp_path_factory.mktemp("tree")
  root = synthetic.generate(str(out), dataset="rxrx19a", size=64, plates=[1],
                            wells_per_plate=16, seed=1, workers=1)
  # A CXSMILES with commas, spaces and '|' (CSV-quoted), as in the real file.
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str, keep_default_na=False)
  df.loc[df.index[df.treatment != ""][0], "SMILES"] = SMILES_WITH_COMMAS
  df.to_csv(os.path.join(root, "metadata.csv"), index=False)
  return root


def _reference_site(root, r, resolution):
  """Independent reference: PIL decode, k x k block mean in numpy, round."""
  planes = []
  for ch in range(1, 6):
    p = os.path.join(root, "images", r["experiment"], f"Plate{r['plate']}",
                     f"{r['well']}_s{r['site']}_w{ch}.png")
    a = np.asarray(Image.open(p), np.float64)
    k = a.shape[0] // resolution
    planes.append(np.floor(a.reshape(resolution, k, resolution, k).mean((1, 3)) + 0.5))
  return np.stack(planes, -1).astype(np.uint8)


def _eval_all(path, host_batch=32, **kw):
  it, _ = pipeline.eval_host_batches(path, host_batch=host_batch, **kw)
  out = []
  for b in it:
    for i in np.nonzero(b["valid"])[0]:
      out.append({k: v[i] for k, v in b.items()})
  return out


def test_round_trip_images_and_metadata(tree, tmp_path):
  shards = str(tmp_path / "shards")
  summary = convert.convert("rxrx19a", tree, shards, 32, num_shards=4, workers=1)
  df = pd.read_csv(os.path.join(tree, "metadata.csv"), dtype=str, keep_default_na=False)
  assert summary["num_examples"] == len(df) and summary["num_failed"] == 0
  names = sorted(os.listdir(shards))
  assert [n for n in names if n.endswith(".tfrecord")] == [
      f"rxrx19a-{i:05d}-of-00004.tfrecord" for i in range(4)]
  info = pipeline.read_dataset_info(shards)
  assert info["num_examples"] == len(df) and info["resolution"] == 32
  assert [c["index"] for c in info["channels"]] == [1, 2, 3, 4, 5]
  assert sum(s["num_examples"] for s in info["shards"]) == len(df)

  got = _eval_all(shards)
  ids = [g["site_id"] for g in got]
  assert sorted(ids) == sorted(df.site_id) and len(set(ids)) == len(ids)
  by_id = {r["site_id"]: r for r in df.to_dict("records")}
  ref_images = {}
  for g in got:
    r = by_id[g["site_id"]]
    ref = _reference_site(tree, r, 32)
    ref_images[g["site_id"]] = ref
    np.testing.assert_array_equal(g["image"], ref)
    for col in schema.RXRX19A_COLUMNS:
      if col in schema.INT_COLUMNS:
        assert g[col] == int(r[col]), col
      elif col in schema.FLOAT_COLUMNS:
        want = float(r[col]) if r[col] else np.nan
        np.testing.assert_allclose(g[col], want, rtol=1e-6)
      else:
        assert g[col] == r[col], col
  assert SMILES_WITH_COMMAS in {g["SMILES"] for g in got}

  # Per-channel mean/std in dataset_info match the images.
  stack = np.stack(list(ref_images.values())).reshape(-1, 5).astype(np.float64)
  np.testing.assert_allclose(info["mean"], stack.mean(0), atol=1e-3)
  np.testing.assert_allclose(info["std"], stack.std(0), atol=1e-3)

  # The training stream visits each site exactly once per epoch.
  n = len(df)
  ds, n_host = pipeline.train_dataset(shards, host_batch=16, seed=5, x_flip=False,
                                      rot90=False, shuffle_buffer=64, normalize=False)
  assert n_host == n
  key = {v.tobytes(): k for k, v in ref_images.items()}
  batches = list(ds.take(2 * n // 16).as_numpy_iterator())
  seen = [key[x.tobytes()] for b in batches for x in b]
  epoch1, epoch2 = seen[:n], seen[n:]
  assert sorted(epoch1) == sorted(df.site_id) and sorted(epoch2) == sorted(df.site_id)
  assert epoch1 != epoch2                    # reshuffled each epoch


def _write_png(path, array):
  Image.fromarray(np.asarray(array, np.uint8), mode="L").save(path)


def test_bad_inputs_listed_in_errors_csv_rest_converted(tree, tmp_path):
  root = str(tmp_path / "RxRx19a")
  shutil.copytree(tree, root)
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str, keep_default_na=False)
  rows = df.to_dict("records")
  img = lambda r, ch: os.path.join(root, "images", schema.image_relpath(  # noqa: E731
      r["experiment"], int(r["plate"]), r["well"], int(r["site"]), ch))
  missing, corrupt, wrong, noimg = rows[3], rows[10], rows[20], rows[30]
  os.remove(img(missing, 3))
  with open(img(corrupt, 2), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n this is not a png")
  _write_png(img(wrong, 1), np.zeros((40, 40)))
  for ch in range(1, 6):
    os.remove(img(noimg, ch))
  # A row whose plate is not a number.
  bad_row = dict(rows[40], plate="x", site_id="HRCE-1_x_B02_1")
  df = pd.concat([df, pd.DataFrame([bad_row])], ignore_index=True)
  df.to_csv(os.path.join(root, "metadata.csv"), index=False)

  out = str(tmp_path / "shards")
  summary = convert.convert("rxrx19a", root, out, 32, num_shards=3)
  assert summary["num_failed"] == 5              # the rest is converted

  with open(os.path.join(out, "errors.csv"), newline="") as f:
    errs = {r["site_id"]: r for r in csv.DictReader(f)}
  assert set(errs) == {missing["site_id"], corrupt["site_id"], wrong["site_id"],
                       noimg["site_id"], "HRCE-1_x_B02_1"}
  assert "missing channel file w3" in errs[missing["site_id"]]["reason"]
  assert errs[missing["site_id"]]["path"] == img(missing, 3)
  assert "corrupt" in errs[corrupt["site_id"]]["reason"]
  assert errs[corrupt["site_id"]]["path"] == img(corrupt, 2)
  assert "40x40" in errs[wrong["site_id"]]["reason"]
  assert "64x64" in errs[wrong["site_id"]]["reason"]
  assert "no image files" in errs[noimg["site_id"]]["reason"]
  assert "column plate" in errs["HRCE-1_x_B02_1"]["reason"]

  info = pipeline.read_dataset_info(out)
  assert info["num_examples"] == len(rows) - 4 and info["num_failed"] == 5
  got = {g["site_id"]: g for g in _eval_all(out)}
  assert len(got) == len(rows) - 4 and not set(errs) & set(got)
  for r in (rows[0], rows[11], rows[21], rows[-1]):
    np.testing.assert_array_equal(got[r["site_id"]]["image"], _reference_site(root, r, 32))


@pytest.mark.e2e
def test_malformed_metadata_refused_up_front(tree, tmp_path):
  root = str(tmp_path / "RxRx19a")
  os.makedirs(root)
  df = pd.read_csv(os.path.join(tree, "metadata.csv"), dtype=str, keep_default_na=False)
  df.drop(columns=["well", "SMILES"]).to_csv(os.path.join(root, "metadata.csv"),
                                             index=False)
  out = str(tmp_path / "shards")
  with pytest.raises(imagefile.MetadataError, match=r"\['well', 'SMILES'\]"):
    convert.convert("rxrx19a", root, out, 32)
  assert not os.path.exists(out) or not [f for f in os.listdir(out)
                                         if f.endswith(".tfrecord")]
  with pytest.raises(imagefile.MetadataError, match="not found"):
    convert.convert("rxrx19a", str(tmp_path / "nowhere"), out, 32)
  # The CLI: exit status 1 (README, "Exit status") and one line naming it.
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.convert",
                      "--input", root, "--output", out, "--resolution", "32"],
                     capture_output=True, text=True, check=False, timeout=300)
  assert r.returncode == 1, r.stderr[-2000:]
  assert "gandl-convert: error:" in r.stderr and "Traceback" not in r.stderr


def test_resume_and_worker_count_give_identical_shards(tree, tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  s1 = convert.convert("rxrx19a", tree, a, 16, subset="controls", num_shards=5,
                       workers=1)
  s2 = convert.convert("rxrx19a", tree, b, 16, subset="controls", num_shards=5,
                       workers=2)
  files = sorted(f for f in os.listdir(a) if f.endswith(".tfrecord"))
  assert len(files) == 5
  for f in files:
    with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
      assert fa.read() == fb.read(), f
  df = pd.read_csv(os.path.join(tree, "metadata.csv"), dtype=str, keep_default_na=False)
  assert s1["num_examples"] == s2["num_examples"] == (df.treatment == "").sum()

  # Resume: one shard lost (and a stale temp file) -> only it is redone.
  with open(os.path.join(a, files[2]), "rb") as f:
    before = f.read()
  os.remove(os.path.join(a, files[2]))
  with open(os.path.join(a, "." + files[2] + ".tmp-123.tfrecord"), "wb") as f:
    f.write(b"partial")
  mtime = os.path.getmtime(os.path.join(a, files[0]))
  s3 = convert.convert("rxrx19a", tree, a, 16, subset="controls", num_shards=5)
  assert s3["skipped_shards"] == 4 and s3["num_examples"] == s1["num_examples"]
  assert os.path.getmtime(os.path.join(a, files[0])) == mtime
  assert not os.path.exists(os.path.join(a, "." + files[2] + ".tmp-123.tfrecord"))
  with open(os.path.join(a, files[2]), "rb") as f:
    assert f.read() == before
  assert len(_eval_all(a + "/*.tfrecord")) == s1["num_examples"]
  # A different plan (other resolution) in the same directory is refused.
  with pytest.raises(ValueError, match="another conversion"):
    convert.convert("rxrx19a", tree, a, 16, subset="controls", num_shards=4)


def test_resize_area_matches_overlap_reference():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (50, 50)).astype(np.uint8)

  def weights(src, dst):
    w = np.zeros((dst, src))
    for i in range(dst):
      lo, hi = i * src / dst, (i + 1) * src / dst
      for j in range(src):
        w[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    return w / w.sum(1, keepdims=True)

  w = weights(50, 32)
  ref = np.floor(w @ img.astype(np.float64) @ w.T + 0.5)
  got = imagefile.resize_area(img, 32).astype(np.float64)
  np.testing.assert_array_equal(got, ref)
  # A constant image stays constant; the mean is preserved.
  np.testing.assert_array_equal(imagefile.resize_area(np.full((50, 50), 77, np.uint8), 32), 77)
  big = rng.integers(0, 256, (96, 96)).astype(np.uint8)
  np.testing.assert_array_equal(
      imagefile.resize_area(big, 32),
      np.floor(big.reshape(32, 3, 32, 3).mean((1, 3)) + 0.5).astype(np.uint8))
  w = weights(50, 25)
  np.testing.assert_array_equal(imagefile.resize_area(img, 25),
                                np.floor(w @ img @ w.T + 0.5).astype(np.uint8))


def test_rxrx1_channel_selection(tmp_path):
  root = synthetic.generate(str(tmp_path), dataset="rxrx1", size=32, plates=1,
                            wells_per_plate=6, seed=0, workers=1)
  out = str(tmp_path / "s")
  convert.convert("rxrx1", root, out, 16, channels=[1, 2, 6])
  info = pipeline.read_dataset_info(out)
  assert info["num_channels"] == 3
  assert info["channels"][2]["stain"] == "MitoTracker Deep Red"
  assert set(info["columns"]) == set(schema.RXRX1_COLUMNS)
  got = _eval_all(out, host_batch=8)
  assert got[0]["image"].shape == (16, 16, 3)
  assert {g["cell_type"] for g in got} == set(schema.RXRX1_CELL_TYPES)
  with pytest.raises(ValueError, match="channels"):
    convert.convert("rxrx19a", root, out, 16, channels=[6])


def test_tfds_builder_matches_converter(tree, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from gandl_jax.data import tfds_rxrx19a
  builder = tfds_rxrx19a.Rxrx19a(config="32", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.dirname(tree)))
  ds = builder.as_dataset(split="train")
  ex = {e["site_id"].decode(): e for e in tfds.as_numpy(ds)}
  df = pd.read_csv(os.path.join(tree, "metadata.csv"), dtype=str, keep_default_na=False)
  assert sorted(ex) == sorted(df.site_id)
  r = df.iloc[7].to_dict()
  np.testing.assert_array_equal(ex[r["site_id"]]["image"], _reference_site(tree, r, 32))
  assert ex[r["site_id"]]["disease_condition"].decode() == r["disease_condition"]
  assert "rxrx.ai" in tfds_rxrx19a.Rxrx19a.MANUAL_DOWNLOAD_INSTRUCTIONS


def _shard_images(path):
  """{site_id: image} of one shard file, read with the pipeline."""
  return {g["site_id"]: g["image"] for g in _eval_all(path, host_batch=8)}


def _channel_reference(root, r, resolution, channels):
  return _reference_site(root, r, resolution)[..., [c - 1 for c in channels]]


def test_resume_never_keeps_a_stale_shard(tree, tmp_path, monkeypatch):
  """A kill between the progress record and the rename,
  with an older conversion's shard under the same name."""
  out = str(tmp_path / "s")
  convert.convert("rxrx19a", tree, out, 16, num_shards=2, channels=[1, 2, 3])
  name = convert.shard_name("rxrx19a", 0, 2)
  real_write_text = convert.gio.write_text

  def killed_after_record(path, text):
    real_write_text(path, text)
    if path.endswith(name + ".json"):
      raise KeyboardInterrupt("killed between record and rename")

  monkeypatch.setattr(convert.gio, "write_text", killed_after_record)
  with pytest.raises(KeyboardInterrupt):
    convert.convert("rxrx19a", tree, out, 16, num_shards=2, channels=[3, 4, 5],
                    overwrite=True)
  monkeypatch.setattr(convert.gio, "write_text", real_write_text)
  s = convert.convert("rxrx19a", tree, out, 16, num_shards=2,
                      channels=[3, 4, 5])
  assert s["skipped_shards"] == 0
  df = pd.read_csv(os.path.join(tree, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  by_id = {r["site_id"]: r for r in df.to_dict("records")}
  for i in range(2):
    got = _shard_images(os.path.join(out, convert.shard_name("rxrx19a", i, 2)))
    assert got
    for sid, image in got.items():
      np.testing.assert_array_equal(
          image, _channel_reference(tree, by_id[sid], 16, [3, 4, 5]))
  # The record holds the shard's size and SHA-256; a shard of another size
  # (truncated copy) is redone on resume, an intact one kept.
  import hashlib
  import json
  path = os.path.join(out, name)
  with open(os.path.join(out, "_progress", name + ".json")) as f:
    record = json.load(f)
  with open(path, "rb") as f:
    data = f.read()
  assert record["bytes"] == len(data)
  assert record["sha256"] == hashlib.sha256(data).hexdigest()
  with open(path, "wb") as f:
    f.write(data[:-7])
  s = convert.convert("rxrx19a", tree, out, 16, num_shards=2,
                      channels=[3, 4, 5])
  assert s["skipped_shards"] == 1
  with open(path, "rb") as f:
    assert f.read() == data


@pytest.mark.e2e
def test_second_conversion_into_one_output_refused(tree, tmp_path):
  """A lock file; the other run's temp files survive."""
  import json
  import socket
  out = str(tmp_path / "s")
  os.makedirs(out)
  # "The other conversion": this (live) process on this host.
  held = dict(pid=os.getpid(), host=socket.gethostname(),
              started="2026-01-01T00:00:00+00:00", command="gandl-convert")
  lock = os.path.join(out, ".gandl-convert.lock")
  with open(lock, "w") as f:
    json.dump(held, f)
  other_tmp = os.path.join(out, ".rxrx19a-00000-of-00002.tfrecord.tmp-x.tfrecord")
  with open(other_tmp, "wb") as f:
    f.write(b"being written by the other conversion")
  with pytest.raises(FileExistsError) as e:   # convert.OutputLockedError
    convert.convert("rxrx19a", tree, out, 16, num_shards=2)
  msg = str(e.value)
  assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
  assert lock in msg and "delete" in msg
  assert os.path.exists(other_tmp) and os.path.exists(lock)
  assert not [f for f in os.listdir(out) if f.endswith(".tfrecord")
              and not f.startswith(".")]
  # A lock of another host is refused too (cannot be checked from here).
  os.remove(lock)
  with open(lock, "w") as f:
    json.dump(dict(held, host="elsewhere", pid=1), f)
  with pytest.raises(FileExistsError, match="host elsewhere"):
    convert.convert("rxrx19a", tree, out, 16, num_shards=2)
  # A stale lock of this host (its pid is gone) is taken over; the lock is
  # released when the conversion ends.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(lock, "w") as f:
    json.dump(dict(held, pid=dead.pid), f)
  s = convert.convert("rxrx19a", tree, out, 16, num_shards=2)
  assert s["num_failed"] == 0 and not os.path.exists(lock)
  assert not os.path.exists(other_tmp)     # leftovers of a dead run: removed


def test_non_regular_files_and_huge_ints_are_per_site_errors(tree, tmp_path):
  """A directory, a symlink loop and a FIFO at PNG paths
  and an int64 overflow become errors.csv rows; nothing hangs."""
  import signal
  root = str(tmp_path / "RxRx19a")
  shutil.copytree(tree, root)
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  rows = df.to_dict("records")
  img = lambda r, ch: os.path.join(root, "images", schema.image_relpath(  # noqa: E731
      r["experiment"], int(r["plate"]), r["well"], int(r["site"]), ch))
  directory, loop, fifo, huge = rows[2], rows[12], rows[22], rows[32]
  os.remove(img(directory, 2))
  os.mkdir(img(directory, 2))
  os.remove(img(loop, 4))
  os.symlink(img(loop, 4), img(loop, 4))
  os.remove(img(fifo, 1))
  os.mkfifo(img(fifo, 1))
  df.loc[32, "site"] = "99999999999999999999"
  df.to_csv(os.path.join(root, "metadata.csv"), index=False)

  def hung(*_):
    raise TimeoutError("conversion hung (FIFO opened blocking?)")

  old = signal.signal(signal.SIGALRM, hung)
  signal.alarm(120)
  try:
    out = str(tmp_path / "s")
    summary = convert.convert("rxrx19a", root, out, 16, num_shards=2)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  assert summary["num_failed"] == 4
  assert summary["num_examples"] == len(rows) - 4
  with open(os.path.join(out, "errors.csv"), newline="") as f:
    errs = {r["site_id"]: r for r in csv.DictReader(f)}
  assert "directory" in errs[directory["site_id"]]["reason"]
  assert errs[directory["site_id"]]["path"] == img(directory, 2)
  assert "symlink loop" in errs[loop["site_id"]]["reason"]
  assert "FIFO" in errs[fifo["site_id"]]["reason"]
  assert "column site" in errs[huge["site_id"]]["reason"]
  assert "int64" in errs[huge["site_id"]]["reason"]


def test_metadata_paths_and_numbers_refused(tree, tmp_path):
  """`../` and absolute paths, `1_0`, infinities."""
  root = str(tmp_path / "RxRx19a")
  shutil.copytree(tree, root)
  df = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str,
                   keep_default_na=False)
  r0 = df.iloc[0].to_dict()
  # Valid PNGs outside images/ that the bad rows point at.
  outside = os.path.join(root, "outside")
  absolute = str(tmp_path / "elsewhere")
  for d in (outside, absolute):
    os.makedirs(os.path.join(d, f"Plate{r0['plate']}"))
    for ch in range(1, 6):
      shutil.copy(os.path.join(root, "images", schema.image_relpath(
          r0["experiment"], int(r0["plate"]), r0["well"], int(r0["site"]),
          ch)), os.path.join(d, schema.image_relpath(
              "", int(r0["plate"]), r0["well"], int(r0["site"]), ch)[1:]))
  bad = [dict(r0, experiment="../outside", site_id="up"),
         dict(r0, experiment=absolute, site_id="abs"),
         dict(r0, well="../" + r0["well"], site_id="well_up"),
         dict(r0, plate=f"{r0['plate']}_0", site_id="underscore"),
         dict(r0, plate=f" {r0['plate']}", site_id="space"),
         dict(r0, treatment_conc="inf", site_id="inf"),
         dict(r0, treatment_conc="1e999", site_id="overflow"),
         dict(r0, treatment_conc="nan", site_id="nan")]
  df = pd.concat([df, pd.DataFrame(bad)], ignore_index=True)
  df.to_csv(os.path.join(root, "metadata.csv"), index=False)
  out = str(tmp_path / "s")
  summary = convert.convert("rxrx19a", root, out, 16, num_shards=2)
  assert summary["num_failed"] == len(bad)
  with open(os.path.join(out, "errors.csv"), newline="") as f:
    errs = {r["site_id"]: r["reason"] for r in csv.DictReader(f)}
  assert set(errs) == {b["site_id"] for b in bad}
  for sid in ("up", "abs"):
    assert "column experiment" in errs[sid] and "plain name" in errs[sid]
  assert "column well" in errs["well_up"]
  assert "column plate" in errs["underscore"] and "'1_0'" in errs["underscore"]
  assert "column plate" in errs["space"]
  for sid in ("inf", "overflow", "nan"):
    assert "column treatment_conc" in errs[sid] and "finite" in errs[sid]
  # Well-formed values still parse.
  m = rxrx.parse_row(dict(r0, plate="+7", treatment_conc="2.5e-1"), "rxrx19a")
  assert m["plate"] == 7 and m["treatment_conc"] == 0.25
  assert np.isnan(rxrx.parse_row(dict(r0, treatment_conc=""),
                                   "rxrx19a")["treatment_conc"])


def _race_for_lock(out, barrier, results, hold):
  barrier.wait()
  try:
    record = convert.lock_output(out)
  except convert.OutputLockedError:
    results.put("refused")
    return
  results.put("owner")
  time.sleep(hold)          # hold it while the others try
  convert.unlock_output(out, record)


@pytest.mark.e2e
def test_stale_lock_has_exactly_one_new_owner(tmp_path):
  """Three restarts at once on a lock left by a dead pid: one owner, always;
  the lock is gone once the owner releases it."""
  import json
  import multiprocessing
  import socket
  ctx = multiprocessing.get_context("fork")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  out = str(tmp_path / "s")
  os.makedirs(out)
  lock = os.path.join(out, convert.LOCK_FILE)
  for trial in range(12):
    with open(lock, "w") as f:
      json.dump(dict(pid=dead.pid, host=socket.gethostname(),
                     started="2026-01-01T00:00:00+00:00"), f)
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race_for_lock,
                         args=(out, barrier, results, 0.3)) for _ in range(3)]
    for p in procs:
      p.start()
    for p in procs:
      p.join(60)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got == ["owner", "refused", "refused"], (trial, got)
    assert not os.path.exists(lock)


@pytest.mark.e2e
def test_record_bytes_do_not_depend_on_the_process(tmp_path):
  """The same site encodes to the same bytes in processes with different
  string hashing (a shard's SHA-256 is the same for two clean runs)."""
  script = tmp_path / "enc.py"
  script.write_text(
      "import hashlib, numpy as np\n"
      "from gandl_jax.data import convert\n"
      "img = np.arange(8 * 8 * 5, dtype=np.uint8).reshape(8, 8, 5)\n"
      "cols = convert.dataset_columns('rxrx19a')\n"
      "meta = {c: 1 if t == 'int64' else 0.5 if t == 'float' else c\n"
      "        for c, t in cols.items()}\n"
      "print(hashlib.sha256(convert.encode_example(img, meta, 'rxrx19a'))"
      ".hexdigest())\n")
  digests = set()
  for seed in ("1", "2", "3"):
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, str(script)], env=env, check=True,
                         capture_output=True, text=True).stdout
    digests.add(out.strip().splitlines()[-1])
  assert len(digests) == 1, digests
