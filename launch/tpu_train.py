#!/usr/bin/env python3
"""Starts, inspects and stops GAN-DL training on every worker of a Cloud TPU.

  python3 launch/tpu_train.py start --name gandl --bucket my-bucket
  python3 launch/tpu_train.py status --name gandl
  python3 launch/tpu_train.py logs --name gandl [--worker 0] [--lines 50]
  python3 launch/tpu_train.py stop --name gandl

`start` runs on all workers (`--worker=all`, as multi-host JAX needs):

  gandl-train --config configs/gandl_rxrx19a.py:256 \\
      --workdir gs://BUCKET/gandl/rxrx19a-256 \\
      --config.data.path='gs://BUCKET/shards/rxrx19a-256/*.tfrecord'

in the background under nohup (an ssh disconnect does not stop it), with the
output appended to ~/gandl-train.log on each worker. Running `start` again with
the same --workdir resumes from the latest checkpoint there; a second copy is
refused while one runs. `stop` sends SIGTERM, on which training saves a
checkpoint and exits. For restarts after preemption use tpu_watch.py.
"""
import argparse
import sys
from typing import List, Optional

import runner as runner_lib
import tpu_commands as tc


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  tc.add_target_args(common)
  common.add_argument("--dry-run", action="store_true",
                      help="Print the commands instead of running them.")
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="action", required=True,
                              metavar="{start,status,stop,logs}")
  start = sub.add_parser("start", parents=[common],
                         help="start training on all workers")
  tc.add_run_args(start)
  tc.add_set_args(start)
  sub.add_parser("status", parents=[common],
                 help="running / exited N / absent, per worker")
  sub.add_parser("stop", parents=[common],
                 help="SIGTERM: checkpoint and exit, on all workers")
  logs = sub.add_parser("logs", parents=[common],
                        help="tail of ~/gandl-train.log")
  logs.add_argument("--worker", default="0",
                    help="Worker index or 'all' (default 0).")
  logs.add_argument("--lines", type=int, default=50,
                    help="Lines to show (default 50).")
  return parser


def commands(args) -> List[List[str]]:
  if args.action == "start":
    return [tc.ssh_command(args, tc.start_script(args))]
  if args.action == "status":
    return [tc.ssh_command(args, tc.status_script())]
  if args.action == "stop":
    return [tc.ssh_command(args, tc.stop_script())]
  return [tc.ssh_command(args, tc.logs_script(args.lines), worker=args.worker)]


def main(argv: Optional[List[str]] = None, out=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  tc.check_args(parser, args, run=args.action == "start")
  if args.action == "logs":
    if args.worker != "all" and not args.worker.isdigit():
      parser.error(f"--worker: expected a worker index or 'all', "
                   f"got {args.worker!r}")
    if args.lines < 1:
      parser.error(f"--lines: expected a positive count, got {args.lines}")
  return runner_lib.run_all(commands(args), args.dry_run, out=out)


if __name__ == "__main__":
  sys.exit(main())
