"""The command-line conventions every `gandl-*` command shares (README, "Exit
status"): usage errors exit 2 with one line, bad input exits 1 with one line
that names the file and a flag that exists, existing outputs are refused
unless --overwrite, and no temporary file outlives its run."""
import ast
import os
import re
import signal
import subprocess
import sys
import textwrap
import types

import numpy as np
import pandas as pd
import pytest

from gandl_jax import cli
from gandl_jax import embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "parity_32.npz")


def _console_scripts():
  """{command: module} from setup.py's console_scripts."""
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    text = f.read()
  return dict(re.findall(r'"(gandl-[a-z-]+)=(gandl_jax\.cli\.\w+):run"', text))


SCRIPTS = _console_scripts()
# Their imports take 10 s and more: covered by the AST check below.
HEAVY = {"gandl-train", "gandl-demo"}


def _run(module: str, *args: str, timeout: float = 120):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _one_line_error(p, status: int, *needles: str) -> str:
  """The one stderr line holding `needles[0]`, after checking the exit
  status and that no traceback was printed."""
  assert p.returncode == status, (p.returncode, p.stderr[-2000:])
  assert "Traceback" not in p.stderr and "FATAL" not in p.stderr, (
      p.stderr[-2000:])
  lines = [l for l in p.stderr.splitlines() if needles[0] in l]
  assert len(lines) == 1, p.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def test_every_console_script_is_listed():
  assert len(SCRIPTS) >= 9 and "gandl-convert" in SCRIPTS


# --------------------------------------------------------------------------
# Usage errors: exit 2, one line.


def test_every_command_parses_flags_with_cli_start():
  """absl's app.run prints "FATAL Flags parsing error" and exits 1:
  every command's run() goes through cli.start instead."""
  for name, module in sorted(SCRIPTS.items()):
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    run = next(n for n in tree.body
               if isinstance(n, ast.FunctionDef) and n.name == "run")
    calls = [ast.unparse(n.func) for n in ast.walk(run)
             if isinstance(n, ast.Call)]
    assert "cli.start" in calls and "app.run" not in calls, (name, calls)


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - HEAVY))
def test_unknown_flag_exits_2_with_usage_line(name):
  p = _run(SCRIPTS[name], "--bogus_flag")
  _one_line_error(p, cli.EXIT_USAGE, "usage error", "bogus_flag")


@pytest.mark.e2e
@pytest.mark.parametrize("args, needle", [
    (("--output", "/tmp/x"), "--input"),                    # required flag
    (("--input", "a", "--output", "b", "--dataset", "bogus"), "--dataset"),
    (("--input", "a", "--output", "b", "--resolution", "x"), "--resolution"),
])
def test_convert_usage_errors_exit_2(args, needle):
  p = _run("gandl_jax.cli.convert", *args)
  _one_line_error(p, cli.EXIT_USAGE, "usage error", needle)


# --------------------------------------------------------------------------
# Bad input: one line, exit 1.


@pytest.mark.e2e
def test_convert_checks_output_before_reading_input(tmp_path):
  """An --output that cannot be a directory is refused first (the input,
  which does not exist here, is never read)."""
  afile = tmp_path / "afile"
  afile.write_text("x")
  missing_input = str(tmp_path / "no-such-input")
  for output, needle in ((afile, "is a file"),
                         (afile / "sub", "is under"),
                         ("/proc/gandl-x", "cannot create")):
    p = _run("gandl_jax.cli.convert", "--input", missing_input, "--output",
             str(output))
    _one_line_error(p, cli.EXIT_ERROR, "gandl-convert: error: --output",
                    needle)


def test_check_output_dir_leaves_nothing_behind(tmp_path):
  target = tmp_path / "a" / "b" / "shards"
  cli.check_output_dir(str(target))
  assert not (tmp_path / "a").exists()
  (tmp_path / "existing").mkdir()
  cli.check_output_dir(str(tmp_path / "existing"))


def test_densenet_imagenet_offline_is_one_line(tmp_path, monkeypatch):
  """Keras' failed download (a bare Exception) becomes one line naming the
  problem and the flag that takes a local weights file."""
  import urllib.error
  from gandl_jax.baselines import densenet, keras_weights
  keras_weights.keras()
  from keras.src.backend import config as keras_config
  from keras.src.utils import file_utils

  def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")

  monkeypatch.setattr(file_utils, "urlretrieve", offline)
  monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))
  with pytest.raises(ValueError) as e:
    densenet.load_backbone("imagenet")
  msg = str(e.value)
  assert "cannot download the ImageNet weights" in msg
  assert "--weights /path/to/densenet121_" in msg and "\n" not in msg


# --------------------------------------------------------------------------
# Advice that can be followed: the file and a flag that exists.


def test_export_channel_hint_in_the_shards_own_terms():
  from gandl_jax import schema
  from gandl_jax.inference import export
  rx = [dict(index=c.index, stain=c.stain) for c in schema.RXRX19A_CHANNELS]
  ld = [dict(index=i + 1, name=n, stain=schema.CELL_PAINTING_STAINS[n][0])
        for i, n in enumerate(schema.JUMP_CHANNELS)]

  def message(trained_on, want, dataset, have):
    model = types.SimpleNamespace(meta={"dataset": {"dataset": trained_on,
                                                    "channels": want}})
    with pytest.raises(ValueError) as e:
      export.check_channels(model, {"dataset": dataset, "channels": have},
                            "SHARDS")
    return str(e.value)

  # LoadData shards, RxRx19a model: LoadData takes no channel numbers.
  msg = message("rxrx19a", rx, "loaddata", ld)
  assert "--channels 1,2,3,4,5" not in msg
  assert "no gandl-convert --channels value" in msg
  # RxRx19a shards, LoadData model: RxRx takes no channel names.
  msg = message("loaddata", ld, "rxrx19a", rx)
  assert "OrigDNA,OrigER" not in msg.split(";")[-1]
  # LoadData shards in another order: the names, which LoadData takes.
  msg = message("loaddata", ld, "loaddata", ld[::-1])
  assert ("gandl-convert --dataset loaddata --channels "
          "OrigDNA,OrigER,OrigRNA,OrigAGP,OrigMito") in msg
  # RxRx1 shards of other channels, RxRx19a model: the numbers.
  rx1 = [dict(index=c.index, stain=c.stain)
         for c in schema.RXRX1_CHANNELS if c.index in (1, 2, 6)]
  msg = message("rxrx19a", rx[:3], "rxrx1", rx1)
  assert "gandl-convert --dataset rxrx1 --channels 1,2,3" in msg


def test_probe_on_sites_without_rxrx19a_metadata_names_a_train_flag():
  """gandl-train has no --metadata: the probe names the config key that
  turns it off."""
  from gandl_jax.train import probe
  table = pd.DataFrame({"site_id": ["p_A01_1"], "well_id": ["p_A01"],
                        "plate": [1], "experiment": ["BR1"],
                        "cell_type": [""], "well": ["A01"], "site": [1]})
  with pytest.raises(ValueError) as e:
    probe.select_sites(table, 10, 0)
  msg = str(e.value)
  assert "--metadata" not in msg and "--config.probe_every_kimg=0" in msg
  assert "disease_condition" in msg


def test_densenet_image_size_hint_names_the_flag():
  from gandl_jax.baselines import densenet
  with pytest.raises(ValueError, match="pass --image_size"):
    densenet.check_image_size(None, 16)


def test_non_regular_image_file_message_is_format_neutral(tmp_path):
  """LoadData sets are TIFFs: no "expected a PNG file"."""
  from gandl_jax.data import imagefile
  with pytest.raises(imagefile.SiteError) as e:
    imagefile.read_image_file(str(tmp_path))
  assert "PNG" not in str(e.value) and "a directory" in str(e.value)


def test_import_npz_with_pickled_arrays_names_the_file(tmp_path):
  from gandl_jax.interop import stylegan2_ada
  path = str(tmp_path / "nets.npz")
  np.savez(path, **{"G.x": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError) as e:
    stylegan2_ada.load_state_dicts(path)
  msg = str(e.value)
  assert msg.startswith(path) and "allow_pickle" not in msg
  assert "numeric array" in msg


def test_import_pt_without_torch_names_the_file_and_npz(tmp_path,
                                                        monkeypatch):
  from gandl_jax.interop import stylegan2_ada
  monkeypatch.setitem(sys.modules, "torch", None)   # import torch fails
  path = str(tmp_path / "nets.pt")
  with pytest.raises(ValueError) as e:
    stylegan2_ada.load_state_dicts(path)
  msg = str(e.value)
  assert msg.startswith(path) and "PYTHONPATH" not in msg
  assert ".npz" in msg and "--state_dicts" in msg


def test_imported_model_as_training_workdir_is_explained(tmp_path):
  """A gandl-import output is a model-only checkpoint, not a corrupt
  training one: refused with an explanation, never moved aside."""
  from gandl_jax.interop import stylegan2_ada
  from gandl_jax.train import checkpointer
  sds = stylegan2_ada.load_state_dicts(FIXTURE)
  wd = str(tmp_path / "imported")
  path = stylegan2_ada.import_to_workdir(sds, {"mbstd_group_size": 4}, wd,
                                        FIXTURE, step=0)
  ckpt = checkpointer.TrainCheckpointer(wd, async_save=False)
  try:
    with pytest.raises(ValueError) as e:
      ckpt.read_meta(0)
  finally:
    ckpt.close()
  assert not isinstance(e.value, checkpointer.CorruptCheckpoint)
  msg = str(e.value)
  assert "model-only checkpoint" in msg and "corrupt" not in msg
  assert "--workdir" in msg and os.path.isdir(path)


# --------------------------------------------------------------------------
# One rule for every writer: an existing output is refused unless
# --overwrite.


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  from gandl_jax.data import convert, synthetic
  root = tmp_path_factory.mktemp("cli")
  src = synthetic.generate(str(root / "src"), size=16, plates=1,
                           wells_per_plate=16, workers=1)
  out = str(root / "shards")
  convert.convert("rxrx19a", src, out, resolution=16, num_shards=2)
  return out


def test_features_refuses_existing_output(shards, tmp_path):
  from gandl_jax.baselines import run as run_lib
  out = tmp_path / "classical.parquet"
  run_lib.compute_embeddings("classical", shards, str(out), workers=1)
  rows = len(embeddings.read_parquet(str(out)))
  with pytest.raises(FileExistsError, match="--overwrite"):
    run_lib.compute_embeddings("classical", shards, str(out), workers=1,
                               filter="treatment == ''")
  assert len(embeddings.read_parquet(str(out))) == rows
  run_lib.compute_embeddings("classical", shards, str(out), workers=1,
                             filter="treatment == ''", overwrite=True)
  assert 0 < len(embeddings.read_parquet(str(out))) < rows


@pytest.mark.e2e
def test_generate_and_import_refuse_existing_output(tmp_path):
  out = tmp_path / "grid.png"
  out.write_bytes(b"old")
  p = _run("gandl_jax.cli.generate", "--checkpoint", str(tmp_path / "none"),
           "--out", str(out))
  _one_line_error(p, cli.EXIT_ERROR, "already exists", "--overwrite")
  assert out.read_bytes() == b"old"
  step = tmp_path / "wd" / "checkpoints" / "0"
  step.mkdir(parents=True)
  p = _run("gandl_jax.cli.import_weights", "--state_dicts", FIXTURE,
           "--workdir", str(tmp_path / "wd"))
  _one_line_error(p, cli.EXIT_ERROR, "already exists", "--overwrite")


@pytest.mark.e2e
def test_synth_refuses_existing_tree(tmp_path):
  args = ("--output", str(tmp_path), "--size", "16", "--plates", "1",
          "--wells_per_plate", "16", "--workers", "1")
  root = tmp_path / "RxRx19a"
  root.mkdir()
  (root / "metadata.csv").write_text("x")
  p = _run("gandl_jax.cli.synth", *args)
  _one_line_error(p, cli.EXIT_ERROR, "already exists", "--overwrite")
  p = _run("gandl_jax.cli.synth", *args, "--overwrite")
  _one_line_error(p, cli.EXIT_ERROR, "not written by gandl-synth")
  assert (root / "metadata.csv").read_text() == "x"
  (root / "synthetic_truth.csv").write_text("x")
  (root / "stale.txt").write_text("x")
  p = _run("gandl_jax.cli.synth", *args, "--overwrite")
  assert p.returncode == 0, p.stderr[-2000:]
  assert not (root / "stale.txt").exists()
  assert (root / "metadata.csv").read_text() != "x"


# --------------------------------------------------------------------------
# Temporary files of an embeddings writer.


def _temp_files(directory, name="out.parquet"):
  return sorted(f for f in os.listdir(directory)
                if f.startswith(f".{name}.tmp-"))


def test_stale_temp_files_are_removed_live_and_other_ones_kept(tmp_path):
  import fcntl
  out = tmp_path / "out.parquet"
  stale = tmp_path / ".out.parquet.tmp-abcd1234.parquet"
  live = tmp_path / ".out.parquet.tmp-live5678.parquet"
  other = tmp_path / ".other.parquet.tmp-abcd1234.parquet"
  unlike = tmp_path / ".out.parquet.tmp-notours.txt"
  for f in (stale, live, other, unlike):
    f.write_bytes(b"x")
  fd = os.open(live, os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # a running writer
  try:
    removed = embeddings.remove_stale_temp_files(str(out))
  finally:
    os.close(fd)
  assert removed == [str(stale)]
  assert live.exists() and other.exists() and unlike.exists()


_WRITER = textwrap.dedent(r"""
  import sys, time
  import numpy as np
  from gandl_jax import cli, embeddings
  cli.stop_on_sigterm()
  with embeddings.Writer(sys.argv[1]) as w:
    w.write({"site_id": np.array(["a", "b"])}, np.zeros((2, 3)))
    print("writing", flush=True)
    time.sleep(60)
""")


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_writer_leaves_no_temp_file_behind(tmp_path, sig):
  """SIGTERM: the temporary file is removed on the way out (exit 143);
  SIGKILL: the next writer of the same output removes it."""
  out = tmp_path / "out.parquet"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  try:
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    assert len(_temp_files(tmp_path)) == 1
    p.send_signal(sig)
    status = p.wait(timeout=60)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  assert not out.exists()
  if sig == signal.SIGTERM:
    assert status == cli.EXIT_PREEMPTED and not _temp_files(tmp_path)
    return
  assert len(_temp_files(tmp_path)) == 1
  embeddings.write(str(out), {"site_id": np.array(["a"])}, np.zeros((1, 2)))
  assert out.exists() and not _temp_files(tmp_path)
