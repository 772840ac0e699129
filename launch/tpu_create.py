#!/usr/bin/env python3
"""Creates the Cloud TPU for GAN-DL: a TPU VM, or a queued resource (--queued).

  python3 launch/tpu_create.py --name gandl                      # v3-8 VM
  python3 launch/tpu_create.py --name gandl --queued --spot --wait
  python3 launch/tpu_create.py --name gandl --accelerator-type v4-32 \\
      --zone us-central2-b --project my-project --dry-run

The runtime version defaults to the JAX software version of the accelerator's
generation (tpu-ubuntu2204-base for v2-v4). A queued resource waits for
capacity; --wait polls it until ACTIVE.
"""
import argparse
import sys
from typing import List, Optional

import runner as runner_lib
import tpu_commands as tc
import tpu_watch


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  tc.add_target_args(parser)
  tc.add_create_args(parser)
  parser.add_argument("--wait", action="store_true",
                      help="Poll until the TPU is ready.")
  parser.add_argument("--interval", type=int, default=60,
                      help="Seconds between polls with --wait (default 60).")
  parser.add_argument("--dry-run", action="store_true",
                      help="Print the commands instead of running them.")
  return parser


def wait_ready(args, runner: runner_lib.Runner) -> int:
  if runner.dry_run:
    runner.comment(f"--wait: repeat every {args.interval} s until the state "
                   f"is {'ACTIVE' if args.queued else 'READY'}")
    runner.run(tc.describe_command(args))
    return 0
  while True:
    rc, out, err = runner.query(tc.describe_command(args), lambda: None)
    state = tpu_watch.classify_state(args.queued, rc, out, err)
    if state == tpu_watch.READY:
      runner.comment(f"{args.name} is ready")
      return 0
    if state in (tpu_watch.PREEMPTED, tpu_watch.MISSING):
      print(f"error: {args.name} is {out.strip() or err.strip()}; "
            f"delete it and create it again", file=sys.stderr)
      return 1
    runner.comment(f"{args.name}: {out.strip() or 'state unknown'}; waiting")
    runner.sleep(args.interval)


def main(argv: Optional[List[str]] = None, out=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  tc.check_args(parser, args, create=True)
  if args.interval < 1:
    parser.error(f"--interval: expected a positive number of seconds, "
                 f"got {args.interval}")
  runner = runner_lib.Runner(args.dry_run, out=out)
  try:
    for cmd in tc.create_commands(args):
      runner.run(cmd)
  except runner_lib.CommandError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.returncode
  return wait_ready(args, runner) if args.wait else 0


if __name__ == "__main__":
  sys.exit(main())
