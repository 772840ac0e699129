"""Converted data is never stale, mixed or silently partial: the fingerprint
of a conversion's inputs, dataset_info.json as its commit marker, the readers'
completeness check, zero converted sites, and SIGKILLs at random points of a
conversion and a re-conversion."""
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gandl_jax.data import convert
from gandl_jax.data import pipeline
from gandl_jax.data import synthetic
from gandl_jax import schema

CHANNELS = schema.JUMP_CHANNELS
_CONVERT = [sys.executable, "-m", "gandl_jax.cli.convert"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """A small synthetic RxRx19a: 16x16 PNGs, 16 wells x 4 sites."""
  out = tmp_path_factory.mktemp("tree")
  return synthetic.generate(str(out), dataset="rxrx19a", size=16, plates=[1],
                            wells_per_plate=16, seed=3, workers=1)


def _copy_tree(tree, dst):
  root = str(dst / "RxRx19a")
  shutil.copytree(tree, root)
  return root


def _metadata(root):
  return pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str,
                     keep_default_na=False)


def _loaddata_set(root, size=16, wells=4, sites=(1, 2)):
  """A LoadData CSV over 16-bit TIFFs (one plate); returns its path."""
  rng = np.random.default_rng(0)
  d = os.path.join(root, "images")
  os.makedirs(d, exist_ok=True)
  rows = []
  for w in range(wells):
    for s in sites:
      row = dict(Metadata_Plate="P1", Metadata_Well=f"A{w + 1:02d}",
                 Metadata_Site=str(s))
      for c, ch in enumerate(CHANNELS):
        name = f"w{w}s{s}c{c}.tiff"
        a = rng.integers(100, 4000, (size, size)).astype(np.uint16)
        Image.fromarray(a).save(os.path.join(d, name), format="TIFF")
        row[f"FileName_{ch}"] = name
        row[f"PathName_{ch}"] = d
      rows.append(row)
  path = os.path.join(root, "load_data.csv")
  pd.DataFrame(rows).to_csv(path, index=False)
  return path


def _records(path):
  """{site_id: record} read through the shared reader (eval stream)."""
  it, _ = pipeline.eval_host_batches(path, host_batch=16)
  out = {}
  for b in it:
    for i in np.nonzero(b["valid"])[0]:
      r = {k: v[i] for k, v in b.items()}
      assert r["site_id"] not in out, f"duplicate {r['site_id']}"
      out[r["site_id"]] = r
  return out


def _one_line(e):
  msg = str(e.value) if hasattr(e, "value") else str(e)
  assert "\n" not in msg.strip(), msg
  return msg


# --------------------------------------------------------------------------
# The fingerprint: a rerun with other inputs or flags is refused.


def test_loaddata_column_added_refused_then_overwritten(tmp_path):
  csv_path = _loaddata_set(str(tmp_path / "set"))
  out = str(tmp_path / "out")
  convert.convert("loaddata", csv_path, out, 8, num_shards=2)
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)
            if f.endswith(".tfrecord")}
  # The documented JUMP join: treatment columns added to the CSV.
  df = pd.read_csv(csv_path, dtype=str)
  df["Metadata_JCP2022"] = [f"JCP2022_{i % 3:06d}" for i in range(len(df))]
  df.to_csv(csv_path, index=False)
  with pytest.raises(ValueError) as e:
    convert.convert("loaddata", csv_path, out, 8, num_shards=2)
  msg = _one_line(e)
  assert "columns added: Metadata_JCP2022" in msg and "--overwrite" in msg
  assert msg.startswith(out)
  # Nothing was touched: the old conversion is still complete and readable.
  assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)
          if f.endswith(".tfrecord")} == before
  assert "Metadata_JCP2022" not in pipeline.read_dataset_info(out)["columns"]
  assert len(_records(out)) == len(df)

  s = convert.convert("loaddata", csv_path, out, 8, num_shards=2,
                      overwrite=True)
  assert s["skipped_shards"] == 0
  got = _records(out)
  want = {f"P1_{r.Metadata_Well}_{r.Metadata_Site}": r.Metadata_JCP2022
          for r in df.itertuples()}
  assert {k: v["Metadata_JCP2022"] for k, v in got.items()} == want
  info = pipeline.read_dataset_info(out)
  assert "Metadata_JCP2022" in info["fingerprint"]["columns"]


def test_rxrx_relabelled_condition_and_resolution_refused(tree, tmp_path):
  root = _copy_tree(tree, tmp_path)
  out = str(tmp_path / "out")
  convert.convert("rxrx19a", root, out, 16, num_shards=3)
  old = pipeline.read_dataset_info(out)["fingerprint"]["sha256"]
  # The same command again resumes (same fingerprint).
  assert convert.convert("rxrx19a", root, out, 16,
                         num_shards=3)["skipped_shards"] == 3
  df = _metadata(root)
  i = int(np.nonzero((df.disease_condition == "Mock").to_numpy())[0][0])
  sid = df.site_id[i]
  df.loc[i, "disease_condition"] = "UV Inactivated SARS-CoV-2"
  df.to_csv(os.path.join(root, "metadata.csv"), index=False)
  with pytest.raises(ValueError) as e:
    convert.convert("rxrx19a", root, out, 16, num_shards=3)
  msg = _one_line(e)
  assert "metadata rows changed: 1 sites" in msg and sid in msg
  assert "--overwrite" in msg
  with pytest.raises(ValueError, match="resolution 16 -> 8"):
    convert.convert("rxrx19a", root, out, 8, num_shards=3)
  with pytest.raises(ValueError, match="num_shards 3 -> 4"):
    convert.convert("rxrx19a", root, out, 16, num_shards=4)
  assert _records(out)[sid]["disease_condition"] == "Mock"

  convert.convert("rxrx19a", root, out, 16, num_shards=3, overwrite=True)
  got = _records(out)
  assert got[sid]["disease_condition"] == "UV Inactivated SARS-CoV-2"
  assert {k: v["disease_condition"] for k, v in got.items()} == dict(
      zip(df.site_id, df.disease_condition))
  info = pipeline.read_dataset_info(out)
  assert info["fingerprint"]["sha256"] != old
  sites = pd.read_csv(os.path.join(out, "sites.csv"), dtype=str)
  assert sites.set_index("site_id").disease_condition[sid] == (
      "UV Inactivated SARS-CoV-2")
  # --overwrite with another shard count replaces the old shards.
  convert.convert("rxrx19a", root, out, 8, num_shards=2, overwrite=True)
  assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == [
      convert.shard_name("rxrx19a", i, 2) for i in range(2)]
  assert len(_records(out)) == len(df)


def test_describe_change_names_what_changed():
  rows = [dict(site_id=f"s{i}", plate=1, label="a") for i in range(4)]
  kw = dict(resolution=64, channels=[1, 2], source_size=[128, 128],
            num_shards=2, compression="", columns=["site_id", "plate", "label"])
  a = convert.fingerprint("rxrx19a", rows, **kw)
  assert convert.fingerprint("rxrx19a", [dict(r) for r in rows],
                             **kw)["sha256"] == a["sha256"]
  b = convert.fingerprint("rxrx19a", rows[:3] + [dict(rows[3], label="b")],
                          **dict(kw, resolution=32))
  assert convert.describe_change(a, b) == (
      "resolution 64 -> 32; metadata rows changed: 1 sites (e.g. s3)")
  c = convert.fingerprint("rxrx19a", rows[1:] + [dict(rows[0], site_id="t")],
                          **kw)
  assert convert.describe_change(a, c) == (
      "sites added: 1 (e.g. t); sites removed: 1 (e.g. s0)")
  d = convert.fingerprint("rxrx19a", rows[::-1], **kw)
  assert convert.describe_change(a, d) == "site order changed (rows reordered)"
  assert convert.describe_change(None, a) == "no fingerprint recorded"


# --------------------------------------------------------------------------
# dataset_info.json is the commit marker; every reader checks the files.


def test_dataset_info_lists_every_shard_and_the_fingerprint(tree, tmp_path):
  import hashlib
  out = str(tmp_path / "out")
  convert.convert("rxrx19a", tree, out, 8, num_shards=3,
                  command="gandl-convert --output x")
  info = pipeline.read_dataset_info(out)
  names = sorted(f for f in os.listdir(out) if f.endswith(".tfrecord"))
  assert [s["file"] for s in info["shards"]] == names
  for s in info["shards"]:
    with open(os.path.join(out, s["file"]), "rb") as f:
      data = f.read()
    assert s["bytes"] == len(data)
    assert s["sha256"] == hashlib.sha256(data).hexdigest()
  assert info["sites_bytes"] == os.path.getsize(os.path.join(out, "sites.csv"))
  with open(os.path.join(out, "_progress", "fingerprint.json")) as f:
    recorded = json.load(f)
  assert info["fingerprint"]["sha256"] == recorded["sha256"]
  assert info["fingerprint"]["resolution"] == 8
  assert len(recorded["rows"]) == info["num_examples"]
  assert recorded["command"] == "gandl-convert --output x"


def _refused(path, *needles):
  """Every reader refuses `path` with one line naming the directory."""
  d = path.rstrip("/")
  d = d if os.path.isdir(d) else os.path.dirname(d)
  for read in (pipeline.read_dataset_info, pipeline.list_shards,
               pipeline.read_sites_index,
               lambda p: pipeline.eval_host_batches(p, host_batch=4),
               lambda p: pipeline.train_dataset(p, host_batch=4, seed=0)):
    with pytest.raises(FileNotFoundError) as e:   # IncompleteDataError
      read(path)
    assert type(e.value).__name__ == "IncompleteDataError"
    msg = _one_line(e)
    assert msg.startswith(d + ":") and "not a complete conversion" in msg
    for n in needles:
      assert n in msg, msg


def test_readers_refuse_missing_extra_or_resized_shards(tree, tmp_path):
  good = str(tmp_path / "good")
  cmd = "gandl-convert --dataset rxrx19a --output good --resolution 8"
  convert.convert("rxrx19a", tree, good, 8, num_shards=3, command=cmd)
  name = convert.shard_name("rxrx19a", 1, 3)

  missing = str(tmp_path / "missing")
  shutil.copytree(good, missing)
  os.remove(os.path.join(missing, name))
  _refused(missing, "1 of 3 listed shards missing", name,
           f"complete it with: {cmd}")
  # Through a glob and a single shard file as well.
  _refused(os.path.join(missing, "*.tfrecord"), name)
  _refused(os.path.join(missing, convert.shard_name("rxrx19a", 0, 3)), name)

  extra = str(tmp_path / "extra")
  shutil.copytree(good, extra)
  shutil.copy(os.path.join(good, name),
              os.path.join(extra, convert.shard_name("rxrx19a", 1, 4)))
  _refused(extra, "not in its dataset info", "rxrx19a-00001-of-00004")

  resized = str(tmp_path / "resized")
  shutil.copytree(good, resized)
  with open(os.path.join(resized, name), "ab") as f:
    f.write(b"\0" * 5)
  _refused(resized, name, "bytes")

  sites = str(tmp_path / "sites")
  shutil.copytree(good, sites)
  with open(os.path.join(sites, "sites.csv"), "a") as f:
    f.write("x\n")
  _refused(sites, "sites.csv")

  # No dataset_info.json but progress records: an interrupted conversion.
  nomarker = str(tmp_path / "nomarker")
  shutil.copytree(good, nomarker)
  os.remove(os.path.join(nomarker, schema.DATASET_INFO_FILE))
  _refused(nomarker, "no dataset_info.json", f"complete it with: {cmd}")
  # The probe reads sites.csv through the same check.
  from gandl_jax.train import probe
  with pytest.raises(FileNotFoundError):
    probe.probe_sites(str(tmp_path / "workdir"), nomarker, 8, 0)
  # Temporary files of a writer are not shards.
  ok = str(tmp_path / "ok")
  shutil.copytree(good, ok)
  open(os.path.join(ok, "." + name + ".tmp-1.tfrecord"), "wb").close()
  assert len(_records(ok)) == pipeline.read_dataset_info(good)["num_examples"]


def test_reconversion_removes_the_marker_before_any_shard(tree, tmp_path,
                                                          monkeypatch):
  out = str(tmp_path / "out")
  convert.convert("rxrx19a", tree, out, 16, num_shards=3, command="CMD-A")
  events = []
  real_remove = convert.gio.remove

  def remove(path):
    events.append(os.path.basename(path))
    if path.endswith(".tfrecord"):
      assert not os.path.exists(os.path.join(out, schema.DATASET_INFO_FILE))
      raise KeyboardInterrupt("killed at the first shard")
    real_remove(path)

  monkeypatch.setattr(convert.gio, "remove", remove)
  with pytest.raises(KeyboardInterrupt):
    convert.convert("rxrx19a", tree, out, 8, num_shards=3, overwrite=True,
                    command="CMD-B")
  monkeypatch.setattr(convert.gio, "remove", real_remove)
  assert events[0] == schema.DATASET_INFO_FILE
  assert not os.path.exists(os.path.join(out, schema.DATASET_INFO_FILE))
  # Old shards, new command: refused, naming the command that completes it.
  _refused(out, "complete it with: CMD-B")
  s = convert.convert("rxrx19a", tree, out, 8, num_shards=3, command="CMD-B")
  assert s["skipped_shards"] == 0
  assert {r["image"].shape for r in _records(out).values()} == {(8, 8, 5)}


# --------------------------------------------------------------------------
# Zero sites converted.


def test_sources_smaller_than_resolution_refused_up_front(tree, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(ValueError) as e:
    convert.convert("rxrx19a", tree, str(out), 32, num_shards=2)
  msg = _one_line(e)
  assert "16x16 pixels, smaller than --resolution 32" in msg
  assert "--resolution 16 or less" in msg
  assert not out.exists()
  # 1-pixel LoadData images: refused before the intensity sampling.
  root = str(tmp_path / "px")
  csv_path = _loaddata_set(root, size=1)
  with pytest.raises(ValueError, match="1x1 pixels, smaller than "
                     "--resolution 8"):
    convert.convert("loaddata", csv_path, str(out), 8)
  assert not out.exists()


@pytest.mark.e2e
def test_no_site_converted_exits_1_without_shards(tree, tmp_path):
  root = _copy_tree(tree, tmp_path)
  # Every site loses channel 2 (the size probe reads channel 1 only).
  for dirpath, _, files in os.walk(os.path.join(root, "images")):
    for f in files:
      if f.endswith("_w2.png"):
        os.remove(os.path.join(dirpath, f))
  out = str(tmp_path / "out")
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.convert",
                      f"--input={root}", f"--output={out}", "--resolution=8",
                      "--num_shards=4"], capture_output=True, text=True,
                     timeout=300, check=False)
  assert r.returncode == 1, r.stderr[-2000:]
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith("gandl-convert: error: ") and "no site converted" in line
  assert "missing channel file w2" in line and "Traceback" not in r.stderr
  assert not [f for f in os.listdir(out) if f.endswith(".tfrecord")]
  assert not os.path.exists(os.path.join(out, schema.DATASET_INFO_FILE))
  errs = pd.read_csv(os.path.join(out, "errors.csv"))
  assert len(errs) == len(_metadata(root))


def test_tfds_build_smaller_sources_one_error(tree, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from gandl_jax.data import tfds_builder
  with pytest.raises(ValueError) as e:
    tfds_builder.build("rxrx19a", os.path.dirname(tree), str(tmp_path / "d"),
                       32)
  assert "smaller than --resolution 32" in _one_line(e)


# --------------------------------------------------------------------------
# Fault injection: SIGKILL at random points of gandl-convert.


def _reference(tree, out, resolution):
  """{site_id: (image bytes, disease_condition)} of a complete conversion."""
  convert.convert("rxrx19a", tree, out, resolution, num_shards=4)
  return {k: (v["image"].tobytes(), v["disease_condition"])
          for k, v in _records(out).items()}


def _check_after_kill(out, references, trial):
  """The directory is refused with one line, or reads as exactly one of the
  complete conversions in `references` (same sites, images and labels)."""
  try:
    got = _records(out)
  except FileNotFoundError as e:   # pipeline.IncompleteDataError
    msg = str(e)
    assert "\n" not in msg.strip() and out in msg, (trial, msg)
    return "refused"
  got = {k: (v["image"].tobytes(), v["disease_condition"])
         for k, v in got.items()}
  matches = [name for name, ref in references.items() if got == ref]
  assert len(matches) == 1, (trial, len(got), {
      name: len(set(got.items()) & set(ref.items()))
      for name, ref in references.items()})
  return matches[0]


def _shard_inodes(out):
  try:
    return {(f, os.stat(os.path.join(out, f)).st_ino) for f in os.listdir(out)
            if f.endswith(".tfrecord") and not f.startswith(".")}
  except FileNotFoundError:
    return set()


def _convert_and_kill(args, out, kill_at, rng, timeout=120):
  """Runs gandl-convert; SIGKILLs it when the `kill_at`-th shard file has
  been (re)written, or after a random delay when `kill_at` is None."""
  before = _shard_inodes(out)
  proc = subprocess.Popen(_CONVERT + args, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  start = time.time()
  delay = rng.uniform(2.0, 8.0)
  try:
    while proc.poll() is None and time.time() - start < timeout:
      if kill_at is None:
        if time.time() - start > delay:
          break
      elif len(_shard_inodes(out) - before) >= kill_at:
        break
      time.sleep(0.005)
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
  return proc.returncode


@pytest.mark.e2e
def test_sigkill_first_and_re_conversion_never_mixed(tree, tmp_path):
  rng = random.Random(23)
  root = _copy_tree(tree, tmp_path)
  df = _metadata(root).iloc[:64]         # 64 sites, 4 shards: quick runs
  df.to_csv(os.path.join(root, "metadata.csv"), index=False)
  os.makedirs(tmp_path / "relabel")
  relabel = _copy_tree(tree, tmp_path / "relabel")
  df["disease_condition"] = df.disease_condition.map(
      lambda c: "Mock" if c != "Mock" else "UV Inactivated SARS-CoV-2")
  df.to_csv(os.path.join(relabel, "metadata.csv"), index=False)
  refs = {"16": _reference(root, str(tmp_path / "ref16"), 16),
          "8": _reference(root, str(tmp_path / "ref8"), 8),
          "relabelled": _reference(relabel, str(tmp_path / "refrl"), 16)}
  base = ["--num_shards=4", "--workers=1"]
  outcomes = []
  # (a) first conversions: killed when the k-th shard appears, or after a
  # random delay.
  for trial, kill_at in enumerate([rng.randint(1, 4), None]):
    out = str(tmp_path / f"first{trial}")
    _convert_and_kill([f"--input={root}", f"--output={out}",
                       "--resolution=16"] + base, out, kill_at, rng)
    outcomes.append(_check_after_kill(out, refs, ("first", trial, kill_at)))
  # (b) re-conversions of a complete directory with --overwrite: another
  # resolution, or relabelled metadata.
  for trial, (kill_at, args) in enumerate([
      (rng.randint(1, 4), ["--resolution=8", f"--input={root}"]),
      (None, ["--resolution=16", f"--input={relabel}"])]):
    out = str(tmp_path / f"re{trial}")
    shutil.copytree(str(tmp_path / "ref16"), out)
    _convert_and_kill(args + [f"--output={out}", "--overwrite"] + base, out,
                      kill_at, rng)
    outcomes.append(_check_after_kill(out, refs, ("re", trial, kill_at)))
  # A killed re-conversion is completed by the command a reader names (or,
  # killed before it recorded anything, left the old conversion intact).
  out = str(tmp_path / "re1")
  command = ["--resolution=16", f"--input={relabel}", f"--output={out}",
             "--overwrite"] + base
  if outcomes[-1] == "refused":
    with pytest.raises(FileNotFoundError) as e:
      pipeline.read_dataset_info(out)
    named = str(e.value).split("complete it with: ", 1)[1]
    assert shlex.split(named) == ["gandl-convert"] + command
    command = shlex.split(named)[1:]
  r = subprocess.run(_CONVERT + command, capture_output=True, text=True,
                     timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert _check_after_kill(out, refs, "completed") == "relabelled"
  # The CLI refuses a changed input without --overwrite: one line, exit 1.
  r = subprocess.run(_CONVERT + [f"--input={root}", f"--output={out}",
                                 "--resolution=16"] + base, capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.returncode == 1
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith(f"gandl-convert: error: {out} holds another "
                         "conversion (metadata rows changed: ")
  assert "pass --overwrite" in line and "Traceback" not in r.stderr
  print("outcomes", outcomes)
