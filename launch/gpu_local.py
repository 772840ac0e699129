#!/usr/bin/env python3
"""GAN-DL on one local GPU (or this machine's CPU): install, train, export, evaluate.

  python3 launch/gpu_local.py install
  python3 launch/gpu_local.py train --workdir runs/rxrx19a-256 \\
      --data 'shards/rxrx19a-256/*.tfrecord' --set batch_size=32
  python3 launch/gpu_local.py export --workdir runs/rxrx19a-256 \\
      --data 'shards/rxrx19a-256/*.tfrecord'
  python3 launch/gpu_local.py evaluate --workdir runs/rxrx19a-256 \\
      --metadata rxrx19a/metadata.csv
  python3 launch/gpu_local.py all ...   # train, export, evaluate in a row

install: a venv with `pip install -e .` then `pip install -U "jax[cuda12]"`
(the CUDA 12 wheels bring their own CUDA libraries; only an NVIDIA driver is
needed), then checks that JAX sees the GPU and TensorFlow does not.

TensorFlow only feeds data (tf.data). setup.py installs tensorflow-cpu on Linux
x86_64, which cannot touch the GPU, so JAX gets all of it. Do not use
CUDA_VISIBLE_DEVICES="" for that: it would hide the GPU from JAX too. If a full
`tensorflow` is installed instead, replace it with tensorflow-cpu.

Memory: JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU memory at
start-up (--mem-fraction, default 0.9 here, 0.75 in JAX); --no-preallocate
allocates on demand instead (slower, can fragment, but leaves memory to other
processes). JAX_PLATFORMS=cuda makes a missing GPU an error, never a silent
fall-back to the CPU; --cpu runs on the CPU instead.
"""
import argparse
import os
import shlex
import sys
from typing import Dict, List, Optional

import runner as runner_lib
import tpu_commands as tc

DEFAULT_JAX_SPEC = "jax[cuda12]"
_GPU_CHECK = ('import jax; devices = jax.devices(); '
              'assert devices[0].platform == "gpu", '
              'f"JAX sees no GPU: {devices}"; print("JAX devices:", devices)')
_TF_CHECK = ('import tensorflow as tf; '
             'gpus = tf.config.list_physical_devices("GPU"); '
             'assert not gpus, f"TensorFlow sees {gpus}: install '
             'tensorflow-cpu so that only JAX uses the GPU"; '
             'print("TensorFlow", tf.__version__, "is CPU-only: OK")')


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--venv", default=".venv",
                      help="Virtual environment directory (default .venv).")
  common.add_argument("--dry-run", action="store_true",
                      help="Print the commands instead of running them.")

  device = argparse.ArgumentParser(add_help=False)
  device.add_argument("--mem-fraction", type=float, default=0.9,
                      help="XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9).")
  device.add_argument("--no-preallocate", action="store_true",
                      help="XLA_PYTHON_CLIENT_PREALLOCATE=false.")
  device.add_argument("--cpu", action="store_true",
                      help="Run on the CPU (JAX_PLATFORMS=cpu).")

  workdir = argparse.ArgumentParser(add_help=False)
  workdir.add_argument("--workdir", required=True,
                       help="Work directory (local or gs://); the same one "
                       "resumes from its latest checkpoint.")

  data = argparse.ArgumentParser(add_help=False)
  data.add_argument("--data", required=True,
                    help="Shard directory or glob (config.data.path).")

  training = argparse.ArgumentParser(add_help=False)
  training.add_argument("--config", default=tc.DEFAULT_CONFIG,
                        help=f"Config (default {tc.DEFAULT_CONFIG}).")
  tc.add_set_args(training)
  training.add_argument("--background", action="store_true",
                        help="Run under nohup in the background, output to "
                        "--log-file.")
  training.add_argument("--log-file", default="gandl-train.log",
                        help="Log of a --background run.")

  export = argparse.ArgumentParser(add_help=False)
  export.add_argument("--embeddings", default=None,
                      help="Embeddings parquet file "
                      "(default WORKDIR/export/embeddings.parquet).")
  export.add_argument("--overwrite", action="store_true",
                      help="Replace existing embeddings (gandl-export "
                      "refuses otherwise).")

  evaluate = argparse.ArgumentParser(add_help=False)
  evaluate.add_argument("--metadata", required=True,
                        help="metadata.csv of the dataset.")
  evaluate.add_argument("--report", default=None,
                        help="Report directory (default WORKDIR/report).")

  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="action", required=True,
                              metavar="{install,train,export,evaluate,all}")
  install = sub.add_parser("install", parents=[common],
                           help="venv + package + jax[cuda12], then checks")
  install.add_argument("--python", default="python3",
                       help="Interpreter that creates the venv.")
  install.add_argument("--jax-spec", default=DEFAULT_JAX_SPEC,
                       help=f"pip requirement for JAX (default "
                       f"'{DEFAULT_JAX_SPEC}').")
  install.add_argument("--cpu", action="store_true",
                       help="CPU-only machine: keep the plain jax wheel.")
  sub.add_parser("train", parents=[common, device, workdir, data, training],
                 help="gandl-train")
  sub.add_parser("export", parents=[common, device, workdir, data, export],
                 help="gandl-export")
  sub.add_parser("evaluate", parents=[common, workdir, export, evaluate],
                 help="gandl-evaluate")
  sub.add_parser("all", parents=[common, device, workdir, data, training,
                                 export, evaluate],
                 help="train, export and evaluate in a row")
  return parser


def device_env(args) -> Dict[str, str]:
  env = {"JAX_PLATFORMS": "cpu" if args.cpu else "cuda"}
  if not args.cpu:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{args.mem_fraction:g}"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = (
        "false" if args.no_preallocate else "true")
  env["TF_CPP_MIN_LOG_LEVEL"] = "1"
  return env


def _with_env(env: Dict[str, str], argv: List[str]) -> List[str]:
  return ["env", *[f"{k}={v}" for k, v in env.items()], *argv]


def from_cwd(path) -> str:
  """`path` relative to the current directory (commands run from there)."""
  return os.path.relpath(path)


def config_from_cwd(config: str) -> str:
  config_file, sep, arg = config.partition(":")
  return from_cwd(tc.REPO_ROOT / config_file) + sep + arg


def install_commands(args) -> List[List[str]]:
  pip = f"{args.venv}/bin/pip"
  python = f"{args.venv}/bin/python"
  cmds = [[args.python, "-m", "venv", args.venv],
          [pip, "install", "-U", "pip"],
          [pip, "install", "-e", from_cwd(tc.REPO_ROOT)]]
  if not args.cpu:
    cmds.append([pip, "install", "-U", args.jax_spec])
    cmds.append([python, "-c", _GPU_CHECK])
  cmds.append([python, "-c", _TF_CHECK])
  return cmds


def train_command(args) -> List[str]:
  argv = [f"{args.venv}/bin/gandl-train", "--config",
          config_from_cwd(args.config),
          "--workdir", args.workdir, f"--config.data.path={args.data}"]
  argv += [f"--config.{override}" for override in args.overrides]
  return _with_env(device_env(args), argv)


def export_command(args) -> List[str]:
  return _with_env(device_env(args), [
      f"{args.venv}/bin/gandl-export", "--workdir", args.workdir,
      "--data", args.data, "--output", args.embeddings]
      + (["--overwrite"] if args.overwrite else []))


def evaluate_command(args) -> List[str]:
  return [f"{args.venv}/bin/gandl-evaluate", "--embeddings", args.embeddings,
          "--metadata", args.metadata, "--output", args.report]


def check_args(parser: argparse.ArgumentParser, args) -> None:
  if args.action == "install":
    return
  args.workdir = args.workdir.rstrip("/") or args.workdir
  if getattr(args, "background", False) and args.action != "train":
    parser.error("--background applies to 'train' only")
  if hasattr(args, "embeddings") and args.embeddings is None:
    args.embeddings = f"{args.workdir}/export/embeddings.parquet"
  if hasattr(args, "embeddings") and not args.embeddings.endswith(".parquet"):
    parser.error(f"--embeddings: expected a .parquet file, "
                 f"got {args.embeddings!r}")
  if getattr(args, "report", None) is None and hasattr(args, "metadata"):
    args.report = f"{args.workdir}/report"
  if hasattr(args, "mem_fraction") and not 0.0 < args.mem_fraction <= 1.0:
    parser.error(f"--mem-fraction: expected a fraction in (0, 1], "
                 f"got {args.mem_fraction}")
  if hasattr(args, "config"):
    tc.check_config(parser, args.config)
    tc.check_overrides(parser, args.overrides)
  if hasattr(args, "data") and not args.data.strip():
    parser.error("--data: expected a shard directory or glob, got ''")


def main(argv: Optional[List[str]] = None, out=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_args(parser, args)
  runner = runner_lib.Runner(args.dry_run, out=out)
  try:
    if args.action == "install":
      for cmd in install_commands(args):
        runner.run(cmd)
      return 0
    if args.action in ("train", "all"):
      cmd = train_command(args)
      if args.background and args.action == "train":
        runner.run_shell(f"nohup {shlex.join(cmd)} >> "
                         f"{shlex.quote(args.log_file)} 2>&1 < /dev/null &")
        return 0
      runner.run(cmd)
    if args.action in ("export", "all"):
      runner.run(export_command(args))
    if args.action in ("evaluate", "all"):
      runner.run(evaluate_command(args))
  except runner_lib.CommandError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
