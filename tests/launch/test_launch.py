"""The launchers' --dry-run output, argument errors, and the remote scripts.

Every launcher under launch/ is checked for the exact commands it prints; the
bash that `tpu-vm ssh --command` would run on the workers is also executed here
against a fake `gandl-train`, to prove the printed text works as written.
"""
import io
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
sys.path.insert(0, str(LAUNCH))

import gpu_local  # noqa: E402
import runner as runner_lib  # noqa: E402
import tpu_commands as tc  # noqa: E402
import tpu_create  # noqa: E402
import tpu_delete  # noqa: E402
import tpu_export_evaluate  # noqa: E402
import tpu_install  # noqa: E402
import tpu_train  # noqa: E402
import tpu_watch  # noqa: E402

BUCKET = "my-bucket"
WORKDIR = "gs://my-bucket/gandl/rxrx19a-256"
DATA = "gs://my-bucket/shards/rxrx19a-256/*.tfrecord"
SCOPE = "--scopes=https://www.googleapis.com/auth/cloud-platform"
SSH = "gcloud compute tpus tpu-vm ssh gandl --zone=us-central1-a"


def dry(main, argv, code=0):
  """Runs a launcher's main with --dry-run; returns its printed lines."""
  out = io.StringIO()
  assert main([*argv, "--dry-run"], out=out) == code
  return out.getvalue().splitlines()


def error(main, argv, capsys):
  """Runs main expecting an argument error; returns the message."""
  with pytest.raises(SystemExit) as exc:
    main(argv, out=io.StringIO())
  assert exc.value.code == 2
  return capsys.readouterr().err


def remote_script(line):
  """The --command=... script of a printed `tpu-vm ssh` line."""
  argv = shlex.split(line)
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  scripts = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  assert len(scripts) == 1
  return scripts[0]


def flag(line, name):
  return [a for a in shlex.split(line) if a.startswith(f"--{name}=")]


# ------------------------------------------------------------------ create ---

def test_create_plain_vm_default_v3_8():
  lines = dry(tpu_create.main, ["--name", "gandl"])
  assert lines == [
      "gcloud compute tpus tpu-vm create gandl --zone=us-central1-a "
      "--accelerator-type=v3-8 --version=tpu-ubuntu2204-base " + SCOPE]


def test_create_queued_resource_spot_slice_project_and_wait():
  lines = dry(tpu_create.main, [
      "--name", "gandl", "--queued", "--spot", "--accelerator-type", "v3-32",
      "--zone", "europe-west4-a", "--project", "my-proj",
      "--runtime-version", "tpu-ubuntu2204-base", "--wait"])
  assert lines[0] == (
      "gcloud compute tpus queued-resources create gandl-qr "
      "--zone=europe-west4-a --project=my-proj --node-id=gandl "
      "--accelerator-type=v3-32 --runtime-version=tpu-ubuntu2204-base "
      "--spot " + SCOPE)
  assert lines[1].startswith("# --wait: repeat every 60 s until the state is "
                             "ACTIVE")
  assert lines[2] == (
      "gcloud compute tpus queued-resources describe gandl-qr "
      "--zone=europe-west4-a --project=my-proj "
      "'--format=value(state.state)'")
  assert len(lines) == 3


@pytest.mark.parametrize("accelerator,runtime", [
    ("v2-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_runtime_follows_generation(accelerator, runtime):
  (line,) = dry(tpu_create.main, ["--name", "gandl", "--accelerator-type",
                                  accelerator])
  assert flag(line, "version") == [f"--version={runtime}"]
  assert flag(line, "accelerator-type") == [f"--accelerator-type={accelerator}"]


def test_create_preemptible_and_service_account():
  (line,) = dry(tpu_create.main, [
      "--name", "gandl", "--preemptible", "--service-account",
      "sa@p.iam.gserviceaccount.com"])
  argv = shlex.split(line)
  assert "--preemptible" in argv and "--spot" not in argv
  assert "--service-account=sa@p.iam.gserviceaccount.com" in argv


@pytest.mark.parametrize("argv,message", [
    (["--dry-run"], "the following arguments are required: --name"),
    (["--name", "gandl", "--bogus"], "unrecognized arguments: --bogus"),
    (["--name", "Gandl"], "--name: expected 1-60 lowercase"),
    (["--name", "gandl", "--zone", "us central"], "--zone: expected a zone"),
    (["--name", "gandl", "--accelerator-type", "v3"],
     "--accelerator-type: expected GENERATION-SIZE"),
    (["--name", "gandl", "--accelerator-type", "v9-8"],
     "--runtime-version is required for v9-8"),
    (["--name", "gandl", "--spot", "--preemptible"], "pick one"),
    (["--name", "gandl", "--queued", "--preemptible"],
     "queued resources use --spot"),
    (["--name", "gandl", "--wait", "--interval", "0"], "--interval"),
])
def test_create_errors(argv, message, capsys):
  assert message in error(tpu_create.main, argv, capsys)


# ------------------------------------------------------------------ delete ---

def test_delete_vm_and_queued_resource():
  assert dry(tpu_delete.main, ["--name", "gandl"]) == [
      "gcloud compute tpus tpu-vm delete gandl --zone=us-central1-a --quiet"]
  assert dry(tpu_delete.main, ["--name", "gandl", "--queued",
                               "--project", "p1"]) == [
      "gcloud compute tpus queued-resources delete gandl-qr "
      "--zone=us-central1-a --project=p1 --force --quiet"]


# ----------------------------------------------------------------- install ---

@pytest.mark.e2e
def test_install_copies_checkout_to_all_workers():
  lines = dry(tpu_install.main, ["--name", "gandl"])
  assert len(lines) == 3
  argv = shlex.split(lines[0])
  assert argv[:2] == ["bash", "-c"] and len(argv) == 3
  copy = argv[2]
  assert copy.startswith('set -eu; umask 077; d="$(mktemp -d ')
  assert "trap 'rm -rf \"$d\"' EXIT" in copy
  assert " ".join([
      "tar", "-czf", '"$d"/src.tar.gz',
      *[shlex.quote(f"--exclude={p}") for p in tc.TAR_EXCLUDES], "-C",
      shlex.quote(str(REPO)), "."]) in copy
  assert copy.endswith(
      'gcloud compute tpus tpu-vm scp "$d"/src.tar.gz '
      "gandl:gandl-jax.tar.gz --zone=us-central1-a --worker=all")
  subprocess.run(["bash", "-n", "-c", copy], check=True)
  for line in lines[1:]:
    assert line.startswith(SSH + " --worker=all '--command=")
  assert remote_script(lines[1]) == (
      "rm -rf gandl-jax && mkdir -p gandl-jax && "
      "tar -xzf gandl-jax.tar.gz -C gandl-jax")
  pip = remote_script(lines[2])
  assert pip.startswith(
      "python3 -m pip install -q --user -U uv && rm -rf gandl-venv && "
      '"$HOME"/.local/bin/uv venv -q --seed --python 3.12 gandl-venv && ')
  assert "gandl-venv/bin/pip install -q -e ./gandl-jax 'jax[tpu]'" in pip
  assert pip.endswith("gandl-venv/bin/python -c 'import gandl_jax, jax; "
                      "print(jax.__version__)'")
  # The remote script is valid bash.
  subprocess.run(["bash", "-n", "-c", pip], check=True)


@pytest.mark.e2e
def test_install_with_system_python():
  lines = dry(tpu_install.main, ["--name", "gandl", "--python-version",
                                 "system"])
  pip = remote_script(lines[-1])
  assert pip.startswith("{ python3 -m venv gandl-venv || ")
  assert "uv" not in pip
  subprocess.run(["bash", "-n", "-c", pip], check=True)


def test_install_from_git_with_ref_and_device_check():
  lines = dry(tpu_install.main, [
      "--name", "gandl", "--project", "p1", "--git-url",
      "https://github.com/o/gandl-jax.git", "--git-ref", "v0.1.0",
      "--check-devices", "--jax-spec", "jax[tpu]==0.6.2"])
  assert len(lines) == 3
  assert all(flag(line, "worker") == ["--worker=all"] for line in lines)
  assert all(flag(line, "project") == ["--project=p1"] for line in lines)
  assert remote_script(lines[0]) == (
      "rm -rf gandl-jax && git clone https://github.com/o/gandl-jax.git "
      "gandl-jax && git -C gandl-jax checkout v0.1.0")
  assert "-e ./gandl-jax 'jax[tpu]==0.6.2'" in remote_script(lines[1])
  assert "sharding.maybe_initialize_distributed()" in remote_script(lines[2])
  assert "--python 3.12 " in remote_script(lines[1])
  assert not any("tpu-vm scp" in line for line in lines)


_FAKE_SCP_GCLOUD = r'''
import json, os, shutil, stat, subprocess, sys
argv = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
if argv[2:4] == ["tpu-vm", "scp"]:
  src, dest = argv[4], argv[5].split(":", 1)[1]
  with open(log, "a") as f:
    f.write(json.dumps({"src": src,
                        "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(src)).st_mode),
                        "file_mode": stat.S_IMODE(os.stat(src).st_mode)}) + "\n")
  shutil.copy(src, os.path.join(os.environ["HOME"], dest))
elif argv[2:4] == ["tpu-vm", "ssh"]:
  (script,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  if "pip install" not in script:    # unpack for real; no installs here
    sys.exit(subprocess.run(["bash", "-c", script], cwd=os.environ["HOME"]).returncode)
else:
  sys.exit("fake gcloud: unexpected " + " ".join(argv))
'''


def test_install_tarball_private_and_removed_after_copy(tmp_path, monkeypatch):
  """The tarball lives in a fresh 0700 directory, not
  under a predictable /tmp name, and is gone after the copy; what reaches
  the workers leaves out .git and caches."""
  src = tmp_path / "src"
  (src / ".git").mkdir(parents=True)
  (src / ".git" / "HEAD").write_text("ref")
  (src / "gandl_jax" / "__pycache__").mkdir(parents=True)
  (src / "gandl_jax" / "__pycache__" / "x.pyc").write_text("")
  (src / "gandl_jax" / "train.py").write_text("")
  (src / "setup.py").write_text("")
  bin_dir, home, tmp = tmp_path / "bin", tmp_path / "home", tmp_path / "tmp"
  for d in (bin_dir, home, tmp):
    d.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\n{_FAKE_SCP_GCLOUD}")
  gcloud.chmod(0o755)
  log = tmp_path / "gcloud.log"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("TMPDIR", str(tmp))
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
  name = f"t{os.getpid()}"
  predictable = f"/tmp/gandl-jax-src-{name}.tar.gz"
  try:
    assert tpu_install.main(["--name", name, "--checkout", str(src)],
                            out=io.StringIO()) == 0
    (copy,) = [json.loads(l) for l in log.read_text().splitlines()]
    assert copy["dir_mode"] == 0o700 and copy["file_mode"] & 0o077 == 0
    assert copy["src"].startswith(str(tmp) + os.sep)
    assert not os.path.exists(copy["src"])
    assert os.listdir(tmp) == []             # the private directory is gone
    assert not os.path.exists(predictable)
    names = {str(p.relative_to(home / "gandl-jax"))
             for p in (home / "gandl-jax").rglob("*")}
    assert {"setup.py", "gandl_jax/train.py"} <= names
    assert not any(".git" in n or "__pycache__" in n for n in names)
    # A failed copy removes the directory too.
    gcloud.write_text("#!/bin/sh\nexit 5\n")
    assert tpu_install.main(["--name", name, "--checkout", str(src)],
                            out=io.StringIO()) == 5
    assert os.listdir(tmp) == []
  finally:
    if os.path.exists(predictable):
      os.remove(predictable)


def test_install_errors(tmp_path, capsys):
  assert "--git-ref needs --git-url" in error(
      tpu_install.main, ["--name", "gandl", "--git-ref", "main"], capsys)
  assert "has no setup.py" in error(
      tpu_install.main, ["--name", "gandl", "--checkout", str(tmp_path)],
      capsys)
  assert "--python-version: expected 3.X[.Y] or 'system'" in error(
      tpu_install.main, ["--name", "gandl", "--python-version", "py3"], capsys)
  assert "not allowed with argument" in error(
      tpu_install.main, ["--name", "gandl", "--checkout", str(REPO),
                         "--git-url", "https://x/y.git"], capsys)


# ------------------------------------------------------------------- train ---

@pytest.mark.e2e
def test_train_start_on_all_workers_with_gcs_paths():
  (line,) = dry(tpu_train.main, ["start", "--name", "gandl",
                                 "--bucket", BUCKET])
  assert line.startswith(SSH + " --worker=all '--command=")
  script = remote_script(line)
  assert "nohup bash -c " in script
  assert ">> gandl-train.log 2>&1 < /dev/null &" in script
  assert ('"$HOME"/gandl-venv/bin/gandl-train --config '
          f"configs/gandl_rxrx19a.py:256 --workdir {WORKDIR} "
          f"'\"'\"'--config.data.path={DATA}'\"'\"'") in script
  subprocess.run(["bash", "-n", "-c", script], check=True)


def test_train_start_explicit_paths_config_and_overrides():
  (line,) = dry(tpu_train.main, [
      "start", "--name", "gandl", "--zone", "europe-west4-a",
      "--config", "configs/gandl_rxrx19a.py:512", "--workdir",
      "gs://b2/runs/x/", "--data", "gs://b2/shards/*.tfrecord",
      "--set", "batch_size=32", "--set", "num_bf16_res=0"])
  script = remote_script(line)
  assert "--zone=europe-west4-a" in line
  assert ("--config configs/gandl_rxrx19a.py:512 --workdir gs://b2/runs/x "
          in script)
  assert "--config.batch_size=32 --config.num_bf16_res=0" in script


def test_train_bucket_defaults_follow_resolution():
  (line,) = dry(tpu_train.main, [
      "start", "--name", "gandl", "--bucket", "gs://my-bucket",
      "--config", "configs/gandl_rxrx19a.py:1024"])
  script = remote_script(line)
  assert "--workdir gs://my-bucket/gandl/rxrx19a-1024 " in script
  assert "gs://my-bucket/shards/rxrx19a-1024/*.tfrecord" in script


def test_train_status_stop_logs():
  (status,) = dry(tpu_train.main, ["status", "--name", "gandl"])
  assert remote_script(status) == tc.status_script()
  assert flag(status, "worker") == ["--worker=all"]
  (stop,) = dry(tpu_train.main, ["stop", "--name", "gandl"])
  assert 'kill -TERM "$(cat gandl-train.pid)"' in remote_script(stop)
  assert flag(stop, "worker") == ["--worker=all"]
  (logs,) = dry(tpu_train.main, ["logs", "--name", "gandl", "--worker", "3",
                                 "--lines", "20"])
  assert flag(logs, "worker") == ["--worker=3"]
  assert remote_script(logs) == "tail -n 20 gandl-train.log"


@pytest.mark.parametrize("argv,message", [
    (["start", "--name", "gandl"],
     "--bucket is required unless --workdir and --data are given"),
    (["start", "--name", "gandl", "--workdir", "gs://b/w"],
     "(missing: --data)"),
    (["start", "--name", "gandl", "--bucket", "my-bucket", "--workdir",
      "/tmp/w"], "--workdir: expected a gs:// path"),
    (["start", "--name", "gandl", "--bucket", "my-bucket", "--data",
      "shards/*.tfrecord"], "--data: expected a gs:// path"),
    (["start", "--name", "gandl", "--bucket", "gs://a/b"],
     "--bucket: expected a bucket name"),
    (["start", "--name", "gandl", "--bucket", "my-bucket", "--config",
      "configs/nope.py"], "--config: configs/nope.py not found"),
    (["start", "--name", "gandl", "--bucket", "my-bucket", "--config",
      "configs/demo.py"], "--data is required for --config configs/demo.py"),
    (["start", "--name", "gandl", "--bucket", "my-bucket", "--set",
      "batch_size"], "--set: expected KEY=VALUE"),
    (["start", "--name", "gandl", "--bucket", "my-bucket", "--set",
      "data.path=x"], "use --data instead"),
    (["start", "--name", "gandl", "--bucket", "my-bucket", "--bogus"],
     "unrecognized arguments: --bogus"),
    (["restart", "--name", "gandl"], "invalid choice: 'restart'"),
    (["logs", "--name", "gandl", "--worker", "x"], "--worker: expected"),
])
def test_train_errors(argv, message, capsys):
  assert message in error(tpu_train.main, argv, capsys)


def _wait_for(path, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)
  time.sleep(0.05)   # let the writer finish the line


def _bash(script, home, **env):
  return subprocess.run(["bash", "-c", script], cwd=home, text=True,
                        capture_output=True, timeout=20,
                        env={**os.environ, "HOME": str(home), **env})


@pytest.fixture
def fake_worker(tmp_path):
  """A worker home: gandl-jax/ and a gandl-train that records its argv."""
  (tmp_path / "gandl-jax").mkdir()
  bin_dir = tmp_path / "gandl-venv" / "bin"
  bin_dir.mkdir(parents=True)
  train = bin_dir / "gandl-train"
  train.write_text(
      "#!/bin/bash\n"
      'printf "%s\\n" "$@" > "$HOME/argv.txt"\n'
      'pwd > "$HOME/cwd.txt"\n'
      "echo training-output\n"
      'if [ -n "$FAKE_SLEEP" ]; then\n'
      '  trap \'touch "$HOME/got-term"; exit 0\' TERM\n'
      '  sleep "$FAKE_SLEEP" & wait $!\n'
      "fi\n"
      'exit "${FAKE_EXIT:-0}"\n')
  train.chmod(0o755)
  yield tmp_path
  pid_file = tmp_path / tc.TRAIN_PID
  if pid_file.exists():
    try:
      os.kill(int(pid_file.read_text()), 15)
    except (ProcessLookupError, ValueError):
      pass


@pytest.mark.e2e
def test_printed_start_script_runs_training_in_background(fake_worker):
  (line,) = dry(tpu_train.main, [
      "start", "--name", "gandl", "--bucket", BUCKET, "--set",
      "total_kimg=1.5"])
  home = fake_worker
  status = tc.status_script()
  assert _bash(status, home).stdout == f"{tc.STATUS_PREFIX} absent\n"
  started = _bash(remote_script(line), home, FAKE_EXIT="7")
  assert started.returncode == 0, started.stderr
  _wait_for(home / tc.TRAIN_EXIT)
  assert (home / "argv.txt").read_text().splitlines() == [
      "--config", "configs/gandl_rxrx19a.py:256", "--workdir", WORKDIR,
      f"--config.data.path={DATA}", "--config.total_kimg=1.5"]
  assert (home / "cwd.txt").read_text().strip() == str(home / "gandl-jax")
  assert "training-output" in (home / tc.TRAIN_LOG).read_text()
  assert _bash(status, home).stdout == f"{tc.STATUS_PREFIX} exited 7\n"
  assert tpu_watch.train_counts(_bash(status, home).stdout)["failed"] == 1


@pytest.mark.e2e
def test_printed_start_refuses_second_copy_and_stop_sends_sigterm(
    fake_worker):
  (start,) = dry(tpu_train.main, ["start", "--name", "gandl",
                                  "--bucket", BUCKET])
  (stop,) = dry(tpu_train.main, ["stop", "--name", "gandl"])
  home = fake_worker
  assert _bash(remote_script(start), home, FAKE_SLEEP="30").returncode == 0
  _wait_for(home / "argv.txt")
  _wait_for(home / tc.TRAIN_PID)
  status = tc.status_script()
  assert _bash(status, home).stdout == f"{tc.STATUS_PREFIX} running\n"
  again = _bash(remote_script(start), home, FAKE_SLEEP="30")
  assert again.returncode == 3
  assert "already running" in again.stderr
  assert "sent SIGTERM" in _bash(remote_script(stop), home).stdout
  _wait_for(home / tc.TRAIN_EXIT)
  assert (home / "got-term").exists()
  # A user's stop: the watcher reads "stopped", not a crash or a finish.
  assert _bash(status, home).stdout == f"{tc.STATUS_PREFIX} stopped\n"
  assert (home / tc.TRAIN_LOG).read_text().count("== start") == 1


# --------------------------------------------------------- export/evaluate ---

@pytest.mark.e2e
def test_export_and_evaluate_commands():
  lines = dry(tpu_export_evaluate.main, [
      "--name", "gandl", "--bucket", BUCKET, "--metadata",
      "gs://my-bucket/rxrx19a/metadata.csv"])
  assert len(lines) == 2
  assert flag(lines[0], "worker") == ["--worker=all"]
  # Every host writes its part straight to GCS; worker 0 merges.
  assert remote_script(lines[0]) == (
      'cd "$HOME"/gandl-jax && '
      f'"$HOME"/gandl-venv/bin/gandl-export --workdir {WORKDIR} '
      f"--data '{DATA}' --output {WORKDIR}/export/embeddings.parquet")
  over = dry(tpu_export_evaluate.main, [
      "--name", "gandl", "--bucket", BUCKET, "--stage", "export",
      "--overwrite"])
  assert remote_script(over[0]).endswith(
      f"--output {WORKDIR}/export/embeddings.parquet --overwrite")
  assert flag(lines[1], "worker") == ["--worker=0"]
  evaluate = remote_script(lines[1])
  assert evaluate.startswith(
      'mkdir -p "$HOME"/gandl-out && gcloud storage cp '
      f'{WORKDIR}/export/embeddings.parquet "$HOME"/gandl-out/embeddings.parquet')
  assert ("gcloud storage cp gs://my-bucket/rxrx19a/metadata.csv "
          '"$HOME"/gandl-out/metadata.csv') in evaluate
  assert ('"$HOME"/gandl-venv/bin/gandl-evaluate --embeddings '
          '"$HOME"/gandl-out/embeddings.parquet --metadata '
          '"$HOME"/gandl-out/metadata.csv --output "$HOME"/gandl-out/report'
          ) in evaluate
  assert evaluate.endswith(
      f'gcloud storage rsync --recursive "$HOME"/gandl-out/report '
      f"{WORKDIR}/report")
  for line in lines:
    subprocess.run(["bash", "-n", "-c", remote_script(line)], check=True)


def test_evaluate_alone_downloads_embeddings_and_takes_worker_path():
  lines = dry(tpu_export_evaluate.main, [
      "--name", "gandl", "--workdir", "gs://b2/w", "--stage", "evaluate",
      "--metadata", "/data/metadata.csv", "--report", "gs://b2/r"])
  assert len(lines) == 1
  script = remote_script(lines[0])
  assert ("gcloud storage cp gs://b2/w/export/embeddings.parquet "
          '"$HOME"/gandl-out/embeddings.parquet') in script
  assert "--metadata /data/metadata.csv --output" in script
  assert script.endswith('report gs://b2/r')


def test_export_alone_needs_no_metadata():
  lines = dry(tpu_export_evaluate.main, [
      "--name", "gandl", "--bucket", BUCKET, "--stage", "export",
      "--output", "gs://b2/e.parquet"])
  assert len(lines) == 1
  assert remote_script(lines[0]).endswith(" --output gs://b2/e.parquet")


@pytest.mark.parametrize("argv,message", [
    (["--bucket", BUCKET], "--metadata is required to evaluate"),
    (["--bucket", BUCKET, "--stage", "export", "--output", "/tmp/e.parquet"],
     "--output: expected a gs:// path"),
    (["--bucket", BUCKET, "--stage", "export", "--output", "gs://b/e.csv"],
     "--output: expected a .parquet file"),
    (["--stage", "evaluate", "--metadata", "m.csv"],
     "--bucket is required unless --workdir is given"),
    (["--bucket", BUCKET, "--stage", "train"], "invalid choice: 'train'"),
])
def test_export_evaluate_errors(argv, message, capsys):
  assert message in error(tpu_export_evaluate.main,
                          ["--name", "gandl", *argv], capsys)


# ------------------------------------------------------------------- watch ---

def _kind(line):
  """Labels a printed watcher line by what the command does."""
  if line.startswith("#"):
    return None
  if line.startswith("sleep "):
    return "sleep"
  argv = shlex.split(line)
  if argv[:2] == ["bash", "-c"] and "tpu-vm scp" in argv[2]:
    return "copy"
  if argv[3] in ("queued-resources", "tpu-vm") and argv[4] in (
      "create", "delete", "describe", "scp"):
    return argv[4]
  script = remote_script(line)
  for needle, kind in ((tc.STATUS_PREFIX, "status"), ("nohup", "start"),
                       ("kill -TERM", "stop"), ("pip install", "pip"),
                       ("tar -xzf", "unpack")):
    if needle in script:
      return kind
  raise AssertionError(line)


def _kinds(lines):
  return [k for k in map(_kind, lines) if k]


WATCH = ["--name", "gandl", "--bucket", BUCKET, "--interval", "60"]
INSTALL = ["copy", "unpack", "pip"]


def test_watch_plan_shows_every_branch():
  lines = dry(tpu_watch.main, [*WATCH, "--queued", "--spot",
                               "--delete-when-done"])
  assert _kinds(lines) == [
      "describe", "create", "delete", "create", *INSTALL, "start", "status",
      "stop", "start", "delete", "sleep"]
  creates = [l for l in lines if _kind(l) == "create"]
  assert all("--spot" in shlex.split(l) for l in creates)
  assert all(l.startswith("gcloud compute tpus queued-resources create")
             for l in creates)
  assert lines[-1] == "sleep 60"
  assert any("FAILED/SUSPENDED/SUSPENDING" in l for l in lines)


def test_watch_simulated_preemption_of_queued_resource():
  lines = dry(tpu_watch.main, [
      *WATCH, "--queued", "--spot", "--simulate",
      "ACTIVE/running,SUSPENDED,WAITING_FOR_RESOURCES,ACTIVE,"
      "ACTIVE/running+running,ACTIVE/done+done,ACTIVE/done+done"])
  assert _kinds(lines) == [
      "describe", "status", "sleep",
      "describe", "delete", "create", "sleep",        # preempted: recreate
      "describe", "sleep",                            # waiting for capacity
      "describe", *INSTALL, "start", "sleep",         # fresh: install, start
      "describe", "status", "sleep",
      "describe", "status", "sleep",                  # done once: confirm
      "describe", "status"]                           # done twice: finished
  assert lines[-1] == "# training finished"
  delete = [l for l in lines if _kind(l) == "delete"][0]
  assert delete == ("gcloud compute tpus queued-resources delete gandl-qr "
                    "--zone=us-central1-a --force --quiet")
  # The relaunch reuses the same workdir, so training resumes.
  start = remote_script([l for l in lines if _kind(l) == "start"][0])
  assert f"--workdir {WORKDIR} " in start


def test_watch_simulated_crash_restarts_then_gives_up():
  lines = dry(tpu_watch.main, [
      *WATCH, "--max-restarts", "1", "--simulate",
      "READY/failed+running,READY/failed+failed,READY/running,"
      "READY/failed+failed"], code=1)
  assert _kinds(lines) == [
      "describe", "status", "stop", "sleep",    # stop the survivor first
      "describe", "status", "start", "sleep",   # restart 1/1
      "describe", "status", "sleep",
      "describe", "status"]                     # second failure: give up
  assert "giving up" in lines[-1]


def test_watch_simulated_missing_vm_is_created_and_preempted_vm_recreated():
  lines = dry(tpu_watch.main, [
      *WATCH, "--preemptible", "--delete-when-done", "--simulate",
      "MISSING,CREATING,READY,PREEMPTED,READY,READY/done,READY/done"])
  assert _kinds(lines) == [
      "describe", "create", "sleep", "describe", "sleep",
      "describe", *INSTALL, "start", "sleep",
      "describe", "delete", "create", "sleep",
      "describe", *INSTALL, "start", "sleep",
      "describe", "status", "sleep", "describe", "status", "delete"]
  create = [l for l in lines if _kind(l) == "create"][0]
  assert create.startswith("gcloud compute tpus tpu-vm create gandl ")
  assert "--preemptible" in shlex.split(create)


def test_watch_done_then_preempted_is_not_finished():
  # Workers exit 0 after a preemption's SIGTERM checkpoint: one "done" poll
  # followed by a preemption must lead to a restart, not to the end.
  lines = dry(tpu_watch.main, [
      *WATCH, "--simulate", "READY/done,PREEMPTED,READY"])
  assert _kinds(lines) == [
      "describe", "status", "sleep", "describe", "delete", "create", "sleep",
      "describe", *INSTALL, "start", "sleep"]
  assert lines[-1] == "# end of simulated observations"


def test_watch_found_tpu_without_training_installs_and_starts():
  lines = dry(tpu_watch.main, [*WATCH, "--simulate", "READY/absent"])
  assert _kinds(lines) == ["describe", "status", *INSTALL, "start", "sleep"]


@pytest.mark.parametrize("argv,message", [
    (["--simulate", "READY"], "--simulate needs --dry-run"),
    (["--dry-run", "--simulate", "ACTIVE"], "unknown state 'ACTIVE'"),
    (["--dry-run", "--simulate", "READY/runing"],
     "unknown training status 'runing'"),
    (["--dry-run", "--simulate", "READY/running,READY"],
     "add /running, /done, /failed or /absent"),
    (["--interval", "0"], "--interval"),
])
def test_watch_errors(argv, message, capsys):
  assert message in error(tpu_watch.main, [*WATCH, *argv], capsys)


class _ScriptedRunner(runner_lib.Runner):
  """A live (not dry-run) runner answering probes from a script."""

  def __init__(self, answers):
    super().__init__(dry_run=False, out=io.StringIO())
    self.answers = list(answers)
    self.ran = []

  def run(self, cmd, check=True):
    self.ran.append(_kind(shlex.join(cmd)))
    return 0

  def query(self, cmd, simulated):
    self.ran.append(_kind(shlex.join(cmd)))
    return self.answers.pop(0)

  def sleep(self, seconds):
    self.ran.append("sleep")
    if not self.answers:
      raise KeyboardInterrupt


def test_watcher_live_mode_reads_gcloud_output():
  parser = tpu_watch.build_parser()
  args = parser.parse_args([*WATCH, "--queued"])
  tc.check_args(parser, args, create=True, install=True, run=True)
  running = f"Warning: x\n{tc.STATUS_PREFIX} running\n"
  runner = _ScriptedRunner([
      (0, "ACTIVE\n", ""), (0, running, ""),
      (1, "", "ERROR: (gcloud.compute.tpus) NOT_FOUND: gandl-qr"),
      (0, "PROVISIONING\n", ""),
      (0, "ACTIVE\n", ""),
      (0, "ACTIVE\n", ""), (255, "", "ssh: connect timed out")])
  with pytest.raises(KeyboardInterrupt):
    tpu_watch.Watcher(args, runner).loop()
  assert runner.ran == [
      "describe", "status", "sleep", "describe", "create", "sleep",
      "describe", "sleep", "describe", *INSTALL, "start", "sleep",
      "describe", "status", "sleep"]


def test_classify_state():
  c = tpu_watch.classify_state
  assert c(True, 0, "ACTIVE\n", "") == tpu_watch.READY
  assert c(True, 0, "SUSPENDED\n", "") == tpu_watch.PREEMPTED
  assert c(True, 0, "WAITING_FOR_RESOURCES\n", "") == tpu_watch.PENDING
  assert c(False, 0, "READY\n", "") == tpu_watch.READY
  assert c(False, 0, "PREEMPTED\n", "") == tpu_watch.PREEMPTED
  assert c(False, 0, "ACTIVE\n", "") == tpu_watch.UNKNOWN
  assert c(False, 1, "", "NOT_FOUND") == tpu_watch.MISSING
  assert c(False, 1, "", "network unreachable") == tpu_watch.UNKNOWN


# ---------------------------------------------------------------- GPU path ---

def test_gpu_install(monkeypatch):
  monkeypatch.chdir(REPO)
  assert dry(gpu_local.main, ["install"]) == [
      "python3 -m venv .venv",
      ".venv/bin/pip install -U pip",
      ".venv/bin/pip install -e .",
      ".venv/bin/pip install -U 'jax[cuda12]'",
      ".venv/bin/python -c " + shlex.quote(gpu_local._GPU_CHECK),
      ".venv/bin/python -c " + shlex.quote(gpu_local._TF_CHECK)]
  cpu = dry(gpu_local.main, ["install", "--cpu", "--venv", "/opt/v"])
  assert not any("cuda" in l for l in cpu)
  assert cpu[-1].startswith("/opt/v/bin/python -c ")


def test_gpu_train_env_and_flags(monkeypatch):
  monkeypatch.chdir(REPO)
  (line,) = dry(gpu_local.main, [
      "train", "--workdir", "runs/r256/", "--data", "shards/*.tfrecord",
      "--set", "batch_size=32", "--mem-fraction", "0.8"])
  assert line == (
      "env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 "
      "XLA_PYTHON_CLIENT_PREALLOCATE=true TF_CPP_MIN_LOG_LEVEL=1 "
      ".venv/bin/gandl-train --config configs/gandl_rxrx19a.py:256 "
      "--workdir runs/r256 '--config.data.path=shards/*.tfrecord' "
      "--config.batch_size=32")
  assert "CUDA_VISIBLE_DEVICES" not in line
  (line,) = dry(gpu_local.main, ["train", "--workdir", "w", "--data", "d",
                                 "--no-preallocate"])
  assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in line
  (line,) = dry(gpu_local.main, ["train", "--workdir", "w", "--data", "d",
                                 "--cpu"])
  assert line.startswith("env JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=1 ")


@pytest.mark.e2e
def test_gpu_train_background_and_config_path_from_elsewhere(
    monkeypatch, tmp_path):
  monkeypatch.chdir(REPO)
  (line,) = dry(gpu_local.main, ["train", "--workdir", "w", "--data", "d",
                                 "--background", "--log-file", "my log"])
  assert line.startswith("nohup env JAX_PLATFORMS=cuda ")
  assert line.endswith(" >> 'my log' 2>&1 < /dev/null &")
  subprocess.run(["bash", "-n", "-c", line], check=True)
  monkeypatch.chdir(tmp_path)
  (line,) = dry(gpu_local.main, ["train", "--workdir", "w", "--data", "d"])
  config = shlex.split(line)[shlex.split(line).index("--config") + 1]
  assert (tmp_path / config.partition(":")[0]).resolve() == (
      REPO / "configs" / "gandl_rxrx19a.py")


def test_gpu_all_stages(monkeypatch):
  monkeypatch.chdir(REPO)
  lines = dry(gpu_local.main, [
      "all", "--workdir", "runs/x", "--data", "s/*.tfrecord",
      "--metadata", "meta.csv", "--config", "configs/demo.py"])
  assert len(lines) == 3
  assert ".venv/bin/gandl-train --config configs/demo.py " in lines[0]
  assert lines[1].endswith(
      ".venv/bin/gandl-export --workdir runs/x --data 's/*.tfrecord' "
      "--output runs/x/export/embeddings.parquet")
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in lines[1]
  assert lines[2] == (
      ".venv/bin/gandl-evaluate --embeddings runs/x/export/embeddings.parquet "
      "--metadata meta.csv --output runs/x/report")
  # gandl-export refuses to replace embeddings unless told to.
  again = dry(gpu_local.main, [
      "export", "--workdir", "runs/x", "--data", "s/*.tfrecord",
      "--overwrite"])
  assert again[0].endswith(
      "--output runs/x/export/embeddings.parquet --overwrite")


@pytest.mark.parametrize("argv,message", [
    (["train", "--workdir", "w"], "the following arguments are required: "
     "--data"),
    (["train", "--workdir", "w", "--data", "d", "--mem-fraction", "1.5"],
     "--mem-fraction: expected a fraction"),
    (["train", "--workdir", "w", "--data", "d", "--set", "data.path=x"],
     "use --data instead"),
    (["evaluate", "--workdir", "w"], "required: --metadata"),
    (["evaluate", "--workdir", "w", "--metadata", "m", "--embeddings",
      "e.csv"], "--embeddings: expected a .parquet file"),
    (["all", "--workdir", "w", "--data", "d", "--metadata", "m",
      "--background"], "--background applies to 'train' only"),
    (["train", "--workdir", "w", "--data", "d", "--config",
      "configs/missing.py:64"], "--config: configs/missing.py not found"),
    (["serve"], "invalid choice: 'serve'"),
    (["install", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_gpu_errors(argv, message, capsys):
  assert message in error(gpu_local.main, argv, capsys)


# ------------------------------------------------- scripts as programs ---

@pytest.mark.e2e
@pytest.mark.parametrize("script,argv", [
    ("tpu_create.py", ["--name", "gandl"]),
    ("tpu_install.py", ["--name", "gandl"]),
    ("tpu_train.py", ["start", "--name", "gandl", "--bucket", BUCKET]),
    ("tpu_watch.py", ["--name", "gandl", "--bucket", BUCKET]),
    ("tpu_export_evaluate.py", ["--name", "gandl", "--bucket", BUCKET,
                                "--stage", "export"]),
    ("tpu_delete.py", ["--name", "gandl"]),
    ("gpu_local.py", ["install"]),
])
def test_scripts_run_as_programs_deterministically(script, argv, tmp_path):
  cmd = [sys.executable, str(LAUNCH / script), *argv, "--dry-run"]
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
  assert first.returncode == 0, first.stderr
  assert first.stdout and first.stderr == ""
  second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert second.stdout == first.stdout
  bad = subprocess.run([*cmd, "--no-such-flag"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2
  assert "unrecognized arguments: --no-such-flag" in bad.stderr
  assert bad.stdout == ""


# ------------------------------------------- live watcher, fake gcloud ---

_FAKE_GCLOUD = r'''
import os, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(" ".join(argv[2:4]) + "\n")
if argv[2:4] == ["tpu-vm", "describe"]:
  print("READY")
elif argv[2:4] == ["tpu-vm", "ssh"]:
  (script,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  sys.exit(subprocess.run(["bash", "-c", script], cwd=os.environ["HOME"]).returncode)
else:
  sys.exit("fake gcloud: unexpected " + " ".join(argv))
'''


def test_live_watcher_restarts_crashed_training_until_it_finishes(
    fake_worker, tmp_path_factory, monkeypatch):
  """The real loop, gcloud faked: the remote scripts run in a fake home."""
  home = fake_worker
  bin_dir = tmp_path_factory.mktemp("bin")
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\n{_FAKE_GCLOUD}")
  gcloud.chmod(0o755)
  # The trainer fails on its first run and succeeds on the second.
  train = home / "gandl-venv" / "bin" / "gandl-train"
  train.write_text(
      "#!/bin/bash\n"
      'echo run >> "$HOME/runs.txt"\n'
      '[ "$(wc -l < "$HOME/runs.txt")" -ge 2 ]\n')
  log = home / "gcloud.log"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
  (home / "runs.txt").write_text("run\n")    # that earlier run crashed...
  (home / tc.TRAIN_EXIT).write_text("1\n")   # ...with status 1
  naps = []

  def nap(seconds):
    naps.append(seconds)
    assert len(naps) < 40, "watcher never finished"
    time.sleep(0.1)

  code = tpu_watch.main([*WATCH, "--max-restarts", "2"],
                        out=io.StringIO(), sleep=nap)
  assert code == 0
  assert (home / "runs.txt").read_text().count("run") == 2
  assert (home / tc.TRAIN_EXIT).read_text().strip() == "0"
  calls = log.read_text().splitlines()
  # describe, status (exited 1), start; then describe + status per poll.
  assert calls[:3] == ["tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh"]
  assert set(calls) == {"tpu-vm describe", "tpu-vm ssh"}
  assert set(naps) == {60}
  assert "== start" in (home / tc.TRAIN_LOG).read_text()


def test_runner_live_run_query_and_timeout(tmp_path):
  runner = runner_lib.Runner(dry_run=False, out=io.StringIO())
  assert runner.run(["true"]) == 0
  with pytest.raises(runner_lib.CommandError, match="exit status 3"):
    runner.run(["bash", "-c", "exit 3"])
  assert runner.run(["bash", "-c", "exit 3"], check=False) == 3
  assert runner.query(["bash", "-c", "echo out; echo err >&2; exit 2"],
                      None) == (2, "out\n", "err\n")
  assert runner.query(["sleep", "5"], None, timeout=0.2)[0] == 124
  runner.run_shell(f"echo hi > {shlex.quote(str(tmp_path / 'f'))}")
  assert (tmp_path / "f").read_text() == "hi\n"


# ------------------------------------------- item 10: SIGTERM stop, 143 ---

def test_launchers_agree_with_gandl_train_on_the_sigterm_status():
  from gandl_jax import cli  # pylint: disable=import-outside-toplevel
  assert tc.EXIT_PREEMPTED == cli.EXIT_PREEMPTED == 143
  counts = tpu_watch.train_counts(
      f"{tc.STATUS_PREFIX} exited 143\n{tc.STATUS_PREFIX} stopped\n"
      f"{tc.STATUS_PREFIX} exited 0\n{tc.STATUS_PREFIX} exited 1\n")
  assert (counts["preempted"], counts["stopped"], counts["ok"],
          counts["failed"]) == (1, 1, 1, 1)
  assert tc.parse_train_status(f"{tc.STATUS_PREFIX} exited 143\n") == \
      "preempted"
  assert tc.parse_train_status(f"{tc.STATUS_PREFIX} stopped\n") == "stopped"


def test_watch_user_stop_is_respected_and_not_a_crash():
  lines = dry(tpu_watch.main, [
      *WATCH, "--max-restarts", "0", "--simulate",
      "READY/running+running,READY/stopped+running,READY/stopped+stopped"],
      code=0)
  assert _kinds(lines) == [
      "describe", "status", "sleep", "describe", "status", "sleep",
      "describe", "status"]
  assert "stopped by a user" in lines[-1] and "not restarting" in lines[-1]


def test_watch_sigterm_stop_restarts_without_using_max_restarts():
  # 143 then a preemption: recreate. 143 with the TPU still up: start again,
  # twice, with --max-restarts 0 (neither is a crash).
  lines = dry(tpu_watch.main, [
      *WATCH, "--max-restarts", "0", "--simulate",
      "READY/preempted,PREEMPTED,READY,READY/preempted+preempted,"
      "READY/preempted+preempted,READY/running,READY/preempted,"
      "READY/preempted,READY/running"])
  assert _kinds(lines) == [
      "describe", "status", "sleep",
      "describe", "delete", "create", "sleep",
      "describe", *INSTALL, "start", "sleep",
      "describe", "status", "sleep", "describe", "status", "start", "sleep",
      "describe", "status", "sleep",
      "describe", "status", "sleep", "describe", "status", "start", "sleep",
      "describe", "status", "sleep"]
  assert "giving up" not in "\n".join(lines)


def test_watcher_stops_survivors_without_the_user_marker():
  lines = dry(tpu_watch.main, [*WATCH, "--simulate", "READY/failed+running"])
  stop = [l for l in lines if _kind(l) == "stop"][0]
  assert tc.TRAIN_STOPPED not in remote_script(stop)
  (user_stop,) = dry(tpu_train.main, ["stop", "--name", "gandl"])
  assert f"touch {tc.TRAIN_STOPPED}" in remote_script(user_stop)


@pytest.mark.e2e
def test_printed_stop_leaves_marker_that_start_clears(fake_worker):
  (start,) = dry(tpu_train.main, ["start", "--name", "gandl",
                                  "--bucket", BUCKET])
  (stop,) = dry(tpu_train.main, ["stop", "--name", "gandl"])
  home = fake_worker
  assert _bash(remote_script(start), home, FAKE_SLEEP="30").returncode == 0
  _wait_for(home / tc.TRAIN_PID)
  _wait_for(home / "argv.txt")
  status = tc.status_script()
  assert "sent SIGTERM" in _bash(remote_script(stop), home).stdout
  _wait_for(home / tc.TRAIN_EXIT)
  assert _bash(status, home).stdout == f"{tc.STATUS_PREFIX} stopped\n"
  assert tpu_watch.train_counts(_bash(status, home).stdout)["stopped"] == 1
  assert _bash(remote_script(start), home, FAKE_EXIT="143").returncode == 0
  _wait_for(home / tc.TRAIN_EXIT)
  assert not (home / tc.TRAIN_STOPPED).exists()
  assert _bash(status, home).stdout == f"{tc.STATUS_PREFIX} exited 143\n"
