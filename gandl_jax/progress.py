"""Progress, throughput and ETA for every long job (conversion, training,
export, feature extraction), logged through absl."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

from absl import logging


def format_duration(seconds: float) -> str:
  """`[Nd ]HH:MM:SS`, or '?' when unknown."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


class Progress:
  """Counts work done towards `total` (None: unknown), measures the rate
  since this process started (work done before it, e.g. by a resumed run,
  does not count towards the rate) and estimates the time left.

  `update(n)` adds work and logs a line at most every `every_s` seconds;
  `update(0, force=True)` logs the final line.
  """

  def __init__(self, total: Optional[float], done: float = 0,
               unit: str = "sites", name: str = "", every_s: float = 30.0,
               log: Callable[[str], None] = logging.info,
               clock: Callable[[], float] = time.monotonic):
    self.total, self.unit, self.name = total, unit, name
    self.every_s, self.log, self.clock = every_s, log, clock
    self.done = done
    self._logged: Optional[float] = None
    self.restart()

  @property
  def elapsed(self) -> float:
    return max(self.clock() - self.start, 1e-9)

  @property
  def rate(self) -> float:
    """Work per second since this process started."""
    return (self.done - self.start_done) / self.elapsed

  def interval_rate(self) -> float:
    """Work per second since the previous call (the first: since start)."""
    now = self.clock()
    t0, d0 = self._interval
    self._interval = (now, self.done)
    return (self.done - d0) / (now - t0) if now > t0 else float("nan")

  @property
  def eta_s(self) -> float:
    if not self.total:
      return float("nan")
    rate = self.rate
    return (self.total - self.done) / rate if rate > 0 else float("inf")

  def line(self) -> str:
    head = f"{self.name}: " if self.name else ""
    if self.total:
      pct = 100.0 * self.done / self.total
      return (f"{head}{self.done:g}/{self.total:g} {self.unit} ({pct:.1f}%), "
              f"{self.rate:.1f} {self.unit}/s, ETA {format_duration(self.eta_s)}")
    return f"{head}{self.done:g} {self.unit}, {self.rate:.1f} {self.unit}/s"

  def restart(self) -> None:
    """Measures the rate from now on: call it after a one-off start-up cost
    (compilation) that would otherwise inflate the ETA."""
    self.start = self._last_log = self.clock()
    self.start_done = self.done
    self._interval = (self.start, self.done)

  def set(self, done: float) -> None:
    self.done = done

  def update(self, n: float = 0, force: bool = False) -> None:
    self.done += n
    now = self.clock()
    if force and self.done == self._logged:
      return
    if not force and now - self._last_log < self.every_s:
      return
    self._last_log, self._logged = now, self.done
    self.log(self.line())
