"""gandl-convert --dataset loaddata: any Cell Painting set from CellProfiler
LoadData CSVs (16-bit TIFF and 8-bit PNG planes, per-channel percentile
rescaling to 8 bits), bad input, and convert -> train -> export -> evaluate.

Images are tiny (16x16) and written on the fly; the expected 8-bit values
are computed here in numpy from the percentiles dataset_info.json records.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gandl_jax.data import convert
from gandl_jax.data import imagefile
from gandl_jax.data import loaddata
from gandl_jax.data import pipeline
from gandl_jax import schema

SIZE = 16
CHANNELS = schema.JUMP_CHANNELS
PLATES = ("BR00116991", "BR00116992")
# Per plate: 4 DMSO wells and 4 compounds x 2 wells; 2 sites per well.
WELLS = [f"{r}{c:02d}" for r in "AB" for c in range(1, 7)]
TREATMENT = {w: ("DMSO" if i < 4 else f"JCP2022_{(i - 4) // 2:06d}")
             for i, w in enumerate(WELLS)}
SITES = (1, 2)


def _image(rng, ch, treatment, bits):
  """A 16x16 plane: gamma noise around a channel level; compounds 1 and 2
  brighten channels 1 and 3 (a phenotype for the retrieval metrics)."""
  level = 400.0 * (ch + 1)
  if treatment.endswith("1") and ch == 1 or treatment.endswith("2") and ch == 3:
    level *= 3
  x = rng.gamma(4.0, level / 4.0, size=(SIZE, SIZE))
  if bits == 8:
    return np.clip(x / 32.0, 0, 255).astype(np.uint8)
  return np.clip(x, 0, 65535).astype(np.uint16)


def _write(path, a, fmt):
  Image.fromarray(a).save(path, format=fmt)


def make_set(root, bits=16, fmt="TIFF", relative_plate=True, seed=0):
  """A JUMP-like plate layout: images/{plate}/ + load_data.csv; returns
  (csv path, {site_id: (C, H, W) raw array})."""
  rng = np.random.default_rng(seed)
  ext = "tiff" if fmt == "TIFF" else "png"
  rows, raw = [], {}
  for p, plate in enumerate(PLATES):
    d = os.path.join(root, "images", plate)
    os.makedirs(d, exist_ok=True)
    for i, well in enumerate(WELLS):
      for site in SITES:
        row = {"Metadata_Source": "source_4", "Metadata_Batch": "2021_04_26",
               "Metadata_Plate": plate, "Metadata_Well": well,
               "Metadata_Site": str(site)}
        planes = []
        for c, ch in enumerate(CHANNELS):
          a = _image(rng, c, TREATMENT[well], bits)
          name = f"r{i:02d}c01f{site:02d}p01-ch{c + 1}sk1fk1fl1.{ext}"
          _write(os.path.join(d, name), a, fmt)
          planes.append(a)
          row[f"FileName_{ch}"] = name
          # Plate 2 by a path relative to the CSV's directory.
          row[f"PathName_{ch}"] = (f"images/{plate}" if relative_plate and p
                                   else d)
        row["Metadata_JCP2022"] = TREATMENT[well]
        row["Metadata_pert_type"] = ("control" if TREATMENT[well] == "DMSO"
                                     else "trt")
        rows.append(row)
        raw[f"{plate}_{well}_{site}"] = np.stack(planes)
  path = os.path.join(root, "load_data.csv")
  pd.DataFrame(rows).to_csv(path, index=False)
  return path, raw


def _records(shards):
  it, _ = pipeline.eval_host_batches(shards, host_batch=16)
  out = {}
  for b in it:
    for i in np.nonzero(b["valid"])[0]:
      r = {k: v[i] for k, v in b.items()}
      out[r["site_id"]] = r
  return out


def _expected(raw, windows, resolution):
  """Independent reference: rescale each channel's window to 0..255 in
  float64, k x k block means, round half up."""
  out = []
  for a, (low, high) in zip(raw, windows):
    x = np.clip((a.astype(np.float64) - low) / (high - low), 0, 1) * 255
    k = a.shape[0] // resolution
    x = x.reshape(resolution, k, resolution, k).mean(axis=(1, 3))
    out.append(np.floor(x + 0.5))
  return np.stack(out, -1).astype(np.uint8)


@pytest.fixture(scope="module")
def tiff_set(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("loaddata"))
  return make_set(root)


@pytest.mark.parametrize("resolution", [16, 8])
def test_16bit_tiff_round_trip_with_recorded_percentiles(tiff_set, tmp_path,
                                                         resolution):
  csv_path, raw = tiff_set
  out = str(tmp_path / "shards")
  summary = convert.convert("loaddata", csv_path, out, resolution,
                            num_shards=3, intensity_sample=10,
                            intensity_seed=3)
  assert summary["num_examples"] == len(raw) and summary["num_failed"] == 0
  info = pipeline.read_dataset_info(out)
  assert info["dataset"] == "loaddata" and info["num_channels"] == 5
  assert [c["name"] for c in info["channels"]] == list(CHANNELS)
  assert info["channels"][0]["stain"] == "Hoechst 33342"
  assert info["image"]["shape"] == [resolution, resolution, 5]
  assert info["source_size"] == [SIZE, SIZE] and info["crop"] == "none"
  assert info["columns"] == {
      "site_id": "bytes", "well_id": "bytes", "plate": "bytes",
      "well": "bytes", "site": "int64", "Metadata_Source": "bytes",
      "Metadata_Batch": "bytes", "Metadata_JCP2022": "bytes",
      "Metadata_pert_type": "bytes"}
  it = info["intensity"]
  assert it["method"] == "percentile clip"
  assert it["percentiles"] == [0.1, 99.9]
  # The sample: 10 of the CSV's rows drawn with seed 3.
  ids = list(raw)
  pick = np.sort(np.random.default_rng(3).choice(len(ids), 10, replace=False))
  assert it["sampled_site_ids"] == [ids[i] for i in pick]
  windows = []
  for c, rec in enumerate(it["channels"]):
    pooled = np.concatenate([raw[s][c].ravel() for s in it["sampled_site_ids"]])
    assert rec["name"] == CHANNELS[c] and rec["bit_depth"] == 16
    np.testing.assert_allclose([rec["low"], rec["high"]],
                               np.percentile(pooled, [0.1, 99.9]), rtol=1e-12)
    windows.append((rec["low"], rec["high"]))
  got = _records(out)
  assert sorted(got) == sorted(raw)
  clipped = 0
  for sid, r in got.items():
    want = _expected(raw[sid], windows, resolution)
    np.testing.assert_array_equal(r["image"], want)
    clipped += int((want == 255).sum())
    plate, well, site = sid.rsplit("_", 2)
    assert (r["plate"], r["well"], r["site"]) == (plate, well, int(site))
    assert r["well_id"] == f"{plate}_{well}"
    assert r["Metadata_JCP2022"] == TREATMENT[well]
    assert r["Metadata_Source"] == "source_4"
  if resolution == SIZE:
    assert clipped > 0      # the top 0.1 % is clipped, not wrapped
  sites = pd.read_csv(os.path.join(out, "sites.csv"), dtype=str)
  assert list(sites.columns) == ["shard", "position"] + list(info["columns"])
  assert "_files" not in sites.columns


def test_8bit_png_full_range_is_identity_and_percentiles_rescale(tmp_path):
  csv_path, raw = make_set(str(tmp_path / "png"), bits=8, fmt="PNG")
  out = str(tmp_path / "full")
  convert.convert("loaddata", csv_path, out, SIZE, num_shards=2,
                  clip_percentiles=None)
  info = pipeline.read_dataset_info(out)
  assert info["intensity"]["method"] == "full bit-depth range"
  assert [(c["low"], c["high"], c["bit_depth"])
          for c in info["intensity"]["channels"]] == [(0.0, 255.0, 8)] * 5
  for sid, r in _records(out).items():
    np.testing.assert_array_equal(r["image"], np.moveaxis(raw[sid], 0, -1))

  out = str(tmp_path / "clip")
  convert.convert("loaddata", csv_path, out, 8, num_shards=2,
                  clip_percentiles=(1.0, 99.0), channels=["OrigMito", "OrigDNA"])
  info = pipeline.read_dataset_info(out)
  assert [c["name"] for c in info["channels"]] == ["OrigMito", "OrigDNA"]
  windows = [(c["low"], c["high"]) for c in info["intensity"]["channels"]]
  assert all(0 < lo < hi < 255 for lo, hi in windows)
  for sid, r in _records(out).items():
    np.testing.assert_array_equal(r["image"],
                                  _expected(raw[sid][[4, 0]], windows, 8))


def test_percentile_from_histogram_equals_numpy():
  rng = np.random.default_rng(1)
  for values in (rng.integers(0, 65536, 1001), rng.integers(0, 4, 7),
                 np.array([5]), rng.poisson(3.0, 10000)):
    hist = np.bincount(values, minlength=loaddata.HIST_BINS)
    for q in (0.0, 0.1, 1.0, 37.3, 50.0, 99.9, 100.0):
      assert loaddata.histogram_percentile(hist, q) == pytest.approx(
          np.percentile(values, q), rel=1e-12, abs=1e-9)


def test_multipage_tiff_pages_named_by_frame_columns(tmp_path):
  """16-bit multi-page TIFF: one file holds two channels, Frame_ picks the
  page; without a Frame_ column the site is refused."""
  rng = np.random.default_rng(2)
  pages = [rng.integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
           for _ in range(2)]
  ims = [Image.fromarray(p) for p in pages]
  ims[0].save(tmp_path / "stack.tiff", save_all=True, append_images=ims[1:])
  rows = [dict(Metadata_Plate="P1", Metadata_Well="A01", Metadata_Site=1,
               FileName_DNA="stack.tiff", PathName_DNA=".", Frame_DNA=0,
               FileName_ER="stack.tiff", PathName_ER=".", Frame_ER=1),
          dict(Metadata_Plate="P1", Metadata_Well="A02", Metadata_Site=1,
               FileName_DNA="stack.tiff", PathName_DNA=".", Frame_DNA="",
               FileName_ER="stack.tiff", PathName_ER=".", Frame_ER=1)]
  pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
  out = str(tmp_path / "out")
  s = convert.convert("loaddata", str(tmp_path / "ld.csv"), out, SIZE,
                      clip_percentiles=None)
  assert s["num_examples"] == 1 and s["num_failed"] == 1
  info = pipeline.read_dataset_info(out)
  assert [c["stain"] for c in info["channels"]] == ["DNA", "ER"]
  (r,) = _records(out).values()
  want = np.floor(np.stack(pages, -1).astype(np.float64) * 255 / 65535 + 0.5)
  np.testing.assert_array_equal(r["image"], want.astype(np.uint8))
  err = pd.read_csv(os.path.join(out, "errors.csv"), dtype=str)
  assert err.site_id.tolist() == ["P1_A02_1"]
  assert "2 pages" in err.reason[0] and "Frame_DNA" in err.reason[0]


def _cli(args):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, "-m", "gandl_jax.cli.convert"] + args,
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.e2e
def test_bad_sites_listed_in_errors_csv_rest_converted(tmp_path):
  csv_path, raw = make_set(str(tmp_path / "set"))
  df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
  first = df.iloc[0]
  # 1: one channel file missing; 2: every file missing; 3: an empty
  # FileName_ cell; 4: an empty PathName_ cell; 5: channels of two sizes.
  os.remove(os.path.join(first.PathName_OrigER, first.FileName_OrigER))
  df.loc[1, "FileName_OrigDNA"] = "nope.tiff"
  for ch in CHANNELS:
    df.loc[2, f"FileName_{ch}"] = f"gone_{ch}.tiff"
  df.loc[3, "FileName_OrigRNA"] = ""
  df.loc[4, "PathName_OrigMito"] = ""
  big = os.path.join(df.PathName_OrigAGP[5], df.FileName_OrigAGP[5])
  _write(big, np.zeros((2 * SIZE, 2 * SIZE), np.uint16), "TIFF")
  # 6: a repeated site.
  df = pd.concat([df, df.iloc[[6]]], ignore_index=True)
  df.to_csv(csv_path, index=False)
  out = str(tmp_path / "out")
  r = _cli(["--dataset=loaddata", f"--input={csv_path}", f"--output={out}",
            f"--resolution={SIZE}", "--num_shards=2", "--workers=2"])
  assert r.returncode == 3, r.stderr[-2000:]
  assert f"converted {len(raw) - 6} sites" in r.stdout
  assert "7 failed" in r.stdout and "errors.csv" in r.stdout
  err = pd.read_csv(os.path.join(out, "errors.csv"), dtype=str,
                    keep_default_na=False)
  assert len(err) == 7
  by = {}
  for row in err.to_dict("records"):
    by.setdefault(row["site_id"], []).append(row)
  sid = [f"{df.Metadata_Plate[i]}_{df.Metadata_Well[i]}_{df.Metadata_Site[i]}"
         for i in range(7)]
  assert by[sid[0]][0]["reason"] == "missing channel file OrigER"
  assert by[sid[0]][0]["path"].endswith(first.FileName_OrigER)
  assert by[sid[1]][0]["reason"] == "missing channel file OrigDNA"
  assert by[sid[1]][0]["path"].endswith("nope.tiff")
  assert "no image files" in by[sid[2]][0]["reason"]
  assert by[sid[3]][0]["reason"] == "FileName_OrigRNA is empty"
  assert by[sid[3]][0]["path"] == f"{csv_path} (row 5)"
  assert by[sid[4]][0]["reason"] == "PathName_OrigMito is empty"
  assert "channels of different sizes" in by[sid[5]][0]["reason"]
  assert by[sid[5]][0]["path"] == big
  assert "duplicate" in by[sid[6]][0]["reason"]
  sites = pd.read_csv(os.path.join(out, "sites.csv"), dtype=str)
  assert len(sites) == len(raw) - 6 and not set(sites.site_id) & set(sid[:6])
  # Every usable row was sampled (64 > 48); unreadable ones are skipped.
  it = pipeline.read_dataset_info(out)["intensity"]
  assert set(it["skipped_site_ids"]) == {sid[0], sid[1], sid[2], sid[5]}
  assert it["sample_sites"] == len(raw) - 2 - 4   # 2 rows refused, 4 unreadable


@pytest.mark.parametrize("drop,missing", [
    ([f"FileName_{c}" for c in CHANNELS], "FileName_<channel>"),
    (["Metadata_Well"], "Metadata_Well"),
    (["Metadata_Plate", "Metadata_Well"], "Metadata_Plate"),
])
def test_csv_without_channel_or_key_columns_is_refused(tiff_set, tmp_path,
                                                       drop, missing):
  csv_path, _ = tiff_set
  df = pd.read_csv(csv_path, dtype=str).drop(columns=drop)
  bad = str(tmp_path / "bad.csv")
  df.to_csv(bad, index=False)
  out = tmp_path / "out"
  with pytest.raises(imagefile.MetadataError) as e:
    convert.convert("loaddata", bad, str(out), 8)
  msg = str(e.value)
  assert msg.startswith(f"{bad}: not a LoadData CSV, missing column(s): ")
  assert missing in msg and "\n" not in msg
  if len(drop) == 2:
    assert "Metadata_Well" in msg        # both named
  assert not out.exists()


@pytest.mark.e2e
def test_cli_refusal_is_one_line_with_exit_status_1(tiff_set, tmp_path):
  csv_path, _ = tiff_set
  df = pd.read_csv(csv_path, dtype=str).drop(
      columns=[f"FileName_{c}" for c in CHANNELS])
  bad = str(tmp_path / "bad.csv")
  df.to_csv(bad, index=False)
  out = tmp_path / "out"
  r = _cli(["--dataset=loaddata", f"--input={bad},{tmp_path / 'none.csv'}",
            f"--output={out}", "--resolution=8"])
  assert r.returncode == 1
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith(f"gandl-convert: error: {bad}: not a LoadData CSV, "
                         "missing column(s): FileName_<channel>")
  assert not out.exists()
  with pytest.raises(imagefile.MetadataError, match="none.csv: LoadData CSV not "
                     "found"):
    convert.convert("loaddata", str(tmp_path / "none.csv"), str(out), 8)


@pytest.mark.e2e
def test_jump_like_set_trains_exports_and_evaluates(tiff_set, tmp_path):
  """A 5-channel Cell Painting set through gandl-convert, a short training
  in tiny.train_config (the programs other tests compile, cached),
  gandl-export and gandl-evaluate (retrieval metrics on the carried
  Metadata_JCP2022 / Metadata_pert_type columns); a 4-channel set is
  refused by the same config with a message naming the fix."""
  import jax
  from gandl_jax import sharding
  from gandl_jax.train import loop
  from tiny import tiny_config, train_config

  csv_path, raw = tiff_set
  shards = str(tmp_path / "shards")
  convert.convert("loaddata", csv_path, shards, 8, num_shards=2,
                  channels=list(CHANNELS))
  cfg = train_config(shards, **{"data.shuffle_buffer": 64})
  assert cfg.model.img_channels == 5
  mesh = sharding.make_mesh(jax.devices()[:1])
  workdir = str(tmp_path / "run")
  loop.train(cfg, workdir, mesh=mesh)
  # The sample grids are composites of the Cell Painting channels.
  assert any(n.startswith("fakes-") and n.endswith(".png")
             for n in os.listdir(os.path.join(workdir, "samples")))
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  emb = str(tmp_path / "emb.parquet")
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.export",
                      f"--workdir={workdir}", f"--data={shards}",
                      f"--output={emb}", "--batch=8"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  df = pd.read_parquet(emb)
  assert len(df) == len(raw) and set(df.site_id) == set(raw)
  assert {"plate", "well", "site", "Metadata_JCP2022"} <= set(df.columns)
  out = tmp_path / "eval"
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.evaluate",
                      f"--embeddings={emb}", f"--output={out}",
                      "--tasks=activity,replicates", "--normalization=none"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((out / "metrics.json").read_text())
  e = m["embeddings"]["embeddings"]
  assert e["activity"]["status"] == "ok", e["activity"]
  a = e["activity"]
  # Well profiles: 4 compounds x 2 wells x 2 plates against 8 DMSO wells
  # (Metadata_JCP2022 read as the treatment, Metadata_pert_type control as
  # the negative control).
  assert (a["n_compound_doses"], a["n_perturbation_profiles"],
          a["n_reference_profiles"]) == (4, 16, 8), a
  assert np.isfinite(a["mean_map"])
  assert e["replicates"]["status"] == "ok", e["replicates"]
  # Known value: features that are a one-hot code of the compound (DMSO its
  # own code) put every replicate above every control, so the activity mAP
  # on the carried metadata is exactly 1.
  feats = [c for c in df.columns if c.startswith("f") and c[1:].isdigit()]
  codes = {c: i for i, c in enumerate(sorted(set(df.Metadata_JCP2022)))}
  onehot = np.eye(len(codes), dtype=np.float32)[df.Metadata_JCP2022.map(codes)]
  known = df.drop(columns=feats).assign(
      **{f"f{i:04d}": onehot[:, i] for i in range(len(codes))})
  known_path = str(tmp_path / "onehot.parquet")
  known.to_parquet(known_path)
  out2 = tmp_path / "eval_onehot"
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.evaluate",
                      f"--embeddings={known_path}", f"--output={out2}",
                      "--tasks=activity", "--normalization=none"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  a2 = json.loads((out2 / "metrics.json").read_text())[
      "embeddings"]["embeddings"]["activity"]
  assert a2["status"] == "ok", a2
  assert a2["n_perturbation_profiles"] == 16
  assert a2["mean_map"] == pytest.approx(1.0)

  # The paper's configs take the set as it is (channel count and stains).
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "gandl_rxrx19a", os.path.join(os.path.dirname(__file__), "..", "..",
                                    "configs", "gandl_rxrx19a.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  paper = mod.get_config("256")
  pipeline.check_dataset(pipeline.read_dataset_info(shards), shards, None,
                         paper.model.img_channels)

  # Four channels: the 5-channel config says what to change.
  four = str(tmp_path / "four")
  convert.convert("loaddata", csv_path, four, 8, num_shards=2,
                  channels=list(CHANNELS[:4]))
  with pytest.raises(ValueError, match=r"4 channels but config.model "
                     r"expects 5 .*img_channels 4"):
    loop.train(tiny_config(four), str(tmp_path / "run4"), mesh=mesh)


def test_previews_of_cell_painting_and_other_channel_sets():
  """The training grids colour JUMP's channels by stain (DNA blue, ER and
  RNA green, AGP red) and show other channel sets in grey."""
  from gandl_jax import images
  info = [dict(index=i + 1, name=n) for i, n in enumerate(CHANNELS)]
  ch = images.dataset_channels(info)
  x = np.zeros((1, 2, 2, 5), np.uint8)
  x[..., 0] = 200          # OrigDNA
  x[..., 3] = 100          # OrigAGP
  rgb = images.preview_rgb(x, ch)
  assert rgb[0, 0, 0].tolist() == [100, 0, 200]
  four = images.preview_rgb(np.full((1, 2, 2, 4), 8, np.uint8),
                            images.dataset_channels(info[:4]))
  assert four.shape == (1, 2, 2, 3)
  grey = images.preview_rgb(np.arange(12, dtype=np.uint8).reshape(1, 1, 4, 3),
                            images.dataset_channels(
                                [dict(index=i + 1, name=f"c{i}") for i in range(3)]))
  assert grey[0, 0, :, 0].tolist() == [1, 4, 7, 10]


@pytest.mark.parametrize("fmt,kw,mode", [
    ("PNG", {}, None), ("TIFF", {}, None),
    ("TIFF", {"compression": "tiff_lzw"}, None),
    ("TIFF", {"compression": "tiff_adobe_deflate"}, None),
    ("TIFF", {}, "I;16B"),
])
def test_decode_16bit_png_and_tiff_variants(fmt, kw, mode):
  import io
  a = np.random.default_rng(0).integers(0, 65536, (5, 7)).astype(np.uint16)
  im = (Image.frombytes(mode, (7, 5), a.astype(">u2").tobytes()) if mode
        else Image.fromarray(a))
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  x, bits = loaddata.decode_plane(buf.getvalue(), "f")
  assert bits == 16 and x.dtype == np.uint16
  np.testing.assert_array_equal(x, a)
  buf = io.BytesIO()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format=fmt)
  with pytest.raises(imagefile.SiteError, match="8- or 16-bit grayscale.*RGB"):
    loaddata.decode_plane(buf.getvalue(), "f")
