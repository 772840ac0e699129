"""The evaluation tasks, registered by name.

A task is one function plus the section of report.md that shows its
results, registered in one place:

  @registry.register_task("my_task", section=my_section)
  def my_task(ctx: registry.Context) -> dict:
    return {"score": float(ctx.emb.features.mean())}

The function gets the `Context` of one embeddings set (its post-processed
rows, the options, objects shared with other tasks) and returns a JSON-ready
dict, which becomes `metrics.json`'s entry `embeddings.<set>.<task>` with
`"status": "ok"` added. A task that finished only in part returns
`"status": "failed"`, a `reason` naming the part that failed and
`"partial": True`: what it computed is kept, the tasks that require it
still run (from what it hands on), and the run counts as partly done. Raising `Skip(reason)` records the task as skipped,
`classify.TaskError` / ValueError / KeyError as failed with the message;
the other tasks still run. `section(sets, report_ctx) -> markdown` renders
the task for every set at once (`sets`: set name -> that set's metrics).

Tasks that need another task's result name it in `requires`: they run after
it, are recorded as failed where it failed (and finished no part), and asking for them runs it too.
The result objects a task hands on (a fitted model, a table) go in
`ctx.shared[task name]`. `follows` names a task after which this one runs
whenever that one runs (phenotypic consistency comes with phenotypic
activity; it is not asked for on its own).
`before_postprocess(emb, options)` takes what a task needs from the rows
before normalization changes them (`ctx.raw_value(name)`).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd

from gandl_jax import io as gio


class Skip(Exception):
  """Raised by a task that does not apply to this set (the reason is
  recorded, status "skipped")."""


@dataclasses.dataclass
class Context:
  """What a task sees of one embeddings set.

  name: the set's name in the report.
  emb: the post-processed embeddings (`io.Embeddings`).
  options: the run's `pipeline.Options`.
  source: the set's `pipeline.EmbeddingSet` (raw inputs, RxRx1 files).
  postprocessing: what post-processing did (metrics.json's entry).
  compounds: compound names the user asked about.
  truth / truth_error: the planted truth table (simulated data) or why
    there is none.
  output_dir: where tables go (`save_csv`).
  shared: objects a task hands to the tasks that require it, by task name
    (only that task writes its key).
  raw: what each task's `before_postprocess` took from the rows before
    post-processing (by task name; `raw_value`).
  timing: wall seconds of what ran (tasks, `cached` computations).
  predictions: test-part predictions of the classification tasks, task ->
    split -> DataFrame(site_id, y, pred, plate) (the paired comparisons
    between sets).
  files: the run's `outputs.OutputFiles` (what `save_csv` writes is listed
    there), or None.
  """
  name: str
  emb: Any
  options: Any
  source: Any = None
  postprocessing: Dict = dataclasses.field(default_factory=dict)
  compounds: Sequence[str] = ()
  truth: Optional[pd.DataFrame] = None
  truth_error: Optional[str] = None
  output_dir: str = "."
  shared: Dict[str, Any] = dataclasses.field(default_factory=dict)
  raw: Dict[str, Any] = dataclasses.field(default_factory=dict)
  timing: Dict[str, float] = dataclasses.field(default_factory=dict)
  log: Callable[[str], None] = print
  predictions: Dict[str, Dict] = dataclasses.field(default_factory=dict)
  files: Any = None
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock,
                                            repr=False)
  _cache: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def cached(self, key: str, fn: Callable[[], Any]) -> Any:
    """`fn()` computed once per set for every task that asks for `key`
    (e.g. the well profiles of the retrieval tasks); an error is raised to
    each caller."""
    with self._lock:
      if key not in self._cache:
        t = time.time()
        try:
          self._cache[key] = (True, fn())
        except Exception as e:  # pylint: disable=broad-except
          self._cache[key] = (False, e)
        self.timing[key] = round(time.time() - t, 2)
      ok, value = self._cache[key]
    if not ok:
      raise value
    return value

  def raw_value(self, task: str) -> Any:
    """What `task`'s `before_postprocess` returned (its error raised)."""
    value = self.raw[task]
    if isinstance(value, Exception):
      raise value
    return value

  def release(self) -> None:
    """Drops the rows and what the tasks computed from them (the set's
    results stay in the metrics)."""
    self.emb = None
    self.raw.clear()
    self._cache.clear()

  def save_csv(self, kind: str, df: pd.DataFrame) -> str:
    """Writes `df` as OUTPUT/<kind>_<set>.csv (atomically); returns the
    file name."""
    fname = f"{kind}_{safe_name(self.name)}.csv"
    if self.files is not None:
      self.files.add(fname)
    gio.atomic_write(os.path.join(self.output_dir, fname),
                     lambda f: df.to_csv(f, index=False))
    return fname


def safe_name(name: str) -> str:
  """`name` with everything but letters, digits, - and _ as _ (file names)."""
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


@dataclasses.dataclass(frozen=True)
class Task:
  """A registered task (see the module docstring)."""
  name: str
  fn: Callable[[Context], Dict]
  section: Optional[Callable[[Dict[str, Dict], Any], str]] = None
  requires: tuple = ()
  follows: Optional[str] = None
  # How a dependent task's failure names this one ("needs <this>: why").
  description: str = ""
  # Asked for by default (gandl-evaluate's --tasks); `follows` tasks run
  # with the task they follow instead.
  default: bool = True
  # (embeddings, options) -> what the task needs from the rows before
  # post-processing changes them (in place), or None; in `Context.raw`.
  before_postprocess: Optional[Callable[[Any, Any], Any]] = None


# name -> Task, in registration order (the order of metrics.json's tasks
# and of the report's sections).
TASKS: Dict[str, Task] = {}


def register_task(name: str, *, section=None, requires: Sequence[str] = (),
                  follows: Optional[str] = None, description: str = "",
                  default: bool = True, before_postprocess=None):
  """Decorator registering `fn(ctx) -> dict` as the task `name`."""
  def wrap(fn):
    if name in TASKS:
      raise ValueError(f"evaluation task {name!r} is registered twice")
    missing = [r for r in (*requires, *([follows] if follows else []))
               if r not in TASKS]
    if missing:
      raise ValueError(f"task {name!r} needs {missing}: register those first")
    TASKS[name] = Task(name, fn, section, tuple(requires), follows,
                       description or name, default and follows is None,
                       before_postprocess)
    return fn
  return wrap


def unregister_task(name: str) -> None:
  """Removes a task (and nothing else: tasks requiring it must go first)."""
  dependents = [t.name for t in TASKS.values()
                if name in t.requires or t.follows == name]
  if dependents:
    raise ValueError(f"tasks {dependents} need {name!r}")
  del TASKS[name]


def default_tasks() -> List[str]:
  return [t.name for t in TASKS.values() if t.default]


def selectable_tasks() -> List[str]:
  return list(TASKS)


def resolve(wanted: Sequence[str]) -> List[Task]:
  """The tasks to run for `wanted` names: those, what they require, and the
  tasks that follow them; in registration order (so requirements come
  first). Unknown names raise ValueError."""
  unknown = [t for t in wanted if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
  chosen = set()
  todo = list(wanted)
  while todo:
    name = todo.pop()
    if name in chosen:
      continue
    chosen.add(name)
    todo.extend(TASKS[name].requires)
    todo.extend(t.name for t in TASKS.values() if t.follows == name)
  return [t for t in TASKS.values() if t.name in chosen]
