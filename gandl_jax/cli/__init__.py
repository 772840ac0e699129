"""Thin absl entry points: each parses flags and calls one library function.

Every `gandl-*` command follows one convention (README, "Exit status"):
  0    done
  1    error: bad input, config or files; one line `PROGRAM: error: ...` on
       stderr, no traceback; nothing half-written
  2    bad command line (unknown/missing flags): absl's usage message
  3    partly done: some items failed and are listed (gandl-convert's
       errors.csv, gandl-evaluate's failed tasks); the rest is written
  143  stopped by SIGTERM: gandl-train and gandl-demo after saving their
       state (rerun the same command to resume); the writers of one file
       (gandl-features, gandl-export) with nothing written (rerun it)
"""
from __future__ import annotations

import logging as _std_logging
import os as _os
import signal as _signal
import sys as _sys
from typing import Callable, List, Optional

from absl import app

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_PREEMPTED = 143

# Errors a user can fix (bad config, missing or mismatched data, unreadable
# files): one clear line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError,
               FloatingPointError, PermissionError, IsADirectoryError,
               NotADirectoryError)


class _DropLibraryInfo(_std_logging.Filter):
  """Drops INFO/DEBUG records of chatty libraries (Orbax logs every save
  step at INFO through absl); their warnings and errors still show."""
  NOISY = ("/orbax/", "/etils/")

  def filter(self, record: _std_logging.LogRecord) -> bool:
    return (record.levelno >= _std_logging.WARNING or
            not any(n in record.pathname for n in self.NOISY))


def quiet_library_logs() -> None:
  """Keeps our progress lines readable; `--verbosity` still controls ours."""
  logger = _std_logging.getLogger("absl")
  if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    logger.addFilter(_DropLibraryInfo())


def usage(message: str) -> app.UsageError:
  """A bad-command-line error (exit status 2): `raise cli.usage(...)`."""
  return app.UsageError(message, exitcode=EXIT_USAGE)


def fail(program: str, error: BaseException,
         status: int = EXIT_ERROR) -> None:
  """Prints `program: error: ...` to stderr and exits with `status`."""
  print(f"{program}: error: {error}", file=_sys.stderr)
  raise SystemExit(status)


def run(program: str, body: Callable[[], Optional[int]]) -> None:
  """Runs a command's body with the shared conventions: INFO logging with
  library chatter dropped, user errors as one line (exit 1), the body's
  return value (None: 0) as the exit status."""
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS["verbosity"].present:   # progress lines are INFO
    logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  try:
    status = body()
  except USER_ERRORS as e:
    fail(program, e)
  raise SystemExit(EXIT_OK if status is None else int(status))


def stop_on_sigterm() -> None:
  """SIGTERM unwinds the command like an error (exit status 143): `finally`
  blocks and context managers run, so temporary files are removed instead of
  being left behind by the default (immediate) termination."""
  def handler(signum, frame):  # pylint: disable=unused-argument
    raise SystemExit(EXIT_PREEMPTED)
  _signal.signal(_signal.SIGTERM, handler)


def start(main: Callable[[List[str]], None]) -> None:
  """`absl.app.run(main)` with a bad command line (an unknown flag, a missing
  required one, a value of the wrong type or outside an enum) as one line and
  exit status 2, instead of absl's FATAL message and status 1."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  program = _os.path.basename(_sys.argv[0]) or "gandl"

  def parse(argv: List[str]) -> List[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{program}: usage error: {e}\n"
            f"Pass --helpshort or --helpfull to see help on flags.",
            file=_sys.stderr)
      raise SystemExit(EXIT_USAGE) from None

  app.run(main, flags_parser=parse)


def check_output_dir(path: str, flag: str = "--output",
                     what: str = "the shard directory") -> None:
  """Refuses an output directory that cannot be made (a file, a path under
  one, an unwritable place), creating nothing, before any input is read."""
  if "://" in path:     # remote: the file system reports when writing
    return
  path = _os.path.abspath(path)
  existing = path
  while not _os.path.exists(existing):    # the nearest existing ancestor
    existing = _os.path.dirname(existing)
  if not _os.path.isdir(existing):
    kind = ("is a file" if existing == path else f"is under {existing}, a file")
    raise NotADirectoryError(f"{flag} {path}: {kind}, not a directory; pass "
                             f"a directory for {what}")
  if existing == path:
    if not _os.access(path, _os.W_OK | _os.X_OK):
      raise PermissionError(f"{flag} {path}: the directory is not writable")
    return
  try:    # created and removed again: a bad input leaves nothing behind
    _os.makedirs(path)
  except OSError as e:
    raise ValueError(f"{flag} {path}: cannot create {what} "
                     f"({e.strerror or e})") from None
  while path != existing:
    _os.rmdir(path)
    path = _os.path.dirname(path)


def no_arguments(argv) -> None:
  if len(argv) > 1:
    raise usage(f"unexpected arguments: {argv[1:]}")


def parse_seeds(text: str) -> List[int]:
  """'0-3,7' -> [0, 1, 2, 3, 7]; a clear error for anything else."""
  seeds = []
  for part in (p.strip() for p in text.split(",")):
    if not part:
      continue
    try:
      if "-" in part:
        lo, hi = (int(v) for v in part.split("-", 1))
        if hi < lo:
          raise ValueError
        seeds.extend(range(lo, hi + 1))
      else:
        seeds.append(int(part))
    except ValueError as e:
      raise ValueError(f"--seeds: cannot parse {part!r}; expected ints and "
                       f"ranges like '0-7,42'") from e
  if not seeds:
    raise ValueError("--seeds is empty")
  return seeds
