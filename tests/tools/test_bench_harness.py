"""tools/bench/harness.py: the JSON-lines record, the timing loop and the
side-by-side alternation, on trivial callables with fake clocks."""
import io
import json
import os
import subprocess

import pytest

from tools.bench import harness


class FakeClock:
  """A clock that only moves when a callable advances it."""

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def _side(clock, cpu, log, name, seconds, cpu_seconds=None):
  def run():
    log.append(name)
    clock.t += seconds
    cpu.t += seconds if cpu_seconds is None else cpu_seconds
  return run


def test_time_rounds_warmup_then_timed_rounds_best_and_median():
  clock, cpu, log = FakeClock(), FakeClock(), []
  durations = iter([100.0, 3.0, 1.0, 2.0, 5.0])   # first: the warm-up

  def fn():
    log.append("x")
    d = next(durations)
    clock.t += d
    cpu.t += d / 2
  t = harness.time_rounds(fn, rounds=4, warmup=1, clock=clock, cpu_clock=cpu)
  assert len(log) == 5
  assert t.seconds == [3.0, 1.0, 2.0, 5.0]           # the warm-up not timed
  assert t.cpu_seconds == [1.5, 0.5, 1.0, 2.5]
  assert t.best == 1.0 and t.median == 2.5 and t.cpu_median == 1.25
  assert t.rate(10) == {"median": 4.0, "best": 10.0}


def test_alternate_rotates_the_order_and_times_each_side_alone():
  clock, cpu, log = FakeClock(), FakeClock(), []
  sides = {"ours": _side(clock, cpu, log, "ours", 1.0, 0.25),
           "reference": _side(clock, cpu, log, "reference", 4.0)}
  times = harness.alternate(sides, rounds=3, warmup=1, clock=clock,
                            cpu_clock=cpu)
  # Warm-up once each, then round i starts at side i mod 2.
  assert log == ["ours", "reference", "ours", "reference", "reference",
                 "ours", "ours", "reference"]
  assert times["ours"].seconds == [1.0] * 3
  assert times["ours"].cpu_seconds == [0.25] * 3
  assert times["reference"].seconds == [4.0] * 3
  if hasattr(os, "getloadavg"):
    assert len(times["ours"].load_before) == 3


def test_a_side_that_times_itself_is_taken_at_its_word():
  clock = FakeClock()

  class Worker:   # as sg2ada_reference.Worker: (seconds, images, CPU s)
    def __init__(self):
      self.calls = []

    def run(self, command, n):
      self.calls.append((command, n))
      clock.t += 100.0   # the round trip, not what the worker measured
      return 0.5 * n, 8 * n, 0.75 * n
  w = Worker()
  times = harness.alternate(
      {"ours": lambda: setattr(clock, "t", clock.t + 2.0),
       "reference": harness.worker_side(w, "train", 4)}, rounds=2,
      clock=clock, cpu_clock=FakeClock())
  assert w.calls == [("train", 4)] * 2
  assert times["reference"].seconds == [2.0, 2.0]
  assert times["reference"].cpu_seconds == [3.0, 3.0]
  assert times["ours"].seconds == [2.0, 2.0]


def test_rounds_must_be_positive():
  with pytest.raises(ValueError, match="rounds"):
    harness.time_rounds(lambda: None, rounds=0)


@pytest.mark.e2e
def test_emit_writes_one_json_line_with_every_field():
  clock, cpu = FakeClock(), FakeClock()
  t = harness.time_rounds(_side(clock, cpu, [], "x", 2.0), rounds=3,
                          clock=clock, cpu_clock=cpu)
  out = io.StringIO()
  rec = harness.emit("img_per_sec", 64 / t.median, "images/s",
                     {"batch": 64, "resolution": 32}, bench="toy",
                     timing=t, out=out)
  lines = out.getvalue().splitlines()
  assert len(lines) == 1
  got = json.loads(lines[0])
  assert got == json.loads(json.dumps(rec))
  assert set(got) == {"bench", "config", "metric", "value", "unit", "commit",
                      "device", "load_before", "load_after", "command",
                      "timestamp"}
  assert got["bench"] == "toy" and got["metric"] == "img_per_sec"
  assert got["value"] == 32.0 and got["unit"] == "images/s"
  assert got["config"] == {"batch": 64, "resolution": 32}
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=harness.REPO,
                        capture_output=True, text=True).stdout.strip()
  assert got["commit"].split("+")[0] == head
  assert got["device"]["cpu"] and got["device"]["cpu_cores"] == os.cpu_count()
  assert isinstance(got["command"], list)
  assert got["timestamp"].endswith("+00:00")
  if hasattr(os, "getloadavg"):
    assert len(got["load_before"]) == 3 and len(got["load_after"]) == 3


def test_cost_reads_xla_cost_analysis_in_its_shapes():
  class Compiled:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      return self.analysis
  one = {"flops": 120.0, "bytes accessed": 64.0}
  assert harness.cost(Compiled(one)) == {"flops": 120.0,
                                         "bytes_accessed": 64.0}
  assert harness.cost(Compiled([one]))["flops"] == 120.0   # older JAX: a list
  assert harness.flops(Compiled(None)) is None
  assert harness.flops(Compiled({"flops": 0.0})) is None
