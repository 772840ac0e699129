"""Runs the launchers' commands, or prints them (`--dry-run`).

The launchers run on a workstation that has `gcloud` but not necessarily this
package, so everything under `launch/` uses the Python standard library only.

A command is an argv list; `Runner.run` executes it without a shell, and
`--dry-run` prints it with `shlex.join`, one command per line, so the printed
text is exactly what would run and can be pasted into a POSIX shell. Lines that
explain (for example the branches of the preemption watcher) start with `#`,
so the whole output stays valid shell.
"""
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence, TextIO


class CommandError(RuntimeError):
  """A command exited with a non-zero status."""

  def __init__(self, cmd: Sequence[str], returncode: int):
    super().__init__(f"command failed with exit status {returncode}: "
                     f"{shlex.join(cmd)}")
    self.cmd = list(cmd)
    self.returncode = returncode


class Runner:
  """Executes argv commands or, with `dry_run`, prints them."""

  def __init__(self, dry_run: bool, out: Optional[TextIO] = None,
               sleep: Callable[[float], None] = time.sleep):
    self.dry_run = dry_run
    self._out = out
    self._sleep = sleep

  @property
  def out(self) -> TextIO:
    return self._out if self._out is not None else sys.stdout

  def _echo(self, line: str) -> None:
    print(line, file=self.out, flush=True)

  def comment(self, text: str) -> None:
    """A `# text` line in dry-run output; progress on stderr otherwise."""
    if self.dry_run:
      self._echo(f"# {text}")
    else:
      print(f"[launch] {text}", file=sys.stderr, flush=True)

  def run(self, cmd: Sequence[str], check: bool = True) -> int:
    """Runs `cmd` (no shell); returns its exit status (0 in dry-run)."""
    cmd = [str(c) for c in cmd]
    if self.dry_run:
      self._echo(shlex.join(cmd))
      return 0
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    returncode = subprocess.run(cmd, check=False).returncode
    if check and returncode != 0:
      raise CommandError(cmd, returncode)
    return returncode

  def run_shell(self, line: str, check: bool = True) -> int:
    """Runs a shell line (for `nohup ... &`); dry-run prints it verbatim."""
    if self.dry_run:
      self._echo(line)
      return 0
    print(f"+ {line}", file=sys.stderr, flush=True)
    returncode = subprocess.run(["bash", "-c", line], check=False).returncode
    if check and returncode != 0:
      raise CommandError(["bash", "-c", line], returncode)
    return returncode

  def query(self, cmd: Sequence[str], simulated: Callable[[], tuple],
            timeout: float = 300.0) -> tuple:
    """Runs `cmd` capturing output: (returncode, stdout, stderr).

    In dry-run the command is printed and `simulated()` supplies the answer,
    so loops that branch on a probe (the watcher) can be shown end to end.
    A probe that hangs (ssh to a dying VM) is cut off after `timeout` seconds
    and reported as exit status 124.
    """
    cmd = [str(c) for c in cmd]
    if self.dry_run:
      self._echo(shlex.join(cmd))
      return simulated()
    try:
      proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
      return 124, "", f"timed out after {timeout:g} s"
    return proc.returncode, proc.stdout, proc.stderr

  def sleep(self, seconds: float) -> None:
    if self.dry_run:
      self._echo(f"sleep {int(seconds)}")
    else:
      self._sleep(seconds)


def run_all(cmds: Sequence[Sequence[str]], dry_run: bool,
            out: Optional[TextIO] = None) -> int:
  """Runs (or, with dry_run, prints) `cmds` in order; stops at the first
  failure with its message on stderr and returns its exit status (0 if all
  succeed)."""
  runner = Runner(dry_run, out=out)
  try:
    for cmd in cmds:
      runner.run(cmd)
  except CommandError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.returncode
  return 0
