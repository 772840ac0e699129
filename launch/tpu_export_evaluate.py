#!/usr/bin/env python3
"""Exports GAN-DL embeddings on a Cloud TPU and evaluates them.

  python3 launch/tpu_export_evaluate.py --name gandl --bucket my-bucket \\
      --metadata gs://my-bucket/rxrx19a/metadata.csv

export (all workers, as JAX spans the whole slice):
  gandl-export --workdir W --data 'SHARDS' --output ~/gandl-out/embeddings.parquet
  then worker 0 uploads it to --output (default W/export/embeddings.parquet).
evaluate (worker 0; scikit-learn on the CPU):
  gandl-evaluate --embeddings FILE --metadata metadata.csv --output DIR
  then syncs DIR to --report (default W/report).

--stage export or --stage evaluate runs one half; evaluate alone downloads
--output first. To evaluate on your own machine instead, copy the parquet file
down and run gandl-evaluate there (docs/launch.md).
"""
import argparse
import sys
from typing import List, Optional

import runner as runner_lib
import tpu_commands as tc

LOCAL_EMBEDDINGS = tc.home(f"{tc.REMOTE_OUT}/embeddings.parquet")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  tc.add_target_args(parser)
  tc.add_run_args(parser)
  group = parser.add_argument_group("export and evaluation")
  group.add_argument("--stage", choices=("both", "export", "evaluate"),
                     default="both", help="What to run (default both).")
  group.add_argument("--output", default=None,
                     help="gs:// path of the embeddings parquet file "
                     "(default WORKDIR/export/embeddings.parquet).")
  group.add_argument("--overwrite", action="store_true",
                     help="Replace an existing --output (gandl-export "
                     "refuses otherwise).")
  group.add_argument("--metadata", default=None,
                     help="metadata.csv for evaluation: gs:// or a path on "
                     "worker 0 (required unless --stage export).")
  group.add_argument("--report", default=None,
                     help="gs:// directory for the evaluation report "
                     "(default WORKDIR/report).")
  parser.add_argument("--dry-run", action="store_true",
                      help="Print the commands instead of running them.")
  return parser


def main(argv: Optional[List[str]] = None, out=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  export = args.stage in ("both", "export")
  evaluate = args.stage in ("both", "evaluate")
  tc.check_args(parser, args, run=True, data=export)
  if args.output is None:
    args.output = f"{args.workdir}/export/embeddings.parquet"
  if args.report is None:
    args.report = f"{args.workdir}/report"
  for flag in ("output", "report"):
    if not getattr(args, flag).startswith("gs://"):
      parser.error(f"--{flag}: expected a gs:// path, "
                   f"got {getattr(args, flag)!r}")
  if evaluate and not args.metadata:
    parser.error("--metadata is required to evaluate (gs://.../metadata.csv "
                 "or a path on worker 0); use --stage export to skip it")
  if not args.output.endswith(".parquet"):
    parser.error(f"--output: expected a .parquet file, got {args.output!r}")
  cmds = []
  if export:
    cmds += tc.export_commands(args)
  if evaluate:
    cmds += tc.evaluate_commands(args, LOCAL_EMBEDDINGS, download=True)
  return runner_lib.run_all(cmds, args.dry_run, out=out)


if __name__ == "__main__":
  sys.exit(main())
