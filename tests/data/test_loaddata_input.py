"""gandl-convert --dataset loaddata on input that must be refused, confined
or named: ambiguous site ids, paths leaving the image root, files larger
than their header declares, s3:// paths without --path_map, mixed bit
depths and constant channels, and malformed CSVs and flags.

Sets are a few 8x8 planes written on the fly; the expected values are
computed here in numpy.
"""
import logging
import os
import struct
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
from gandl_jax.evaluate import io as eval_io
from gandl_jax import schema

SIZE = 8
CHANNELS = ("DNA", "Mito")


def _noise(seed, bits=16):
  x = np.random.default_rng(seed).integers(100, 4000, (SIZE, SIZE))
  return (x // 16).astype(np.uint8) if bits == 8 else x.astype(np.uint16)


def _plane(d, name, a, fmt="TIFF"):
  os.makedirs(d, exist_ok=True)
  Image.fromarray(a).save(os.path.join(d, name), format=fmt)
  return name


def _row(plate, well, site, files):
  """files: {channel: (PathName, FileName)}."""
  r = {"Metadata_Plate": plate, "Metadata_Well": well,
       "Metadata_Site": str(site)}
  for ch, (d, name) in files.items():
    r[f"FileName_{ch}"], r[f"PathName_{ch}"] = name, d
  return r


def _sites(root, n, seed=0, bits=16, plate="P1"):
  """n ordinary sites under root/images, one row each (wells A01...)."""
  rows = []
  d = os.path.join(root, "images")
  ext, fmt = ("png", "PNG") if bits == 8 else ("tiff", "TIFF")
  for i in range(n):
    files = {ch: ("images", _plane(d, f"{plate}_s{i}_{ch}.{ext}",
                                   _noise(seed * 100 + 10 * i + c, bits), fmt))
             for c, ch in enumerate(CHANNELS)}
    rows.append(_row(plate, f"A{i + 1:02d}", 1, files))
  return rows


def _csv(root, rows):
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "load_data.csv")
  pd.DataFrame(rows).to_csv(path, index=False)
  return path


def _errors(out):
  return pd.read_csv(os.path.join(out, convert.ERRORS_FILE), dtype=str,
                     keep_default_na=False)


def _convert(csv_path, out, **kw):
  return convert.convert("loaddata", csv_path, str(out), SIZE, num_shards=1,
                         **kw)


# 7. Site ids.

def test_site_ids_are_unambiguous_for_any_plate_and_well_names(tmp_path):
  # BR_X / A01 and BR / X_A01 used to give the same BR_X_A01_1.
  assert schema.loaddata_site_id("BR_X", "A01", 1) == "BR%5FX_A01_1"
  assert schema.loaddata_site_id("BR", "X_A01", 1) == "BR_X%5FA01_1"
  assert schema.loaddata_site_id("5%", "A01", 1) == "5%25_A01_1"
  assert schema.loaddata_well_id("BR_X", "A01") == "BR%5FX_A01"
  # RxRx19a / RxRx1 ids (no "_" or "%" in a field) are Recursion's exactly.
  assert schema.site_id("HRCE-1", 1, "AA02", 3) == "HRCE-1_1_AA02_3"
  assert schema.well_id("U2OS-03", 4, "B02") == "U2OS-03_4_B02"
  for fields in (["BR_X", "A01", "1"], ["BR", "X_A01", "1"], ["a%5Fb", "%", "_"],
                 ["%25", "__", "x"]):
    assert schema.split_id(schema.join_id(*fields)) == fields
  # The evaluation reader decodes what it parses back from an RxRx-style id.
  parsed = eval_io._parse_site_ids(pd.Series(
      [schema.site_id("EXP_A", 2, "B_03", 4)]))
  assert parsed.iloc[0][["experiment", "plate", "well", "site"]].tolist() == [
      "EXP_A", 2, "B_03", 4]
  assert parsed.well_id.iloc[0] == schema.well_id("EXP_A", 2, "B_03")

  root = str(tmp_path)
  d = os.path.join(root, "images")
  rows = []
  for plate, well in (("BR_X", "A01"), ("BR", "X_A01")):
    files = {ch: ("images", _plane(d, f"{plate}-{well}-{ch}.tiff",
                                   _noise(len(rows) * 2 + c)))
             for c, ch in enumerate(CHANNELS)}
    rows.append(_row(plate, well, 1, files))
  out = tmp_path / "out"
  s = _convert(_csv(root, rows), out)
  assert s["num_examples"] == 2 and s["num_failed"] == 0
  recs = {}
  it, _ = pipeline.eval_host_batches(str(out), host_batch=2)
  for b in it:
    for i in np.nonzero(b["valid"])[0]:
      recs[b["site_id"][i]] = (b["plate"][i], b["well"][i])
  assert recs == {"BR%5FX_A01_1": ("BR_X", "A01"),
                  "BR_X%5FA01_1": ("BR", "X_A01")}


# 8. Confinement and bounded reads.

def test_paths_leaving_the_image_root_are_refused_per_row(tmp_path):
  root = str(tmp_path / "set")
  rows = _sites(root, 2)
  outside = str(tmp_path / "elsewhere")
  for ch in CHANNELS:
    _plane(outside, f"o_{ch}.tiff", _noise(7))
  # ../ in PathName, ../ in FileName, an absolute path elsewhere, and a
  # symlink inside the root pointing out of it.
  rows.append(_row("P1", "B01", 1, {ch: ("../elsewhere", f"o_{ch}.tiff")
                                    for ch in CHANNELS}))
  rows.append(_row("P1", "B02", 1, {ch: ("images", f"../../elsewhere/o_{ch}.tiff")
                                    for ch in CHANNELS}))
  rows.append(_row("P1", "B03", 1, {ch: (outside, f"o_{ch}.tiff")
                                    for ch in CHANNELS}))
  for ch in CHANNELS:
    os.symlink(os.path.join(outside, f"o_{ch}.tiff"),
               os.path.join(root, "images", f"link_{ch}.tiff"))
  rows.append(_row("P1", "B04", 1, {ch: ("images", f"link_{ch}.tiff")
                                    for ch in CHANNELS}))
  # A path that goes down and up again but stays inside is fine.
  rows.append(_row("P1", "B05", 1, {ch: ("images/../images",
                                         rows[0][f"FileName_{ch}"])
                                    for ch in CHANNELS}))
  csv_path = _csv(root, rows)
  out = tmp_path / "out"
  s = _convert(csv_path, out)
  assert s["num_examples"] == 3 and s["num_failed"] == 4
  err = _errors(out).set_index("site_id")
  for well in ("B01", "B02", "B03"):
    reason = err.loc[f"P1_{well}_1", "reason"]
    assert "outside the image root" in reason, reason
    assert "--image_root" in reason and "--allow_outside_root" in reason
    assert err.loc[f"P1_{well}_1", "path"].startswith(csv_path)
  link = err.loc["P1_B04_1"]
  assert "resolves to" in link.reason and "outside the image root" in link.reason
  assert link.path.endswith("link_DNA.tiff")

  # An explicit root holding both trees, or --allow_outside_root: all read.
  for i, kw in enumerate((dict(image_root=str(tmp_path)),
                          dict(allow_outside_root=True))):
    out2 = tmp_path / f"out{i}"
    s = _convert(csv_path, out2, **kw)
    assert s["num_examples"] == 7 and s["num_failed"] == 0, _errors(out2)


def _tiff_bytes(a, signed=False):
  """A one-strip little-endian 16-bit TIFF (SampleFormat 2 when `signed`),
  written by hand: PIL cannot write signed 16-bit samples."""
  h, w = a.shape
  data = a.astype("<i2" if signed else "<u2").tobytes()
  tags = [(256, 3, w), (257, 3, h), (258, 3, 16), (259, 3, 1), (262, 3, 1),
          (273, 4, 0), (277, 3, 1), (278, 3, h), (279, 4, len(data)),
          (339, 3, 2 if signed else 1)]
  offset = 8 + 2 + 12 * len(tags) + 4
  ifd = struct.pack("<H", len(tags))
  for tag, typ, val in tags:
    val = offset if tag == 273 else val
    ifd += struct.pack("<HHI", tag, typ, 1) + (
        struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
  return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + data


def test_file_larger_than_its_header_declares_is_refused_unread(tmp_path,
                                                               monkeypatch):
  root = str(tmp_path)
  rows = _sites(root, 3)
  big = os.path.join(root, "images", rows[1]["FileName_Mito"])
  with open(big, "r+b") as f:     # a valid 8x8 TIFF, then 1 GiB (sparse)
    f.truncate(2**30)
  read = []
  real_open = imagefile.open_image_file

  class Counting:
    def __init__(self, f):
      self._f = f

    def read(self, n=-1):
      b = self._f.read(n)
      read.append(len(b))
      return b

    def __getattr__(self, name):
      if name == "fileno":
        raise AttributeError(name)
      return getattr(self._f, name)

  import contextlib

  @contextlib.contextmanager
  def counting_open(path, what="a PNG file"):
    with real_open(path, what) as (f, size):
      yield Counting(f), size

  monkeypatch.setattr(loaddata, "open_image_file", counting_open)
  out = tmp_path / "out"
  s = _convert(_csv(root, rows), out)
  assert s["num_examples"] == 2 and s["num_failed"] == 1
  err = _errors(out)
  assert err.site_id.tolist() == ["P1_A02_1"] and err.path[0] == big
  assert f"the file is {2**30} bytes" in err.reason[0]
  assert "refused without reading it" in err.reason[0]
  assert max(read) < 2**20, max(read)     # never read whole
  # The bound: raw samples + 1/8 + slack; an 8x8 16-bit plane is far below.
  assert loaddata.plane_file_bound(SIZE, SIZE, 2) == (
      SIZE * (2 * SIZE + 1) * 9 // 8 + loaddata.PLANE_SLACK_BYTES)


# 9. Paths no one can read here.

def test_unmapped_s3_rows_are_error_rows_after_one_path_map_hint(tmp_path,
                                                                caplog):
  root = str(tmp_path)
  rows = _sites(root, 2)
  for w in ("C01", "C02"):
    rows.append(_row("P1", w, 1, {
        ch: ("s3://cellpainting-gallery/cpg0016-jump/source_4/images",
             f"{w}_{ch}.tiff") for ch in CHANNELS}))
  csv_path = _csv(root, rows)
  out = tmp_path / "out"
  with caplog.at_level(logging.WARNING):
    s = _convert(csv_path, out)
  assert s["num_examples"] == 2 and s["num_failed"] == 2
  hints = [r.getMessage() for r in caplog.records
           if "--path_map" in r.getMessage()]
  assert len(hints) == 1, hints
  assert hints[0].startswith("2 of 4 rows point at s3://cellpainting-gallery/")
  assert "--path_map s3://cellpainting-gallery/=/local/dir/" in hints[0]
  err = _errors(out)
  assert err.site_id.tolist() == ["P1_C01_1", "P1_C02_1"]
  assert all("--path_map s3://cellpainting-gallery/=" in r for r in err.reason)
  # Only such rows: one line naming the flag, nothing written.
  only = _csv(str(tmp_path / "s3only"), rows[2:])
  with pytest.raises(imagefile.MetadataError, match="no usable rows.*--path_map "
                     "s3://cellpainting-gallery/=/local/dir/"):
    _convert(only, tmp_path / "out2")
  assert not (tmp_path / "out2").exists()
  # Mapped to a local copy, they are read.
  local = str(tmp_path / "copy")
  for w in ("C01", "C02"):
    for c, ch in enumerate(CHANNELS):
      _plane(os.path.join(local, "source_4", "images"), f"{w}_{ch}.tiff",
             _noise(50 + c))
  s = _convert(csv_path, tmp_path / "out3", path_map=(
      ("s3://cellpainting-gallery/cpg0016-jump/", local + "/"),))
  assert s["num_examples"] == 4 and s["num_failed"] == 0


def test_unreadable_remote_file_is_a_site_error_not_an_abort():
  # What an unmapped scheme would meet at read time (tf's
  # UnimplementedError), as one site's error.
  with pytest.raises(imagefile.SiteError, match="cannot read the image file "
                     r"\(UnimplementedError"):
    imagefile.read_image_file("s3://bucket/x.tiff")


# 10. Bit depths and constant channels.

def test_mixed_bit_depths_within_a_channel_are_refused(tmp_path):
  root = str(tmp_path)
  rows = _sites(root, 2)
  d = os.path.join(root, "images")
  eight = _plane(d, "eight_DNA.png", _noise(9, bits=8), "PNG")
  rows.append(_row("P1", "B01", 1, {"DNA": ("images", eight),
                                    "Mito": ("images", rows[0]["FileName_Mito"])}))
  csv_path = _csv(root, rows)
  with pytest.raises(imagefile.MetadataError) as e:
    _convert(csv_path, tmp_path / "out")
  msg = str(e.value)
  assert msg.startswith("channel DNA mixes bit depths: ") and "\n" not in msg
  assert f"{os.path.join(d, eight)} is 8-bit" in msg
  assert f"{os.path.join(d, rows[0]['FileName_DNA'])} is 16-bit" in msg
  assert not (tmp_path / "out").exists()
  # Not sampled (1 site sampled: row 1), the 8-bit plane fails its own site.
  s = _convert(csv_path, tmp_path / "out2", intensity_sample=1,
               intensity_seed=1)
  err = _errors(tmp_path / "out2")
  assert s["num_failed"] == 1 and err.site_id.tolist() == ["P1_B01_1"]
  assert err.reason[0].startswith("DNA is a 8-bit plane in a 16-bit channel")
  assert err.path[0] == os.path.join(d, eight)


@pytest.mark.parametrize("clip", [(0.1, 99.9), None])
def test_constant_channels_keep_their_value_on_the_full_range(tmp_path, clip,
                                                              caplog):
  root = str(tmp_path)
  d = os.path.join(root, "images")
  rows = []
  for i, value in enumerate((65535, 65535, 65535)):
    files = {"DNA": ("images", _plane(d, f"s{i}_DNA.tiff", _noise(i))),
             "Mito": ("images", _plane(d, f"s{i}_Mito.tiff",
                                       np.full((SIZE, SIZE), value, np.uint16))),
             "Zero": ("images", _plane(d, f"s{i}_Zero.tiff",
                                       np.zeros((SIZE, SIZE), np.uint16))),
             "Mid": ("images", _plane(d, f"s{i}_Mid.tiff",
                                      np.full((SIZE, SIZE), 1000, np.uint16)))}
    rows.append(_row("P1", f"A{i + 1:02d}", 1, files))
  out = tmp_path / "out"
  with caplog.at_level(logging.WARNING):
    s = _convert(_csv(root, rows), out, clip_percentiles=clip)
  assert s["num_examples"] == 3 and s["num_failed"] == 0
  info = pipeline.read_dataset_info(str(out))
  win = {c["name"]: (c["low"], c["high"]) for c in info["intensity"]["channels"]}
  assert win["Mito"] == win["Zero"] == win["Mid"] == (0.0, 65535.0)
  if clip is not None:
    assert win["DNA"][1] > win["DNA"][0] > 0
    warned = " ".join(r.getMessage() for r in caplog.records)
    for ch in ("Mito", "Zero", "Mid"):
      assert f"channel {ch}: the 0.1 and 99.9 percentiles are both" in warned
  it, _ = pipeline.eval_host_batches(str(out), host_batch=4)
  b = next(iter(it))
  img = b["image"][np.nonzero(b["valid"])[0]]
  assert (img[..., 1] == 255).all()                 # saturated stays white
  assert (img[..., 2] == 0).all()                   # zero stays black
  assert (img[..., 3] == round(255 * 1000 / 65535)).all()


# 18. Malformed CSVs, files and flags.

def _cli(args):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, "-m", "gandl_jax.cli.convert"] + args,
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.e2e
def test_negative_num_shards_is_a_usage_error(tmp_path):
  csv_path = _csv(str(tmp_path), _sites(str(tmp_path), 1))
  r = _cli(["--dataset=loaddata", f"--input={csv_path}",
            f"--output={tmp_path / 'out'}", "--num_shards=-3"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert "--num_shards must be a positive integer, got -3" in r.stderr
  assert "number sections" not in r.stderr
  assert not (tmp_path / "out").exists()


def test_semicolon_delimited_csv_names_the_delimiter(tmp_path):
  rows = _sites(str(tmp_path), 2)
  path = str(tmp_path / "semi.csv")
  pd.DataFrame(rows).to_csv(path, index=False, sep=";")
  with pytest.raises(imagefile.MetadataError) as e:
    loaddata.read_loaddata([path])
  msg = str(e.value)
  assert msg.startswith(f"{path}: the header is separated by ';'")
  assert "comma-separated" in msg and "\n" not in msg


def test_duplicated_filename_column_is_refused_not_a_phantom_channel(tmp_path):
  rows = _sites(str(tmp_path), 2)
  path = _csv(str(tmp_path), rows)
  with open(path) as f:
    lines = f.read().splitlines()
  # A second FileName_DNA column (pandas would read it as FileName_DNA.1).
  lines = [lines[0] + ",FileName_DNA"] + [ln + ",x.tiff" for ln in lines[1:]]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(imagefile.MetadataError, match=r"column FileName_DNA "
                     r"appears more than once in the header"):
    loaddata.read_loaddata([path])


@pytest.mark.parametrize("values", [[[-5, 3], [100, -30000]],
                                    [[5, 3], [100, 30000]]])
def test_signed_16bit_tiff_has_its_own_message(values):
  a = np.asarray(values, np.int16)
  with pytest.raises(imagefile.SiteError) as e:
    loaddata.decode_plane(_tiff_bytes(a, signed=True), "s.tiff")
  assert e.value.reason == ("signed 16-bit samples are not supported; convert "
                            "the image to unsigned 16-bit")
  # The same writer's unsigned file reads back exactly.
  u = np.asarray(values, np.int32).clip(0).astype(np.uint16)
  x, bits = loaddata.decode_plane(_tiff_bytes(u), "u.tiff")
  assert bits == 16 and np.array_equal(x, u)
