"""Loading embeddings in every layout; bad rows reported, not silently kept."""
import os

import numpy as np
import pandas as pd
import pytest

from gandl_jax import embeddings
from gandl_jax.evaluate import io as eio
from gandl_jax.evaluate import simulate
from gandl_jax import schema


@pytest.fixture(scope="module")
def small():
  cfg = simulate.SimConfig(sites_per_cell_type=(("HRCE", 48), ("VERO", 16)),
                           wells_per_plate=8, dim=6, n_compounds=3,
                           n_rescue=1, n_toxic=1)
  md, X, _ = simulate.simulate_rxrx19a(cfg)
  return md, X


def test_feature_naming_convention():
  assert embeddings.FEATURE_PREFIX == "f"
  assert embeddings.feature_names(3) == ["f0000", "f0001", "f0002"]
  assert embeddings.feature_name(1023) == "f1023"


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_our_layout_roundtrip(tmp_path, small, ext):
  md, X = small
  p = str(tmp_path / f"emb.{ext}")
  embeddings.write(p, md, X, file_metadata={embeddings.META_KEY_LAYER: "fc",
                                                embeddings.META_KEY_STEP: 1200})
  emb = eio.load_embeddings(p)
  np.testing.assert_array_equal(emb.features, X)
  assert list(emb.meta["site_id"]) == list(md["site_id"])
  assert emb.meta["treatment"].tolist() == md["treatment"].tolist()
  assert emb.meta["plate"].dtype.kind == "i"
  assert emb.issues == []
  if ext == "parquet":
    assert emb.file_metadata == {"gandl.layer": "fc",
                                 "gandl.checkpoint_step": "1200"}
  # No temp files left behind.
  assert sorted(os.listdir(tmp_path)) == [f"emb.{ext}"]


def _recursion_csv(path, md, X, header=True, index=False):
  df = pd.DataFrame(X, columns=[str(i) for i in range(X.shape[1])])
  df.insert(0, "site_id", md["site_id"].values)
  df.to_csv(path, index=index, header=header)


@pytest.mark.parametrize("header,index", [(True, False), (False, False),
                                          (True, True)])
def test_recursion_embeddings_csv(tmp_path, small, header, index):
  md, X = small
  p = str(tmp_path / "embeddings.csv")
  _recursion_csv(p, md, X, header=header, index=index)
  mp = str(tmp_path / "metadata.csv")
  md.to_csv(mp, index=False)
  emb = eio.load_embeddings(p, mp)
  assert emb.dim == X.shape[1]
  np.testing.assert_allclose(emb.features, X, rtol=1e-6)
  assert list(emb.meta.columns) == list(schema.RXRX19A_COLUMNS)
  assert emb.meta["disease_condition"].tolist() == md["disease_condition"].tolist()


def test_recursion_per_experiment_csvs(tmp_path, small):
  md, X = small
  d = tmp_path / "emb"
  d.mkdir()
  for exp in md["experiment"].unique():
    m = (md["experiment"] == exp).to_numpy()
    df = pd.DataFrame(X[m], columns=[f"feature_{i}" for i in range(X.shape[1])])
    # No site_id: built from the file name, plate, well and site.
    df.insert(0, "site", md["site"].values[m])
    df.insert(0, "well", md["well"].values[m])
    df.insert(0, "plate", md["plate"].values[m])
    df.to_csv(d / f"{exp}.csv", index=False)
  mp = str(tmp_path / "metadata.csv")
  md.to_csv(mp, index=False)
  emb = eio.load_embeddings(str(d), mp)
  assert len(emb.meta) == len(md)
  order = pd.Index(md["site_id"]).get_indexer(emb.meta["site_id"])
  np.testing.assert_allclose(emb.features, X[order], rtol=1e-6)
  assert emb.issues == []


def test_bad_rows_reported(tmp_path, small):
  md, X = small
  X = X.copy()
  X[3, 2] = np.nan
  X[5, 0] = np.inf
  sids = md["site_id"].tolist()
  sids[7] = "HRCE-9_99_Z99_1"
  sids[8] = "HRCE-9_99_Z98_1"
  sids[9] = sids[10]
  meta = md.copy()
  meta["site_id"] = sids
  p = str(tmp_path / "emb.parquet")
  embeddings.write(p, meta[["site_id"]], X, include_metadata=False)
  mp = str(tmp_path / "metadata.csv")
  md.to_csv(mp, index=False)
  emb = eio.load_embeddings(p, mp)
  assert len(emb.meta) == len(md) - 5
  text = "\n".join(emb.issues)
  assert "2 row(s) with missing, NaN" in text
  assert "2 site_id(s) not in" in text
  assert "1 duplicated site_id" in text
  assert np.isfinite(emb.features).all()


def test_missing_feature_columns(tmp_path, small):
  md, X = small
  df = pd.DataFrame(X, columns=embeddings.feature_names(X.shape[1]))
  df = df.drop(columns=["f0002"])
  df.insert(0, "site_id", md["site_id"].values)
  p = str(tmp_path / "e.csv")
  df.to_csv(p, index=False)
  emb = eio.load_embeddings(p, md)
  assert emb.dim == X.shape[1] - 1
  assert any("1 feature column(s) missing" in i and "[2]" in i
             for i in emb.issues)


def test_no_features_is_a_clear_error(tmp_path, small):
  md, _ = small
  p = str(tmp_path / "nofeat.csv")
  md.to_csv(p, index=False)
  with pytest.raises(ValueError, match="nofeat.csv: no feature columns"):
    eio.load_embeddings(p)


@pytest.mark.parametrize("header,gz", [(True, False), (False, False),
                                       (True, True)])
def test_csv_reader_in_ranges_equals_pandas(tmp_path, monkeypatch, header, gz):
  """The range-by-range Arrow reader (features straight into float32) gives
  the same matrix and metadata as pandas, whatever the range size."""
  rng = np.random.default_rng(5)
  n, dim = 257, 7
  X = rng.standard_normal((n, dim)).astype(np.float32)
  X[11, 3] = np.nan                    # an empty field
  sids = [f"HRCE-1_{1 + i // 40}_A{i % 40:02d}_{1 + i % 4}" for i in range(n)]
  df = pd.DataFrame(X, columns=[str(i) for i in range(dim)])
  df.insert(0, "site_id", sids)
  p = str(tmp_path / ("e.csv.gz" if gz else "e.csv"))
  df.to_csv(p, index=False, header=header, float_format="%.9g")
  ref = pd.read_csv(p, header=0 if header else None)
  ref_X = ref.iloc[:, 1:].to_numpy(np.float32)
  for range_bytes in (1000, 1 << 20):   # many ranges, and one
    monkeypatch.setattr(eio, "CSV_RANGE_BYTES", range_bytes)
    emb = eio.read_embeddings_file(p)
    assert emb.features.dtype == np.float32 and emb.features.flags.c_contiguous
    np.testing.assert_array_equal(emb.features, ref_X)
    assert emb.meta["site_id"].tolist() == sids


# Values as Recursion's CSV may spell them, and text the reader must refuse.
_GOOD_VALUES = ["1.5", "-2", "1e5", "1E-5", "+1.5", ".5", "5.", "-0", "inf",
                "-inf", "Infinity", "1e400", "1e-42", "3.4028235e38",
                "0.100000001", '"2.25"', "nan", "NaN", ""]
_BAD_LINES = ["x_1_A01_1,1.5 ,2\n", "x_1_A01_1,abc,2\n", "x_1_A01_1,NA,2\n",
              "x_1_A01_1,1,2,3\n", "x_1_A01_1,1\n", "\n", "x_1_A01_1,0x10,2\n",
              ",1,2\n", "x_1_A01_1,1_0,2\n"]


def _read_both(monkeypatch, p):
  """(outcome with polars, outcome with Arrow only): (site ids, features)
  or the error message."""
  out = []
  for use_polars in (True, False):
    with monkeypatch.context() as m:
      if not use_polars:
        m.setattr(eio, "_polars_range", lambda *a, **k: None)
      try:
        emb = eio.read_embeddings_file(p)
        out.append((emb.meta["site_id"].tolist(), emb.features))
      except ValueError as e:
        out.append(str(e))
  return out


@pytest.mark.parametrize("range_bytes", [64, 1 << 20])
def test_csv_polars_path_equals_arrow(tmp_path, monkeypatch, range_bytes):
  """Recursion's layout is parsed by polars where installed: the same
  float32 values (bit for bit, NaN where Arrow reads a null), the same site
  ids, and bad text gets Arrow's one-line error, whether the bad line sits
  in a range of its own or among good ones."""
  pl = pytest.importorskip("polars")
  monkeypatch.setattr(eio, "CSV_RANGE_BYTES", range_bytes)
  rng = np.random.default_rng(3)
  X = (rng.standard_normal((300, 4)) * 10.0 ** rng.integers(
      -8, 8, (300, 4))).astype(np.float32)
  lines = [f"HRCE-1_1_A{i:03d}_1," + ",".join(f"{v:.9g}" for v in row) + "\n"
           for i, row in enumerate(X)]
  header = "site_id,0,1\n"
  good = [f"HRCE-2_1_B{i:03d}_1,{v},{_GOOD_VALUES[-1 - i]}\n"
          for i, v in enumerate(_GOOD_VALUES)]
  p = tmp_path / "clean.csv"
  p.write_text("site_id,0,1,2,3\n" + "".join(lines))
  calls = []
  real = eio._polars_range
  monkeypatch.setattr(eio, "_polars_range",
                      lambda *a: calls.append(real(*a)) or calls[-1])
  emb = eio.read_embeddings_file(str(p))
  assert calls and all(c is not None for c in calls)     # polars parsed it
  np.testing.assert_array_equal(emb.features, X)
  monkeypatch.setattr(eio, "_polars_range", real)
  p = tmp_path / "good.csv"
  p.write_text(header + "".join(good))
  a, b = _read_both(monkeypatch, str(p))
  assert a[0] == b[0]
  np.testing.assert_array_equal(a[1].view(np.int32), b[1].view(np.int32))
  for k, bad in enumerate(_BAD_LINES):
    p = tmp_path / f"bad{k}.csv"
    p.write_text(header + "".join(good[:5]) + bad + "".join(good[5:]))
    a, b = _read_both(monkeypatch, str(p))
    if isinstance(b, str):
      assert a == b and str(p) in a and "\n" not in a, bad
    else:
      assert a[0] == b[0], bad
      np.testing.assert_array_equal(a[1].view(np.int32), b[1].view(np.int32))
  del pl


def test_polars_columns_into_the_matrix(tmp_path, monkeypatch):
  """polars' columns go into the row-major matrix a block of columns at a
  time: more columns than a block (and a part block), several ranges, a
  matrix that must grow; the same float32 matrix as Arrow's path and as
  numpy's transpose."""
  pytest.importorskip("polars")
  rng = np.random.default_rng(11)
  n, dim = 203, 2 * eio._COLUMN_BLOCK + 13
  X = rng.standard_normal((n, dim)).astype(np.float32)
  lines = [f"HRCE-1_1_A{i:03d}_1," + ",".join(f"{v:.9g}" for v in row) + "\n"
           for i, row in enumerate(X)]
  p = tmp_path / "wide.csv"
  p.write_text("site_id," + ",".join(map(str, range(dim))) + "\n" +
               "".join(lines))
  monkeypatch.setattr(eio, "CSV_POLARS_RANGE_BYTES", 20_000)   # ~8 ranges
  calls = []
  real = eio._polars_range
  monkeypatch.setattr(eio, "_polars_range",
                      lambda *a: calls.append(real(*a)) or calls[-1])
  emb = eio.read_embeddings_file(str(p))
  assert len(calls) > 2 and all(c is not None for c in calls)
  assert emb.features.dtype == np.float32 and emb.features.flags.c_contiguous
  np.testing.assert_array_equal(emb.features, X)
  monkeypatch.setattr(eio, "_polars_range", lambda *a, **k: None)
  arrow = eio.read_embeddings_file(str(p))
  np.testing.assert_array_equal(emb.features.view(np.int32),
                                arrow.features.view(np.int32))
  assert emb.meta["site_id"].tolist() == arrow.meta["site_id"].tolist()
  # The pieces on their own: blocks against numpy's transpose; a matrix
  # that grows keeps its rows.
  cols = [rng.standard_normal(37).astype(np.float32) for _ in range(dim)]
  out = eio._matrix(37, dim)
  assert out.flags.c_contiguous and out.flags.writeable
  eio._put_columns(out, cols)
  np.testing.assert_array_equal(out, np.stack(cols).T)
  grown = eio._grow(out, 30, 50)
  assert grown.shape == (55, dim)
  np.testing.assert_array_equal(grown[:30], out[:30])
  assert eio._matrix(0, dim).shape == (0, dim)
