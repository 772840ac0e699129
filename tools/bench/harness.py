"""The one benchmark harness: shared flags, timing, side-by-side rounds,
FLOPs and the JSON-lines record every bench writes.

A bench module (tools/bench/<name>.py) declares what it times and calls:

* `time_rounds(fn, rounds, warmup)`: `warmup` untimed calls, then `rounds`
  timed calls of `fn` (one round each); wall and CPU seconds (all of this
  process's threads) per round, best and median.
* `alternate({"ours": fn, "reference": fn2}, rounds, warmup)`: the same for
  several sides, one round of each in turn (the order rotating every round),
  so background load hits every side alike. A side may measure itself (a
  subprocess such as stylegan2-ada-pytorch, `worker_side`) by returning a
  `Sample`.
* `cost(compiled)` / `flops(compiled)`: XLA's cost analysis of one call.
* `emit(metric, value, unit, config=..., bench=...)`: one JSON line on
  stdout (and appended to --jsonl), with the commit, device, load average
  before and after, command line and a UTC timestamp. Human-readable text
  goes to stderr (`say`), so stdout is JSON lines only.

Flags shared by every bench (`define_flags()`, called by each bench module):
--rounds, --warmup, --jsonl.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

FLAGS = flags.FLAGS


def define_flags(rounds: int = 3, warmup: int = 1) -> None:
  """Defines --rounds, --warmup and --jsonl (once; a bench may pick its own
  defaults)."""
  if "rounds" in FLAGS:
    return
  flags.DEFINE_integer("rounds", rounds, "Timed rounds (per side when "
                       "sides alternate); best and median reported.")
  flags.DEFINE_integer("warmup", warmup, "Untimed rounds first (after "
                       "compilation).")
  flags.DEFINE_string("jsonl", None, "Also append every record to this "
                      "JSON-lines file.")


def config_source(name: str = "config") -> Dict[str, Any]:
  """The config file and command-line overrides of an ml_collections
  config flag, for a record's `config`."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holder = FLAGS[name]
  return {"file": config_flags.get_config_filename(holder),
          "overrides": config_flags.get_override_values(holder)}


# ----------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Sample:
  """One round: wall seconds and CPU seconds (None where not measured)."""
  seconds: float
  cpu_seconds: Optional[float] = None


@dataclasses.dataclass
class Timing:
  """The rounds of one callable, and the load average around them."""
  samples: List[Sample]
  load_before: List[float] = dataclasses.field(default_factory=list)
  load_after: List[float] = dataclasses.field(default_factory=list)

  @property
  def seconds(self) -> List[float]:
    return [s.seconds for s in self.samples]

  @property
  def cpu_seconds(self) -> List[Optional[float]]:
    return [s.cpu_seconds for s in self.samples]

  @property
  def best(self) -> float:
    return min(self.seconds)

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def cpu_median(self) -> Optional[float]:
    cpu = [c for c in self.cpu_seconds if c is not None]
    return statistics.median(cpu) if cpu else None

  def rate(self, items: float) -> Dict[str, float]:
    """Items per second at the median and the best round."""
    return {"median": items / self.median, "best": items / self.best}


def load_average() -> List[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def _run_once(fn: Callable[[], Any], clock: Callable[[], float],
              cpu_clock: Callable[[], float]) -> Sample:
  t0, c0 = clock(), cpu_clock()
  out = fn()
  t1, c1 = clock(), cpu_clock()
  if isinstance(out, Sample):      # the side measured itself
    return out
  return Sample(t1 - t0, c1 - c0)


def alternate(sides: Mapping[str, Callable[[], Any]], rounds: int,
              warmup: int = 0, clock: Callable[[], float] = time.perf_counter,
              cpu_clock: Callable[[], float] = time.process_time
              ) -> Dict[str, Timing]:
  """Times every side for `rounds` rounds, one round of each side in turn.

  Each side is a callable running one round; it returns a `Sample` if it
  timed itself (e.g. in a subprocess), anything else to be timed here with
  `clock` / `cpu_clock`. Round i starts at side i mod len(sides), so no side
  always runs first. `warmup` untimed rounds of every side come first.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  names = list(sides)
  for _ in range(warmup):
    for name in names:
      sides[name]()
  before = load_average()
  samples = {name: [] for name in names}
  for i in range(rounds):
    k = i % len(names)
    for name in names[k:] + names[:k]:
      samples[name].append(_run_once(sides[name], clock, cpu_clock))
  after = load_average()
  return {name: Timing(samples[name], before, after) for name in names}


def time_rounds(fn: Callable[[], Any], rounds: int, warmup: int = 0,
                **clocks) -> Timing:
  """`warmup` untimed calls of `fn`, then `rounds` timed ones."""
  return alternate({"fn": fn}, rounds, warmup, **clocks)["fn"]


def worker_side(worker: Any, command: str, n: int) -> Callable[[], Sample]:
  """A side run by a subprocess worker (`sg2ada_reference.Worker`): one
  round is `worker.run(command, n)`, timed inside the worker."""
  def run() -> Sample:
    seconds, _, cpu = worker.run(command, n)
    return Sample(seconds, cpu)
  return run


# ----------------------------------------------------------------------------
# FLOPs.


def cost(compiled: Any) -> Dict[str, float]:
  """FLOPs and bytes accessed of one call of a compiled (jax.stages.Compiled)
  function, per device, from XLA's cost analysis (0 where the backend does
  not report them), and XLA's own 'optimal_seconds' estimate if given."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    analysis = None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  analysis = analysis or {}
  out = {"flops": float(analysis.get("flops", 0.0)),
         "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}
  if "optimal_seconds" in analysis:
    out["xla_optimal_s"] = float(analysis["optimal_seconds"])
  return out


def flops(compiled: Any) -> Optional[float]:
  """FLOPs of one call, or None where the backend does not report them."""
  f = cost(compiled)["flops"]
  return f if f > 0 else None


# ----------------------------------------------------------------------------
# Records.


@functools.lru_cache(maxsize=None)
def commit() -> str:
  """`git rev-parse HEAD` of this checkout, '+dirty' with local changes."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain",
                            "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+dirty" if dirty.strip() else "")


def command() -> List[str]:
  """This process's command line; a module under the repository as
  `python -m tools.bench.<name>` (how the benches run)."""
  script = os.path.abspath(sys.argv[0]) if sys.argv else ""
  rel = os.path.relpath(script, REPO) if script else ""
  if rel.endswith(".py") and not rel.startswith(".."):
    module = rel[:-3].replace(os.sep, ".")
    return ["python", "-m", module] + sys.argv[1:]
  return [os.path.basename(sys.executable)] + sys.argv


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def device() -> Dict[str, Any]:
  """JAX's device kind and count (if JAX is imported) and the host CPU."""
  out = {"cpu": cpu_model(), "cpu_cores": os.cpu_count()}
  jax = sys.modules.get("jax")
  if jax is not None:
    devices = jax.devices()
    out.update({"kind": devices[0].device_kind,
                "platform": devices[0].platform, "count": len(devices)})
  return out


_RUN = {"bench": None, "load_before": None}


def record(metric: str, value: Any, unit: str, config: Mapping[str, Any],
           bench: Optional[str] = None,
           timing: Optional[Timing] = None) -> Dict[str, Any]:
  """The JSON-lines record of one measurement. The load average before is
  that around `timing` when given, else the one when the bench started."""
  if timing is not None and timing.load_before:
    before, after = timing.load_before, timing.load_after
  else:
    before, after = _RUN["load_before"] or load_average(), load_average()
  return {
      "bench": bench or _RUN["bench"], "config": dict(config),
      "metric": metric, "value": value, "unit": unit,
      "commit": commit(), "device": device(),
      "load_before": before, "load_after": after,
      "command": command(),
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }


def emit(metric: str, value: Any, unit: str, config: Mapping[str, Any],
         bench: Optional[str] = None, timing: Optional[Timing] = None,
         out=None) -> Dict[str, Any]:
  """Writes `record(...)` as one JSON line to stdout (or `out`) and, with
  --jsonl, appends it there. Returns the record."""
  rec = record(metric, value, unit, config, bench, timing)
  line = json.dumps(rec, default=_jsonable)
  print(line, file=out or sys.stdout, flush=True)
  path = FLAGS["jsonl"].value if "jsonl" in FLAGS and FLAGS.is_parsed() \
      else None
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write(line + "\n")
  return rec


def _jsonable(x: Any) -> Any:
  if hasattr(x, "tolist"):          # numpy scalars and arrays
    return x.tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


def say(msg: str) -> None:
  """A human-readable line (stderr: stdout carries only the records)."""
  print(msg, file=sys.stderr, flush=True)


def run(main: Callable[[List[str]], None], bench: str) -> None:
  """`app.run(main)` with `bench` as the records' name and the load average
  at the start kept for records without their own timing."""
  _RUN["bench"] = bench

  def wrapped(argv):
    _RUN["load_before"] = load_average()
    return main(argv)
  app.run(wrapped)
