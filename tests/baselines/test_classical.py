"""Classical features (gandl_jax.baselines) and gandl-features."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gandl_jax import schema
from gandl_jax.baselines import METHODS, classical
from gandl_jax.baselines import run as run_lib
from gandl_jax.data import convert, synthetic
from gandl_jax.evaluate import io as emb_io

RES = 32


def _named(x, num_channels):
  return dict(zip(classical.feature_names(num_channels), x))


def test_names_match_dimension_and_deterministic():
  rng = np.random.default_rng(0)
  for c in (5, 6):
    im = rng.integers(0, 256, (3, 24, 24, c), dtype=np.uint8)
    f = classical.features(im)
    assert f.dtype == np.float32
    assert f.shape == (3, len(classical.feature_names(c)))
    assert len(set(classical.feature_names(c))) == f.shape[1]
    np.testing.assert_array_equal(f, classical.features(im.copy()))
    assert np.isfinite(f).all()
  assert len(classical.feature_names(5)) == 140
  with pytest.raises(ValueError, match="uint8"):
    classical.features(np.zeros((1, 8, 8, 5), np.float32))


def test_constant_image():
  im = np.full((1, 32, 32, 5), 77, np.uint8)
  f = _named(classical.features(im)[0], 5)
  for c in range(1, 6):
    assert f[f"w{c}_mean"] == 77 and f[f"w{c}_std"] == 0
    for p in classical.PERCENTILES:
      assert f[f"w{c}_p{p:02d}"] == 77
    for d in classical.GLCM_DISTANCES:
      assert f[f"w{c}_glcm_contrast_d{d}"] == 0
      assert f[f"w{c}_glcm_dissimilarity_d{d}"] == 0
      assert f[f"w{c}_glcm_homogeneity_d{d}"] == pytest.approx(1.0)
      assert f[f"w{c}_glcm_ASM_d{d}"] == pytest.approx(1.0)
      assert f[f"w{c}_glcm_entropy_d{d}"] == pytest.approx(0.0, abs=1e-6)
    for r in classical.GRANULARITY_RADII:
      assert f[f"w{c}_granularity_r{r}"] == 0
  assert f["corr_w1_w2"] == 0            # undefined for flat channels
  assert f["nuclei_count"] == 0


def test_two_level_checkerboard():
  lo, hi = 10, 200
  board = np.where((np.indices((32, 32)).sum(0) % 2) == 0, lo, hi).astype(np.uint8)
  im = np.repeat(board[None, :, :, None], 5, axis=3)
  f = _named(classical.features(im)[0], 5)
  # Half the pixels at each level: closed-form statistics.
  assert f["w1_mean"] == pytest.approx((lo + hi) / 2)
  assert f["w1_std"] == pytest.approx((hi - lo) / 2)
  for p in (1, 5, 25):
    assert f[f"w1_p{p:02d}"] == lo
  for p in (75, 95, 99):
    assert f[f"w1_p{p:02d}"] == hi
  assert f["w1_p50"] == pytest.approx((lo + hi) / 2)   # linear interpolation
  # 32 grey levels: 10 -> 1, 200 -> 25. At distance 1 the horizontal and
  # vertical neighbours always differ, the diagonal ones never: contrast =
  # (24^2 + 0 + 24^2 + 0) / 4. At distance 2 every neighbour is equal.
  step = 256 // classical.GLCM_LEVELS
  d = hi // step - lo // step
  assert f["w1_glcm_contrast_d1"] == pytest.approx(d * d / 2)
  assert f["w1_glcm_dissimilarity_d1"] == pytest.approx(d / 2)
  assert f["w1_glcm_contrast_d2"] == pytest.approx(0.0)
  # Identical channels: correlation 1.
  assert f["corr_w1_w2"] == pytest.approx(1.0)


def test_correlation_granularity_and_nuclei_on_constructed_images():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 100, (40, 40)).astype(np.uint8)
  im = np.zeros((1, 40, 40, 5), np.uint8)
  im[0, ..., 0] = base
  im[0, ..., 1] = 2 * base + 3          # perfectly correlated
  im[0, ..., 2] = 255 - base            # perfectly anti-correlated
  im[0, ..., 3] = rng.integers(0, 256, (40, 40))
  # w5: isolated single bright pixels: the smallest opening removes them all.
  im[0, 5::10, 5::10, 4] = 200
  f = _named(classical.features(im)[0], 5)
  assert f["corr_w1_w2"] == pytest.approx(1.0)
  assert f["corr_w1_w3"] == pytest.approx(-1.0)
  assert abs(f["corr_w1_w4"]) < 0.1
  assert f["w5_granularity_r1"] == pytest.approx(1.0)
  assert f["w5_granularity_r2"] == 0 and f["w5_granularity_r4"] == 0
  # Nuclei: three 5x5 squares (area 25, isotropic second moments) whose
  # centres lie 12 px apart on a line (nearest neighbour: 12 for each).
  nuc = np.zeros((40, 40), np.uint8)
  for y, x in ((5, 5), (5, 17), (5, 29)):
    nuc[y:y + 5, x:x + 5] = 180
  im2 = np.repeat(nuc[None, :, :, None], 5, axis=3)
  n = _named(classical.features(im2)[0], 5)
  assert n["nuclei_count"] == 3
  assert n["nuclei_area_mean"] == 25 and n["nuclei_area_sd"] == 0
  assert n["nuclei_eccentricity_mean"] == pytest.approx(0.0, abs=1e-6)
  assert n["nuclei_neighbour_distance"] == pytest.approx(12.0)


def test_glcm_against_numpy_reference():
  """The GLCM contrast is the mean squared grey-level difference of
  neighbouring pixel pairs (both directions), averaged over the 4 angles."""
  rng = np.random.default_rng(2)
  ch = rng.integers(0, 256, (20, 20)).astype(np.uint8)
  q = (ch // (256 // classical.GLCM_LEVELS)).astype(np.int64)
  ref = []
  for dy, dx in ((0, 1), (-1, 1), (-1, 0), (-1, -1)):
    a = q[max(0, -dy):q.shape[0] - max(0, dy), max(0, -dx):q.shape[1] - max(0, dx)]
    b = q[max(0, dy):q.shape[0] - max(0, -dy) or None,
          max(0, dx):q.shape[1] - max(0, -dx) or None]
    ref.append(np.mean((a - b) ** 2.0))
  got = classical.glcm_texture(ch)
  assert got[classical.GLCM_PROPS.index("contrast")] == pytest.approx(np.mean(ref))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("features")
  src = synthetic.generate(str(root / "src"), size=RES, plates=1,
                           wells_per_plate=16, workers=1)
  shards = str(root / "shards")
  convert.convert("rxrx19a", src, shards, resolution=RES, num_shards=3)
  return dict(root=root, src=src, shards=shards)


def _raw_site(src, r):
  return np.stack([np.asarray(Image.open(os.path.join(src, "images", schema.image_relpath(
      r.experiment, int(r.plate), r.well, int(r.site), ch)))) for ch in range(1, 6)], -1)


def test_command_writes_the_export_layout(tree, tmp_path):
  out = str(tmp_path / "classical.parquet")
  s = run_lib.compute_embeddings("classical", tree["shards"], out, batch=7,
                                 workers=1, progress_every_s=0)
  md = pd.read_csv(os.path.join(tree["src"], "metadata.csv"), dtype=str,
                   keep_default_na=False)
  assert s.num_sites == len(md) == 256 and s.feature_dim == 140
  emb = emb_io.load_embeddings(out, os.path.join(tree["src"], "metadata.csv"))
  assert not emb.issues
  assert len(emb.meta) == 256 and emb.meta.site_id.is_unique
  assert set(emb.meta.site_id) == set(md.site_id)
  assert emb.file_metadata["gandl.layer"] == "classical"
  names = json.loads(emb.file_metadata["gandl.feature_names"])
  assert names == classical.feature_names(5)
  table = pq.read_table(out)
  assert table.column_names[0] == "site_id"
  assert table.column_names[-140] == "f0000"
  assert "disease_condition" in table.column_names
  # Features equal those of the raw PNGs (conversion at the same size is
  # lossless), row by row.
  by_id = md.set_index("site_id")
  pick = emb.meta.site_id.iloc[[0, 17, 255]]
  raw = np.stack([_raw_site(tree["src"], by_id.loc[[sid]].reset_index().iloc[0])
                  for sid in pick])
  rows = emb.meta.index[emb.meta.site_id.isin(pick)]
  order = [list(emb.meta.site_id[rows]).index(sid) for sid in pick]
  np.testing.assert_allclose(emb.features[rows][order], classical.features(raw),
                             rtol=1e-6)


def test_command_filter_workers_and_errors(tree, tmp_path):
  one = str(tmp_path / "one.parquet")
  two = str(tmp_path / "two.parquet")
  flt = "disease_condition == 'Mock'"
  run_lib.compute_embeddings("classical", tree["shards"], one, filter=flt,
                             batch=5, workers=1)
  run_lib.compute_embeddings("classical", tree["shards"], two, filter=flt,
                             batch=16, workers=2)
  a, b = pq.read_table(one).to_pandas(), pq.read_table(two).to_pandas()
  md = pd.read_csv(os.path.join(tree["src"], "metadata.csv"), dtype=str,
                   keep_default_na=False)
  assert len(a) == (md.disease_condition == "Mock").sum()
  assert (a.disease_condition == "Mock").all()
  pd.testing.assert_frame_equal(a, b)
  bad = str(tmp_path / "bad.parquet")
  with pytest.raises(ValueError, match="unknown feature method"):
    run_lib.compute_embeddings("nope", tree["shards"], bad)
  with pytest.raises(ValueError, match="no sites"):
    run_lib.compute_embeddings("classical", tree["shards"], bad,
                               filter="plate > 99")
  assert not os.path.exists(bad)
  assert "classical" in METHODS


@pytest.mark.e2e
def test_cli(tree, tmp_path):
  """The command as users run it (a subprocess: the commands' absl flags
  must not meet other commands' in the test process)."""
  out = tmp_path / "cli.csv"
  argv = [sys.executable, "-m", "gandl_jax.cli.features", "--method",
          "classical", "--data", tree["shards"], "--output", str(out),
          "--workers", "1",
          "--filter", "disease_condition == 'Active SARS-CoV-2'"]
  r = subprocess.run(argv, capture_output=True, text=True, check=False,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  df = pd.read_csv(out)
  assert df.columns[0] == "site_id" and df.columns[1] == "f0000"
  # Exactly the sites the filter selects, counted from the raw metadata.
  md = pd.read_csv(os.path.join(tree["src"], "metadata.csv"), dtype=str,
                   keep_default_na=False)
  active = md[md.disease_condition == "Active SARS-CoV-2"]
  assert 0 < len(active) < len(md)
  assert len(df) == len(active)
  assert sorted(df["site_id"]) == sorted(active["site_id"])
  assert df.shape[1] == 1 + len(classical.feature_names(5))
  r = subprocess.run(argv[:6] + [str(tmp_path / "missing")] + argv[7:-2],
                     capture_output=True, text=True, check=False, timeout=600)
  assert r.returncode == 1, r.stderr[-2000:]
  assert "gandl-features: error:" in r.stderr
