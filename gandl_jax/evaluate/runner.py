"""Running registered tasks on one embeddings set: one after another, or on
a plain thread pool (their heavy parts - liblinear, BLAS, numpy - release
the GIL). Every task is seeded on its own, so the results do not depend on
the order or the number of threads; a task starts once the tasks it
requires are done.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import time
import traceback
from typing import Callable, Dict, List, Sequence

from gandl_jax.evaluate import classify
from gandl_jax.evaluate.registry import Context, Skip, TASKS, Task


# Imported in the calling thread before tasks run on a pool: statsmodels
# (imported by copairs, the retrieval tasks' library) imports polars where it
# is installed, while scikit-learn's input checks in other tasks' threads read
# sys.modules["polars"] and fail on the half-imported module
# ("AttributeError: partially initialized module 'polars'").
IMPORT_BEFORE_THREADS = ("polars",)


def import_before_threads() -> None:
  """Imports each installed module of `IMPORT_BEFORE_THREADS`."""
  for name in IMPORT_BEFORE_THREADS:
    if importlib.util.find_spec(name) is not None:
      importlib.import_module(name)


def record(results: Dict, name: str, fn: Callable, log, timing: Dict):
  """Runs `fn()` and records its outcome as `results[name]`: its dict (or a
  tuple's first item, or an object's `.summary`) with status "ok", or
  "skipped" / "failed" with the reason (a dict may say "failed" itself:
  finished in part, see `registry`). Returns what `fn` returned (None
  where it did not finish) and its wall seconds in `timing[name]`."""
  t = time.time()
  cpu = time.thread_time()
  try:
    out = fn()
    val = out[0] if isinstance(out, tuple) else out
    results[name] = {"status": "ok", **(val.summary if hasattr(val, "summary")
                                         else val)}
    # CPU of this thread (not of BLAS's or of other tasks' threads).
    took = (f"({time.time() - t:.1f}s, {time.thread_time() - cpu:.1f} CPU s)")
    if results[name]["status"] == "failed":
      log(f"  {name}: FAILED in part {took}: "
          f"{results[name].get('reason', '')}")
    else:
      log(f"  {name}: ok {took}")
    return out
  except Skip as e:
    results[name] = {"status": "skipped", "reason": str(e)}
    log(f"  {name}: skipped: {e}")
  except (classify.TaskError, ValueError, KeyError) as e:
    results[name] = {"status": "failed", "reason": str(e)}
    log(f"  {name}: FAILED: {e}")
  except Exception as e:  # pylint: disable=broad-except
    results[name] = {"status": "failed",
                     "reason": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc(limit=4)}
    log(f"  {name}: FAILED: {type(e).__name__}: {e}")
  finally:
    timing[name] = round(time.time() - t, 2)
  return None


def _run_one(task: Task, ctx: Context, results: Dict, timing: Dict) -> None:
  for req in task.requires:
    r = results.get(req, {})
    if r.get("status") != "ok" and not r.get("partial"):
      results[task.name] = {
          "status": "failed",
          "reason": f"needs {TASKS[req].description}: " +
                    r.get("reason", "not run")}
      ctx.log(f"  {task.name}: FAILED: needs {req}")
      return
  record(results, task.name, lambda: task.fn(ctx), ctx.log, timing)


def done(result: Dict) -> bool:
  """Whether a task's result holds anything: ok, or failed in part."""
  return result.get("status") == "ok" or bool(result.get("partial"))


def run_tasks(tasks: Sequence[Task], ctx: Context, results: Dict,
              timing: Dict, threads: int = 1) -> None:
  """Runs `tasks` (requirements first, as `registry.resolve` orders them)
  on `threads` threads, filling `results` and `timing` by task name.

  With several threads, at most `threads` tasks run at a time and a free
  thread takes the first task (in the given order) whose requirements (and
  the task it follows) are done.
  """
  if threads <= 1 or len(tasks) <= 1:
    for task in tasks:
      _run_one(task, ctx, results, timing)
    return
  import_before_threads()
  names = {t.name for t in tasks}
  waiting: List[Task] = list(tasks)
  done: set = set()
  running: Dict[concurrent.futures.Future, str] = {}
  with concurrent.futures.ThreadPoolExecutor(
      threads, thread_name_prefix="gandl-evaluate") as pool:
    while waiting or running:
      for task in list(waiting):
        if len(running) >= threads:
          break
        after = task.requires + ((task.follows,) if task.follows else ())
        if all(r in done or r not in names for r in after):
          waiting.remove(task)
          running[pool.submit(_run_one, task, ctx, results, timing)] = \
              task.name
      finished, _ = concurrent.futures.wait(
          running, return_when=concurrent.futures.FIRST_COMPLETED)
      for f in finished:
        done.add(running.pop(f))
        f.result()

