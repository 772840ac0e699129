#!/usr/bin/env python3
"""Deletes the Cloud TPU (and, with --queued, its queued resource).

  python3 launch/tpu_delete.py --name gandl [--queued] [--dry-run]

Checkpoints, metrics and exports live in the gs:// workdir and survive; only
the workers' local files (~/gandl-train.log) go with the TPU.
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
  parser.add_argument("--dry-run", action="store_true",
                      help="Print the commands instead of running them.")
  return parser


def main(argv: Optional[List[str]] = None, out=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  tc.check_args(parser, args)
  return runner_lib.run_all(tc.delete_commands(args), args.dry_run, out=out)


if __name__ == "__main__":
  sys.exit(main())
