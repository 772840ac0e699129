#!/usr/bin/env python3
"""Installs gandl-jax with jax[tpu] on every worker of a Cloud TPU.

Copies this checkout (tar + `tpu-vm scp --worker=all`) or clones --git-url,
then on every worker: a venv ~/gandl-venv and
`pip install -e ./gandl-jax "jax[tpu]"` (TensorFlow comes as tensorflow-cpu,
so tf.data stays off the TPU).

  python3 launch/tpu_install.py --name gandl
  python3 launch/tpu_install.py --name gandl \\
      --git-url https://github.com/OWNER/gandl-jax.git --git-ref main --dry-run
"""
import argparse
import sys
from typing import List, Optional

import runner as runner_lib
import tpu_commands as tc


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  tc.add_target_args(parser)
  tc.add_install_args(parser)
  parser.add_argument("--dry-run", action="store_true",
                      help="Print the commands instead of running them.")
  return parser


def main(argv: Optional[List[str]] = None, out=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  tc.check_args(parser, args, install=True)
  return runner_lib.run_all(tc.install_commands(args), args.dry_run, out=out)


if __name__ == "__main__":
  sys.exit(main())
