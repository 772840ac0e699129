"""Command-line options and `gcloud` command builders for Cloud TPU VMs.

Each builder returns argv lists (or, for remote work, the bash script that
`gcloud compute tpus tpu-vm ssh --command` runs on every worker). The scripts
`tpu_*.py` next to this file parse options with the `add_*_args` helpers,
check them with `check_args`, and hand the builders' commands to a `Runner`.

Layout on every TPU worker, relative to the login user's home directory:

  gandl-jax/         the source tree (copied from this checkout or cloned)
  gandl-venv/        virtual environment with `pip install -e gandl-jax jax[tpu]`
  gandl-train.log    training output of this worker (appended on restarts)
  gandl-train.pid    pid of the running `gandl-train`
  gandl-train.exit   exit status of the last finished `gandl-train`
  gandl-train.stopped  marker: a user stopped training on purpose
                     (`tpu_train.py stop`); the watcher does not restart it
  gandl-out/         local export and evaluation outputs before upload
"""
import argparse
import pathlib
import re
import shlex
from typing import List, Optional

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

REMOTE_SRC = "gandl-jax"
REMOTE_VENV = "gandl-venv"
TRAIN_LOG = "gandl-train.log"
TRAIN_PID = "gandl-train.pid"
TRAIN_EXIT = "gandl-train.exit"
TRAIN_STOPPED = "gandl-train.stopped"
# gandl-train's status after a clean SIGTERM stop (checkpoint saved), as
# gandl_jax.cli.EXIT_PREEMPTED (these scripts do not import gandl_jax).
EXIT_PREEMPTED = 143
REMOTE_OUT = "gandl-out"

DEFAULT_ACCELERATOR = "v3-8"
# A zone that offers v3-8 (https://cloud.google.com/tpu/docs/regions-zones).
DEFAULT_ZONE = "us-central1-a"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_PYTHON = "3.12"
DEFAULT_CONFIG = "configs/gandl_rxrx19a.py:256"
# TPU software version for JAX per generation
# (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_BY_GENERATION = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Files a source copy leaves out (version control, environments, outputs).
TAR_EXCLUDES = (".git", ".venv", "venv", "__pycache__", "*.egg-info", "runs",
                ".pytest_cache")

_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,58}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z0-9]+$")
_ACCEL_RE = re.compile(r"^(v[0-9]+[a-z]*)-([0-9]+)$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def home(rel: str) -> str:
  """A path under the remote home directory, for use inside remote scripts."""
  return f'"$HOME"/{rel}'


# ---------------------------------------------------------------- options ---

def add_target_args(parser: argparse.ArgumentParser) -> None:
  """The TPU to act on: node name, zone, project, queued resource or not."""
  group = parser.add_argument_group("TPU")
  group.add_argument("--name", required=True,
                     help="TPU node name (lowercase letters, digits, '-').")
  group.add_argument("--zone", default=DEFAULT_ZONE,
                     help=f"Zone (default {DEFAULT_ZONE}, which has v3-8).")
  group.add_argument("--project", default=None,
                     help="GCP project (default: gcloud's core/project).")
  group.add_argument("--queued", action="store_true",
                     help="The TPU is (or is created as) the node of a "
                     "queued resource instead of a plain TPU VM.")
  group.add_argument("--queued-resource-id", default=None,
                     help="Queued resource ID (default: NAME-qr).")


def add_create_args(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("creation")
  group.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR,
                     help="TPU type and slice size, e.g. v3-8, v3-32, v4-8, "
                     f"v5litepod-8 (default {DEFAULT_ACCELERATOR}).")
  group.add_argument("--runtime-version", default=None,
                     help="TPU software version (default: the JAX one for the "
                     "accelerator's generation, e.g. tpu-ubuntu2204-base).")
  group.add_argument("--spot", action="store_true",
                     help="Spot capacity: cheaper, may be preempted.")
  group.add_argument("--preemptible", action="store_true",
                     help="Legacy preemptible TPU VM (plain VMs only; "
                     "prefer --spot).")
  group.add_argument("--service-account", default=None,
                     help="Service account of the workers (default: the "
                     "Compute Engine default one); it needs read/write "
                     "access to the bucket.")
  group.add_argument("--scopes", default=CLOUD_PLATFORM_SCOPE,
                     help="Access scopes (default cloud-platform: access is "
                     "then decided by the account's IAM roles alone).")


def add_install_args(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("installation")
  source = group.add_mutually_exclusive_group()
  source.add_argument("--git-url", default=None,
                      help="Clone this repository URL on every worker instead "
                      "of copying the local checkout.")
  source.add_argument("--checkout", default=str(REPO_ROOT),
                      help="Local source tree to copy to every worker "
                      "(default: the checkout holding this script).")
  group.add_argument("--git-ref", default=None,
                     help="Branch, tag or commit to check out (--git-url).")
  group.add_argument("--python-version", default=DEFAULT_PYTHON,
                     help=f"Python of the workers' venv (default "
                     f"{DEFAULT_PYTHON}, fetched with uv: the images' own "
                     f"Python 3.10 only gets old JAX releases), or 'system' "
                     f"for the image's python3.")
  group.add_argument("--jax-spec", default="jax[tpu]",
                     help="pip requirement for JAX (default 'jax[tpu]').")
  group.add_argument("--check-devices", action="store_true",
                     help="After installing, start JAX on all workers and "
                     "print process index and device counts.")


def add_run_args(parser: argparse.ArgumentParser) -> None:
  """Where training reads and writes: bucket-derived or explicit gs:// paths."""
  group = parser.add_argument_group("run")
  group.add_argument("--bucket", default=None,
                     help="GCS bucket (name or gs://name). Gives the defaults "
                     "--workdir gs://BUCKET/gandl/RUN and "
                     "--data gs://BUCKET/shards/rxrx19a-RES/*.tfrecord.")
  group.add_argument("--config", default=DEFAULT_CONFIG,
                     help="Config file relative to the repository, with its "
                     f"argument (default {DEFAULT_CONFIG}).")
  group.add_argument("--run-name", default=None,
                     help="Run name in the default workdir "
                     "(default rxrx19a-RES).")
  group.add_argument("--workdir", default=None,
                     help="gs:// work directory (checkpoints, metrics); "
                     "the same on every restart so training resumes.")
  group.add_argument("--data", default=None,
                     help="gs:// shard directory or glob for "
                     "config.data.path.")


def add_set_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE",
                      help="Config override, passed as --config.KEY=VALUE "
                      "(repeatable), e.g. --set batch_size=32.")


# ------------------------------------------------------------- validation ---

def config_resolution(config: str) -> Optional[int]:
  """The resolution a config spec selects, as the config files read it."""
  path, _, arg = config.partition(":")
  tokens = [t for t in arg.split(",") if t]
  if tokens and tokens[0].isdigit():
    return int(tokens[0])
  if pathlib.Path(path).name == "gandl_rxrx19a.py":
    return 256
  return None


def normalize_bucket(bucket: str) -> str:
  name = bucket[len("gs://"):] if bucket.startswith("gs://") else bucket
  name = name.rstrip("/")
  if "/" in name or not _BUCKET_RE.match(name):
    raise ValueError(f"--bucket: expected a bucket name like 'my-bucket' or "
                     f"'gs://my-bucket', got {bucket!r}")
  return name


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
               *, create: bool = False, install: bool = False,
               run: bool = False, data: bool = True) -> None:
  """Validates and completes parsed options; errors exit via parser.error."""
  if not _NAME_RE.match(args.name):
    parser.error(f"--name: expected 1-60 lowercase letters, digits or '-', "
                 f"starting with a letter, got {args.name!r}")
  if not _ZONE_RE.match(args.zone):
    parser.error(f"--zone: expected a zone like us-central1-a, "
                 f"got {args.zone!r}")
  if args.queued_resource_id is None:
    args.queued_resource_id = f"{args.name}-qr"
  elif not _NAME_RE.match(args.queued_resource_id):
    parser.error(f"--queued-resource-id: expected lowercase letters, digits "
                 f"or '-', got {args.queued_resource_id!r}")

  if create:
    match = _ACCEL_RE.match(args.accelerator_type)
    if not match:
      parser.error(f"--accelerator-type: expected GENERATION-SIZE like v3-8 "
                   f"or v5litepod-16, got {args.accelerator_type!r}")
    if args.runtime_version is None:
      generation = match.group(1)
      if generation not in RUNTIME_BY_GENERATION:
        parser.error(f"--runtime-version is required for "
                     f"{args.accelerator_type} (no default for generation "
                     f"{generation}; known: "
                     f"{', '.join(sorted(RUNTIME_BY_GENERATION))})")
      args.runtime_version = RUNTIME_BY_GENERATION[generation]
    if args.spot and args.preemptible:
      parser.error("--spot and --preemptible are alternatives; pick one")
    if args.preemptible and args.queued:
      parser.error("--preemptible applies to plain TPU VMs; queued resources "
                   "use --spot")

  if install:
    if args.python_version != "system" and not re.match(
        r"^3\.[0-9]+(\.[0-9]+)?$", args.python_version):
      parser.error(f"--python-version: expected 3.X[.Y] or 'system', "
                   f"got {args.python_version!r}")
    if args.git_ref and not args.git_url:
      parser.error("--git-ref needs --git-url")
    if not args.git_url and not pathlib.Path(args.checkout, "setup.py").is_file():
      parser.error(f"--checkout: {args.checkout} has no setup.py; expected "
                   f"the root of a gandl-jax source tree")

  if run:
    _check_run_args(parser, args, data=data)


def _check_run_args(parser, args, *, data: bool) -> None:
  config_file = check_config(parser, args.config)
  bucket = None
  if args.bucket is not None:
    try:
      bucket = normalize_bucket(args.bucket)
    except ValueError as e:
      parser.error(str(e))
  resolution = config_resolution(args.config)
  run_name = args.run_name or (
      f"rxrx19a-{resolution}" if resolution else
      pathlib.Path(config_file).stem)
  needed = ["--workdir"] + (["--data"] if data else [])
  missing = [flag for flag in needed
             if getattr(args, flag[2:]) is None]
  if missing and bucket is None:
    parser.error(f"--bucket is required unless {' and '.join(needed)} "
                 f"{'are' if len(needed) > 1 else 'is'} given "
                 f"(missing: {', '.join(missing)})")
  if args.workdir is None:
    args.workdir = f"gs://{bucket}/gandl/{run_name}"
  if data and args.data is None:
    if resolution is None:
      parser.error(f"--data is required for --config {args.config} "
                   f"(no resolution to name the default shard directory)")
    args.data = f"gs://{bucket}/shards/rxrx19a-{resolution}/*.tfrecord"
  # Every worker reads and writes these: they must be shared storage.
  for flag in needed:
    value = getattr(args, flag[2:])
    if not value.startswith("gs://") or len(value) <= len("gs://"):
      parser.error(f"{flag}: expected a gs:// path (all TPU workers share "
                   f"it and it survives preemption), got {value!r}")
  args.workdir = args.workdir.rstrip("/")
  check_overrides(parser, getattr(args, "overrides", []))


def check_config(parser: argparse.ArgumentParser, config: str) -> str:
  """Checks a FILE.py[:ARG] config spec; returns FILE.py."""
  config_file = config.partition(":")[0]
  if not config_file.endswith(".py"):
    parser.error(f"--config: expected FILE.py[:ARG], got {config!r}")
  if not (REPO_ROOT / config_file).is_file():
    parser.error(f"--config: {config_file} not found in {REPO_ROOT} "
                 f"(paths are relative to the repository root)")
  return config_file


def check_overrides(parser: argparse.ArgumentParser,
                    overrides: List[str]) -> None:
  for override in overrides:
    key, sep, _ = override.partition("=")
    if not sep or not _KEY_RE.match(key):
      parser.error(f"--set: expected KEY=VALUE with a dotted config key, "
                   f"got {override!r}")
    if key == "data.path":
      parser.error("--set data.path=...: use --data instead")


# --------------------------------------------------------------- builders ---

def _scope(args) -> List[str]:
  scope = [f"--zone={args.zone}"]
  if args.project:
    scope.append(f"--project={args.project}")
  return scope


def create_commands(args) -> List[List[str]]:
  """Creates the TPU VM, or the queued resource whose node it is."""
  if args.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create",
           args.queued_resource_id, *_scope(args), f"--node-id={args.name}",
           f"--accelerator-type={args.accelerator_type}",
           f"--runtime-version={args.runtime_version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name,
           *_scope(args), f"--accelerator-type={args.accelerator_type}",
           f"--version={args.runtime_version}"]
  if args.spot:
    cmd.append("--spot")
  if args.preemptible:
    cmd.append("--preemptible")
  if args.service_account:
    cmd.append(f"--service-account={args.service_account}")
  if args.scopes:
    cmd.append(f"--scopes={args.scopes}")
  return [cmd]


def describe_command(args) -> List[str]:
  """Prints one word: the queued resource's or the VM's state."""
  if args.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe",
            args.queued_resource_id, *_scope(args),
            "--format=value(state.state)"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name,
          *_scope(args), "--format=value(state)"]


def delete_commands(args) -> List[List[str]]:
  if args.queued:
    # --force also deletes the node the queued resource holds.
    return [["gcloud", "compute", "tpus", "queued-resources", "delete",
             args.queued_resource_id, *_scope(args), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name,
           *_scope(args), "--quiet"]]


def ssh_command(args, script: str, worker: str = "all") -> List[str]:
  """Runs the bash `script` on `worker` ('all' or an index) of the TPU."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name,
          *_scope(args), f"--worker={worker}", f"--command={script}"]


def copy_source_command(args) -> List[str]:
  """Packs the checkout and copies it to every worker, as one local command.

  The tarball goes into a fresh private directory (`mktemp -d`: a random
  name, mode 0700, so no other local user can read the source or plant a
  file or symlink under a name they guessed) that is removed when the copy
  ends, whether it succeeded or not.
  """
  tar = ["tar", "-czf", '"$d"/src.tar.gz',
         *[shlex.quote(f"--exclude={pattern}") for pattern in TAR_EXCLUDES],
         "-C", shlex.quote(str(args.checkout)), "."]
  scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", '"$d"/src.tar.gz',
         shlex.quote(f"{args.name}:{REMOTE_SRC}.tar.gz"),
         *[shlex.quote(a) for a in _scope(args)], "--worker=all"]
  script = ('set -eu; umask 077; d="$(mktemp -d "${TMPDIR:-/tmp}/'
            'gandl-jax-src.XXXXXXXX")"; trap \'rm -rf "$d"\' EXIT; '
            + " ".join(tar) + "; " + " ".join(scp))
  return ["bash", "-c", script]


def install_commands(args) -> List[List[str]]:
  """Puts the source on every worker and pip-installs it with jax[tpu]."""
  cmds = []
  if args.git_url:
    fetch = (f"rm -rf {REMOTE_SRC} && git clone "
             f"{shlex.quote(args.git_url)} {REMOTE_SRC}")
    if args.git_ref:
      fetch += f" && git -C {REMOTE_SRC} checkout {shlex.quote(args.git_ref)}"
    cmds.append(ssh_command(args, fetch))
  else:
    cmds.append(copy_source_command(args))
    cmds.append(ssh_command(
        args, f"rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC} && "
        f"tar -xzf {REMOTE_SRC}.tar.gz -C {REMOTE_SRC}"))
  pip = f"{REMOTE_VENV}/bin/pip"
  if args.python_version == "system":
    # Ubuntu images may lack the venv module; install it only when needed.
    venv = (f"{{ python3 -m venv {REMOTE_VENV} || {{ sudo apt-get -qq update "
            f"&& sudo apt-get -qq install -y python3-venv && "
            f"python3 -m venv {REMOTE_VENV}; }}; }}")
  else:
    # uv fetches a standalone CPython; --seed puts pip in the venv.
    venv = (f"python3 -m pip install -q --user -U uv && rm -rf {REMOTE_VENV} "
            f"&& {home('.local/bin/uv')} venv -q --seed --python "
            f"{shlex.quote(args.python_version)} {REMOTE_VENV}")
  cmds.append(ssh_command(
      args, f"{venv} && {pip} install -q -U pip && "
      f"{pip} install -q -e ./{REMOTE_SRC} {shlex.quote(args.jax_spec)} && "
      f"{REMOTE_VENV}/bin/python -c "
      f"{shlex.quote('import gandl_jax, jax; print(jax.__version__)')}"))
  if args.check_devices:
    probe = ('import jax; from gandl_jax import sharding; '
             'sharding.maybe_initialize_distributed(); '
             'print("process", jax.process_index(), "local devices", '
             'jax.local_device_count(), "devices", jax.device_count())')
    cmds.append(ssh_command(
        args, f"{REMOTE_VENV}/bin/python -c {shlex.quote(probe)}"))
  return cmds


def train_argv(args) -> List[str]:
  """gandl-train's flags (the program path is added by the caller)."""
  argv = ["--config", args.config, "--workdir", args.workdir,
          f"--config.data.path={args.data}"]
  argv += [f"--config.{override}" for override in args.overrides]
  return argv


_RUNNING = (f'[ -f {TRAIN_PID} ] && kill -0 "$(cat {TRAIN_PID})" '
            f"2>/dev/null")


def start_script(args) -> str:
  """Starts gandl-train in the background under nohup on one worker.

  The inner bash records gandl-train's own pid (so SIGTERM reaches it and it
  checkpoints) and its exit status (so the watcher can tell done from crashed).
  A second start while one runs is refused, never doubled.
  """
  inner = (f"cd {home(REMOTE_SRC)} || exit 1; "
           f"{home(REMOTE_VENV)}/bin/gandl-train {shlex.join(train_argv(args))}"
           f" & echo $! > {home(TRAIN_PID)}; wait $!; "
           f"echo $? > {home(TRAIN_EXIT)}")
  return (f"if {_RUNNING}; then echo \"gandl-train already running on "
          f"$(hostname) (pid $(cat {TRAIN_PID}))\" >&2; exit 3; fi; "
          f"rm -f {TRAIN_EXIT} {TRAIN_PID} {TRAIN_STOPPED}; "
          f"echo \"== start $(date -u +%FT%TZ)\" >> {TRAIN_LOG}; "
          f"nohup bash -c {shlex.quote(inner)} >> {TRAIN_LOG} 2>&1 "
          f"< /dev/null & "
          f"echo \"gandl-train started on $(hostname), log ~/{TRAIN_LOG}\"")


STATUS_PREFIX = "gandl-train-status:"


def status_script() -> str:
  """Prints one line per worker: '<prefix> running|absent|stopped|exited N'
  ('stopped': ended after a user's `stop`, see TRAIN_STOPPED)."""
  return (f"if {_RUNNING}; then echo {STATUS_PREFIX} running; "
          f"elif [ -f {TRAIN_STOPPED} ] && [ -f {TRAIN_EXIT} ]; then "
          f"echo {STATUS_PREFIX} stopped; "
          f"elif [ -f {TRAIN_EXIT} ]; then echo {STATUS_PREFIX} exited "
          f"\"$(cat {TRAIN_EXIT})\"; else echo {STATUS_PREFIX} absent; fi")


def stop_script(user: bool = True) -> str:
  """SIGTERM to gandl-train (it saves a checkpoint and exits 143). A user's
  stop (`user`) first leaves the TRAIN_STOPPED marker, so that tpu_watch.py
  neither restarts training nor counts it as a crash; the watcher's own
  stop of surviving workers after a crash leaves none."""
  mark = f"touch {TRAIN_STOPPED} && " if user else ""
  return (f"if {_RUNNING}; then {mark}kill -TERM \"$(cat {TRAIN_PID})\" && "
          f"echo \"sent SIGTERM to gandl-train on $(hostname)\"; "
          f"else echo \"no gandl-train running on $(hostname)\"; fi")


def logs_script(lines: int) -> str:
  return f"tail -n {int(lines)} {TRAIN_LOG}"


def parse_train_status(stdout: str) -> str:
  """Combines the workers' status lines: running, done, failed or absent.

  failed if any worker's run exited non-zero (other than a SIGTERM stop);
  running if any still runs; stopped if a user stopped it; preempted if it
  stopped on SIGTERM (status EXIT_PREEMPTED, checkpoint saved); done if
  every reporting worker exited 0; absent if none ever started.
  """
  states = []
  for line in stdout.splitlines():
    line = line.strip()
    if line.startswith(STATUS_PREFIX):
      states.append(line[len(STATUS_PREFIX):].strip())
  if not states:
    return "unknown"
  signal_stop = f"exited {EXIT_PREEMPTED}"
  if any(s.startswith("exited") and s.split()[-1] not in
         ("0", str(EXIT_PREEMPTED)) for s in states):
    return "failed"
  if "running" in states:
    return "running"
  if "stopped" in states:
    return "stopped"
  if signal_stop in states:
    return "preempted"
  if all(s == "exited 0" for s in states):
    return "done"
  if "absent" in states and not any(s.startswith("exited") for s in states):
    return "absent"
  return "failed"   # a mix of finished and never-started workers


# ------------------------------------------------- export and evaluation ---

def export_commands(args) -> List[List[str]]:
  """gandl-export on all workers (JAX spans the slice). The output is on GCS,
  which every worker sees: each host writes OUTPUT.part-N there and worker 0
  merges them into OUTPUT."""
  export = (f"cd {home(REMOTE_SRC)} && "
            f"{home(REMOTE_VENV)}/bin/gandl-export "
            + shlex.join(["--workdir", args.workdir, "--data", args.data,
                          "--output", args.output]
                         + (["--overwrite"] if getattr(args, "overwrite",
                                                       False) else [])))
  return [ssh_command(args, export)]


def evaluate_commands(args, local_embeddings: str,
                      download: bool) -> List[List[str]]:
  """gandl-evaluate on worker 0 (CPU work), report synced to GCS."""
  steps = [f"mkdir -p {home(REMOTE_OUT)}"]
  if download:
    steps.append(f"gcloud storage cp {shlex.quote(args.output)} "
                 f"{local_embeddings}")
  metadata = shlex.quote(args.metadata)
  if args.metadata.startswith("gs://"):
    metadata = home(f"{REMOTE_OUT}/metadata.csv")
    steps.append(f"gcloud storage cp {shlex.quote(args.metadata)} {metadata}")
  report = home(f"{REMOTE_OUT}/report")
  steps.append(f"cd {home(REMOTE_SRC)}")
  steps.append(f"{home(REMOTE_VENV)}/bin/gandl-evaluate --embeddings "
               f"{local_embeddings} --metadata {metadata} --output {report}")
  steps.append(f"gcloud storage rsync --recursive {report} "
               f"{shlex.quote(args.report)}")
  return [ssh_command(args, " && ".join(steps), worker="0")]
