"""evaluate/runner.py: tasks on a thread pool see fully imported modules."""
import sys

from gandl_jax.evaluate import registry, runner


def test_modules_imported_before_the_pool(tmp_path, monkeypatch):
  # A stand-in for polars: its import is what races with scikit-learn's
  # sys.modules checks when it happens inside a task's thread.
  pkg = tmp_path / "gandl_fake_frames"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("class DataFrame:\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "gandl_fake_frames", raising=False)
  monkeypatch.setattr(runner, "IMPORT_BEFORE_THREADS",
                      ("gandl_fake_frames", "gandl_no_such_module"))
  seen = []

  def task(ctx):
    del ctx
    seen.append(hasattr(sys.modules.get("gandl_fake_frames"), "DataFrame"))
    return {"value": 1}

  tasks = [registry.Task(name=f"t{i}", fn=task) for i in range(2)]
  results, timing = {}, {}
  ctx = registry.Context.__new__(registry.Context)
  ctx.log = lambda msg: None
  runner.run_tasks(tasks, ctx, results, timing, threads=2)
  assert seen == [True, True]
  assert [results[t.name]["status"] for t in tasks] == ["ok", "ok"]
  # A module that is not installed is skipped, not an error.
  assert "gandl_no_such_module" not in sys.modules
