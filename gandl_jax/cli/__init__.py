"""Thin absl entry points: each parses flags and calls one library function."""
import logging as _std_logging
import sys as _sys


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


# Errors a user can fix (bad config, missing or mismatched data, unreadable
# files): one clear line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError,
               FloatingPointError)


def fail(program: str, error: BaseException, status: int = 1) -> None:
  """Prints `program: error: ...` to stderr and exits with `status`."""
  print(f"{program}: error: {error}", file=_sys.stderr)
  raise SystemExit(status)
