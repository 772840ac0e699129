"""Loading embeddings in every layout; bad rows reported, not silently kept."""
import os

import numpy as np
import pandas as pd
import pytest

import simulate

from gandl_jax import embeddings
from gandl_jax.evaluate import io as eio
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
def test_csv_reader_equals_pandas(tmp_path, monkeypatch, header, gz):
  """Arrow's reader (features straight into float32, a record batch at a
  time) gives the same matrix and metadata as pandas, whatever the block
  size."""
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
  for block_bytes in (1000, 1 << 20):   # many record batches, and one
    monkeypatch.setattr(eio, "CSV_BLOCK_BYTES", block_bytes)
    emb = eio.read_embeddings_file(p)
    assert emb.features.dtype == np.float32 and emb.features.flags.c_contiguous
    np.testing.assert_array_equal(emb.features, ref_X)
    assert emb.meta["site_id"].tolist() == sids


# Values as Recursion's CSV may spell them.
_GOOD_VALUES = ["1.5", "-2", "1e5", "1E-5", "+1.5", ".5", "5.", "-0", "inf",
                "-inf", "Infinity", "1e400", "1e-42", "3.4028235e38",
                "0.100000001", '"2.25"', "nan", "NaN", ""]
# A line put among good ones -> None where the file is read (the line as
# noted), else the start of the one-line error after the file name.
_PARSE_ERROR = "cannot parse as an embeddings CSV: CSV parse error: Expected 3"
_NOT_FLOAT = ("cannot parse as an embeddings CSV: In CSV column #1: CSV "
              "conversion error to float: invalid value")
_BAD_LINES = {
    "x_1_A01_1,1.5 ,2\n": None,             # trailing blank: 1.5
    "x_1_A01_1,abc,2\n": _NOT_FLOAT + " 'abc'",
    "x_1_A01_1,NA,2\n": None,               # a null: NaN, dropped on join
    "x_1_A01_1,1,2,3\n": _PARSE_ERROR + " columns, got 4",
    "x_1_A01_1,1\n": _PARSE_ERROR + " columns, got 2",
    "\n": None,                             # empty lines are skipped
    "x_1_A01_1,0x10,2\n": _NOT_FLOAT + " '0x10'",
    ",1,2\n": None,                         # an empty site id
    "x_1_A01_1,1_0,2\n": _NOT_FLOAT + " '1_0'",
}
_BAD_ROWS = {"x_1_A01_1,1.5 ,2\n": [1.5, 2.0], "x_1_A01_1,NA,2\n": [np.nan, 2.0],
             ",1,2\n": [1.0, 2.0]}


def test_csv_values_and_bad_lines(tmp_path):
  """Every spelling of a number parses to the float32 nearest its decimal
  value (bit for bit; empty, nan and NA as NaN); bad text is one line naming
  the file and the value."""
  header = "site_id,0,1\n"
  good = [f"HRCE-2_1_B{i:03d}_1,{v},{_GOOD_VALUES[-1 - i]}\n"
          for i, v in enumerate(_GOOD_VALUES)]

  def expected(v):
    v = v.strip('"')
    return np.float32(float(v)) if v else np.float32(np.nan)

  want = np.array([[expected(v), expected(_GOOD_VALUES[-1 - i])]
                   for i, v in enumerate(_GOOD_VALUES)], dtype=np.float32)
  p = tmp_path / "good.csv"
  p.write_text(header + "".join(good))
  emb = eio.read_embeddings_file(str(p))
  np.testing.assert_array_equal(emb.features.view(np.int32), want.view(np.int32))
  assert emb.features[12, 0] > 0 and emb.features[11, 0] == np.inf
  for k, (bad, error) in enumerate(_BAD_LINES.items()):
    p = tmp_path / f"bad{k}.csv"
    p.write_text(header + "".join(good[:5]) + bad + "".join(good[5:]))
    if error is not None:
      with pytest.raises(ValueError) as e:
        eio.read_embeddings_file(str(p))
      msg = str(e.value)
      assert msg.startswith(f"{p}: {error}") and "\n" not in msg, (bad, msg)
      continue
    emb = eio.read_embeddings_file(str(p))
    if bad == "\n":
      np.testing.assert_array_equal(emb.features.view(np.int32),
                                    want.view(np.int32))
      continue
    assert len(emb.features) == len(good) + 1
    np.testing.assert_array_equal(emb.features[5], _BAD_ROWS[bad])
    np.testing.assert_array_equal(
        np.delete(emb.features, 5, axis=0).view(np.int32), want.view(np.int32))


def test_wide_csv_into_the_matrix(tmp_path, monkeypatch):
  """Many columns and many record batches (several row blocks) end up in one
  row-major float32 matrix in the file's order, as numpy parses them."""
  rng = np.random.default_rng(11)
  n, dim = 203, 141
  X = rng.standard_normal((n, dim)).astype(np.float32)
  lines = [f"HRCE-1_1_A{i:03d}_1," + ",".join(f"{v:.9g}" for v in row) + "\n"
           for i, row in enumerate(X)]
  p = tmp_path / "wide.csv"
  p.write_text("site_id," + ",".join(map(str, range(dim))) + "\n" +
               "".join(lines))
  monkeypatch.setattr(eio, "CSV_BLOCK_BYTES", 20_000)   # ~8 batches
  emb = eio.read_embeddings_file(str(p))
  assert emb.features.dtype == np.float32 and emb.features.flags.c_contiguous
  np.testing.assert_array_equal(emb.features, X)
  assert emb.meta["site_id"].tolist() == [f"HRCE-1_1_A{i:03d}_1"
                                          for i in range(n)]
  p = tmp_path / "header_only.csv"
  p.write_text("site_id," + ",".join(map(str, range(dim))) + "\n")
  emb = eio.read_embeddings_file(str(p))
  assert emb.features.shape == (0, dim)
