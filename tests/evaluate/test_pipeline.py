"""End to end: report files, baseline side by side, bad input, planted truth."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import simulate

from gandl_jax.embeddings import write as write_embeddings
from gandl_jax.evaluate import classify
from gandl_jax.evaluate import Options, evaluate
from gandl_jax.evaluate.pipeline import AllTasksFailed, EmbeddingSet

CFG = simulate.SimConfig(sites_per_cell_type=(("HRCE", 1600), ("VERO", 640)),
                         wells_per_plate=20, dim=24, n_compounds=8,
                         n_rescue=3, n_toxic=1, infection_effect=3.0,
                         frac_mock=0.12, frac_active=0.12, seed=4)
FAST = Options(protocol=classify.ProtocolConfig(c_grid=(0.01, 1.0)),
               projection_points=800, top_compounds=3)


def _strict_json(path):
  def bad(x):
    raise AssertionError(f"non-finite JSON constant {x}")
  with open(path) as f:
    return json.load(f, parse_constant=bad)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval")
  md, X, truth = simulate.simulate_rxrx19a(CFG)
  md.to_csv(d / "metadata.csv", index=False)
  truth.to_csv(d / "synthetic_truth.csv", index=False)
  write_embeddings(str(d / "emb.parquet"), md, X)
  rng = np.random.default_rng(9)
  write_embeddings(str(d / "random.parquet"), md[["site_id"]],
                   rng.standard_normal(X.shape).astype(np.float32),
                   include_metadata=False)
  m1, X1 = simulate.simulate_rxrx1(sites_per_cell_type=120, dim=24)
  m1.to_csv(d / "rx1_metadata.csv", index=False)
  write_embeddings(str(d / "rx1.parquet"), m1, X1)
  return d, md, X, truth


def test_extra_sets_and_summary_table(data):
  """Sets side by side; report.md opens with one summary table whose
  figures are the metrics.json ones, each balanced accuracy with its 95%
  interval, then the paired differences against the first set."""
  d, md, X, truth = data
  out = d / "out3"
  # The same embeddings in another row order: the split follows the sites,
  # so the predictions pair site by site and match exactly.
  perm = np.random.default_rng(3).permutation(len(md))
  write_embeddings(str(d / "shuffled.parquet"), md[["site_id"]].iloc[perm],
                   X[perm], include_metadata=False)
  evaluate([EmbeddingSet("trained", str(d / "emb.parquet"),
                         metadata=str(d / "metadata.csv")),
            EmbeddingSet("random", str(d / "random.parquet")),
            EmbeddingSet("trained again", str(d / "emb.parquet")),
            EmbeddingSet("shuffled", str(d / "shuffled.parquet"))], str(out),
           tasks=["control", "dose_response", "truth"], options=FAST,
           log=lambda s: None)
  m = _strict_json(out / "metrics.json")
  assert m["names"] == ["trained", "random", "trained again", "shuffled"]
  for name in m["names"]:
    for split, unit in (("random", "site"), ("plate", "plate")):
      s = m["embeddings"][name]["control"][split]
      iv = s["balanced_accuracy_interval"]
      assert iv["value"] == pytest.approx(s["balanced_accuracy"], abs=1e-12)
      assert iv["low"] <= iv["value"] <= iv["high"]
      assert iv["unit"] == unit and iv["level"] == 0.95
      if split == "plate":
        assert iv["n_units"] == s["n_test_plates"]
        assert iv["resampled"] == "held-out plates resampled"
        assert iv["few_units"] == (iv["n_units"] < 5)
      else:
        assert iv["n_units"] == s["n_test"]
        assert "ignores plate effects" in iv["resampled"]
  comps = {(r["set"], split): r for split in ("random", "plate")
           for r in m["comparisons"]["control"][split]}
  for split in ("random", "plate"):
    n_test = m["embeddings"]["trained"]["control"][split]["n_test"]
    for same in ("trained again", "shuffled"):
      r = comps[(same, split)]
      assert r["versus"] == "trained" and r["n_paired"] == n_test
      assert r["diff"] == 0.0 and r["low"] == r["high"] == 0.0
      assert r["no_difference"] and r["verdict"] == "no difference"
    r = comps[("random", split)]
    assert r["n_paired"] == n_test
    assert not r["no_difference"] and r["verdict"] == "lower"
    assert r["low"] <= r["diff"] <= r["high"] < 0
    e = m["embeddings"]
    assert r["diff"] == pytest.approx(
        e["random"]["control"][split]["balanced_accuracy"] -
        e["trained"]["control"][split]["balanced_accuracy"], abs=1e-12)
  report = (out / "report.md").read_text()
  assert report.index("## Summary") < report.index("## Inputs")
  summary = report[report.index("## Summary"):report.index("## Inputs")]
  rows = {line.split("|")[1].strip(): line for line in summary.splitlines()
          if line.startswith("| ") and "embeddings" not in line
          and "| task |" not in line and " - " not in line}
  assert set(rows) == {"trained", "random", "trained again", "shuffled"}
  for name, line in rows.items():
    s = m["embeddings"][name]["control"]["random"]
    iv = s["balanced_accuracy_interval"]
    assert (f"{s['balanced_accuracy']:.3f} [{iv['low']:.2f}, "
            f"{iv['high']:.2f}]") in line
  diff_rows = [line for line in summary.splitlines() if " - trained" in line]
  assert len(diff_rows) == 6
  for line in diff_rows:
    if "random - trained" in line:
      assert "no difference" not in line and "lower" in line
    else:
      assert "no difference" in line
  assert "EC50" not in summary.split("\n\n")[1]   # the table
  assert "no meaningful interval" in summary
  assert "sites resampled" in report or "resamples sites" in summary
  with pytest.raises(ValueError, match="must differ"):
    evaluate([EmbeddingSet("x", str(d / "emb.parquet")),
              EmbeddingSet("x", str(d / "emb.parquet"))], str(out),
             options=FAST, log=lambda s: None)


def test_headline_lines_carry_intervals_and_differences(data, tmp_path):
  """The demo's headline text: intervals, and "no difference" for a set
  identical to the first."""
  from gandl_jax.evaluate import compare
  d = data[0]
  m = evaluate([EmbeddingSet("trained", str(d / "emb.parquet"),
                             metadata=str(d / "metadata.csv")),
                EmbeddingSet("random", str(d / "random.parquet")),
                EmbeddingSet("again", str(d / "emb.parquet"))],
               str(tmp_path / "o"), tasks=["control"], options=FAST,
               log=lambda s: None)
  text = "\n".join(compare.headline_lines(m))
  s = m["embeddings"]["trained"]["control"]["plate"]
  iv = s["balanced_accuracy_interval"]
  assert (f"{s['balanced_accuracy']:.3f} [{iv['low']:.2f}, "
          f"{iv['high']:.2f}]") in text
  assert "again - trained: +0.000 [0.00, 0.00] no difference" in text
  assert "random - trained" in text and "lower" in text
  assert "EC50" not in text


def test_full_report_with_baseline(data):
  d, md, X, truth = data
  out = d / "out"
  m = evaluate([EmbeddingSet("trained", str(d / "emb.parquet"),
                             rxrx1=str(d / "rx1.parquet"),
                             metadata=str(d / "metadata.csv")),
                EmbeddingSet("random", str(d / "random.parquet"))], str(out),
               compounds=["GS-441524", "Not A Compound"], options=FAST,
               log=lambda s: None)
  disk = _strict_json(out / "metrics.json")
  assert disk["names"] == ["trained", "random"]
  tr, rnd = disk["embeddings"]["trained"], disk["embeddings"]["random"]
  for task in ("control", "cell_model", "dose_response", "truth", "rxrx1",
               "activity", "replicates"):
    assert tr[task]["status"] == "ok", (task, tr[task])
  assert tr["consistency"]["status"] == "skipped"
  # Retrieval: the trained set's compound-doses beat random features.
  assert tr["activity"]["mean_map"] > rnd["activity"]["mean_map"]
  assert rnd["rxrx1"]["status"] == "skipped"
  # The planted signal is found; random features are near chance.
  # (112 test sites: a balanced accuracy moves by +-0.08 with the split;
  # the paired difference is the robust check.)
  assert tr["control"]["random"]["balanced_accuracy"] > 0.7
  assert rnd["control"]["random"]["balanced_accuracy"] < 0.65
  for split in ("random", "plate"):
    (r,) = disk["comparisons"]["control"][split]
    assert r["set"] == "random" and r["verdict"] == "lower", r
  assert tr["control"]["plate"]["status"] == "ok"
  assert tr["cell_model"]["plate"]["status"] == "ok"
  assert tr["rxrx1"]["random"]["accuracy"] > 0.7   # 4 classes: chance 0.25
  # Planted truth: all rescue compounds found, EC50 ranks agree.
  t = tr["truth"]
  assert t["true_hits"] == 3 and t["hits_found"] == 3
  assert t["ec50_median_abs_log10_error"] < 0.3
  assert tr["dose_response"]["named_not_found"] == ["Not A Compound"]
  assert tr["dose_response"]["named"][0]["treatment"] == "GS-441524"
  # Report and figures exist, figures referenced by the report.
  report = (out / "report.md").read_text()
  for rel in ("figures/dose_response.png",
              "figures/confusion_control_trained.png",
              "figures/confusion_control_random.png",
              "figures/projection_trained.png",
              "figures/projection_rxrx1_trained.png"):
    assert (out / rel).stat().st_size > 1000
    assert rel in report
  assert "| random split | accuracy |" in report
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  assert m["embeddings"]["trained"]["control"]["random"]["accuracy"] == \
      tr["control"]["random"]["accuracy"]


def test_bad_input_reported_other_tasks_run(data, tmp_path):
  d, md, X, _ = data
  X = X.copy()
  X[:5, 1] = np.nan
  meta = md[["site_id"]].copy()
  meta.loc[10:12, "site_id"] = ["NOPE_1_A01_1", "NOPE_1_A01_2", "NOPE_1_A01_3"]
  p = str(tmp_path / "bad.parquet")
  write_embeddings(p, meta, X, include_metadata=False)
  md_no_vero = md[md["cell_type"] == "HRCE"]
  # VERO site_ids are now unknown too: cell_model has a single class.
  m = evaluate([EmbeddingSet("embeddings", p, metadata=md_no_vero)],
               str(tmp_path / "out"), tasks=["control", "cell_model", "rxrx1"],
               options=FAST, log=lambda s: None)
  e = m["embeddings"]["embeddings"]
  issues = "\n".join(e["input"]["issues"])
  assert "5 row(s) with missing, NaN or infinite" in issues
  n_vero = int((md["cell_type"] == "VERO").sum())
  assert f"{n_vero + 3} site_id(s) not in metadata" in issues
  assert e["control"]["status"] == "ok"
  assert e["cell_model"]["status"] == "failed"
  assert "task cell_model" in e["cell_model"]["reason"]
  assert "'VERO': 0" in e["cell_model"]["reason"]
  assert e["rxrx1"]["status"] == "skipped"
  assert "dose_response" not in e
  _strict_json(tmp_path / "out" / "metrics.json")


def test_unknown_task_rejected(data, tmp_path):
  d = data[0]
  with pytest.raises(ValueError, match="unknown task"):
    evaluate([EmbeddingSet("e", str(d / "emb.parquet"))], str(tmp_path),
             tasks=["contrl"])


@pytest.mark.e2e
def test_cli(data, tmp_path):
  d = data[0]
  out = tmp_path / "cli"
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.evaluate",
       f"--embeddings={d / 'emb.parquet'}", f"--output={out}",
       "--tasks=control,dose_response", "--c_grid=0.1",
       '--compounds="Remdesivir (GS-5734)",GS-441524', "--aggregate=well"],
      capture_output=True, text=True, env=env, timeout=240)
  assert r.returncode == 0, r.stderr[-2000:]
  m = _strict_json(out / "metrics.json")
  e = m["embeddings"]["embeddings"]
  assert e["postprocessing"]["aggregation"]["level"] == "well"
  assert e["control"]["random"]["C"] == 0.1
  assert {r["treatment"] for r in e["dose_response"]["named"]} == {
      "Remdesivir (GS-5734)", "GS-441524"}
  r = subprocess.run([sys.executable, "-m", "gandl_jax.cli.evaluate",
                      "--embeddings=/nonexistent.parquet", f"--output={out}"],
                     capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 1 and "/nonexistent.parquet" in r.stderr


def test_recursion_csv_without_metadata_reports_each_task(data, tmp_path):
  d, md, X, _ = data
  df = pd.DataFrame(X, columns=[str(i) for i in range(X.shape[1])])
  df.insert(0, "site_id", md["site_id"].values)
  p = tmp_path / "embeddings.csv"
  df.to_csv(p, index=False)
  with pytest.raises(AllTasksFailed) as err:
    evaluate([EmbeddingSet("embeddings", str(p))], str(tmp_path / "out"),
             tasks=["control", "cell_model", "dose_response"],
             options=FAST, log=lambda s: None)
  e = err.value.metrics["embeddings"]["embeddings"]
  for task in ("control", "cell_model", "dose_response"):
    assert e[task]["status"] == "failed"
  assert "--metadata" in e["control"]["reason"]
  assert "control classifier" in e["dose_response"]["reason"]
  assert "every task failed" in str(err.value)
  assert "--metadata" in str(err.value)
  # No report that reads as results.
  assert not (tmp_path / "out" / "report.md").exists()
  assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.e2e
def test_cli_exit_status_when_tasks_fail(data, tmp_path):
  """Exit status 1 with one error line and no report when every task that
  ran failed, 3 when some did (README, "Exit status"); then metrics.json
  and the report are written."""
  d, md, X, _ = data
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  # Recursion's layout without --metadata: no labels, every task fails.
  df = pd.DataFrame(X, columns=[str(i) for i in range(X.shape[1])])
  df.insert(0, "site_id", md["site_id"].values)
  emb = tmp_path / "embeddings.csv"
  df.to_csv(emb, index=False)
  out = tmp_path / "all_failed"
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.evaluate", f"--embeddings={emb}",
       f"--output={out}", "--tasks=control,cell_model", "--c_grid=0.1"],
      capture_output=True, text=True, env=env, timeout=240)
  assert r.returncode == 1, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines()
            if l.startswith("gandl-evaluate: error:")]
  assert len(errors) == 1, r.stderr[-2000:]
  assert "every task failed" in errors[0] and "--metadata" in errors[0]
  assert "Traceback" not in r.stderr
  assert not (out / "metrics.json").exists()
  assert not (out / "report.md").exists()
  # Metadata without the VERO sites: control runs, cell_model fails.
  meta = tmp_path / "hrce_only.csv"
  md[md["cell_type"] == "HRCE"].to_csv(meta, index=False)
  out = tmp_path / "some_failed"
  r = subprocess.run(
      [sys.executable, "-m", "gandl_jax.cli.evaluate", f"--embeddings={emb}",
       f"--metadata={meta}", f"--output={out}",
       "--tasks=control,cell_model", "--c_grid=0.1"],
      capture_output=True, text=True, env=env, timeout=240)
  assert r.returncode == 3, r.stderr[-2000:]
  e = _strict_json(out / "metrics.json")["embeddings"]["embeddings"]
  assert e["control"]["status"] == "ok" and e["cell_model"]["status"] == "failed"


@pytest.mark.e2e
def test_bench_evaluate_removes_only_its_own_files(tmp_path):
  """tools/bench/evaluate.py --workdir DIR leaves what else is in DIR
  alone."""
  wd = tmp_path / "work"
  (wd / "mine").mkdir(parents=True)
  (wd / "mine" / "results.txt").write_text("keep")
  (wd / "notes.txt").write_text("keep too")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run(
      [sys.executable, "-m", "tools.bench.evaluate",
       f"--workdir={wd}", "--sites=6000", "--dim=4", "--tasks=control"],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo),
      timeout=300, cwd=repo)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "control random: accuracy" in r.stderr
  assert sorted(os.listdir(wd)) == ["mine", "notes.txt"]
  assert (wd / "mine" / "results.txt").read_text() == "keep"


def _results(m):
  """metrics.json without what measures the run (timings)."""
  if isinstance(m, dict):
    return {k: _results(v) for k, v in m.items()
            if k not in ("timing_s", "elapsed_s")}
  if isinstance(m, list):
    return [_results(v) for v in m]
  return m


def test_tasks_side_by_side_give_the_same_results(data, tmp_path):
  """All tasks on 4 threads (the two SVM tasks at once, next to the
  retrieval metrics) give metrics.json and CSV tables identical to one
  thread, keys in the same order."""
  d, md, X, truth = data
  outs = {}
  for threads in (1, 4):
    out = tmp_path / f"t{threads}"
    evaluate([EmbeddingSet("embeddings", str(d / "emb.parquet"),
                           metadata=str(d / "metadata.csv"))], str(out),
             compounds=["GS-441524"], log=lambda s: None,
             tasks=["control", "cell_model", "dose_response", "truth",
                    "activity", "replicates"],
             options=dataclasses.replace(FAST, threads=threads))
    outs[threads] = out
  m1 = _results(_strict_json(outs[1] / "metrics.json"))
  m4 = _results(_strict_json(outs[4] / "metrics.json"))
  assert json.dumps(m1) == json.dumps(m4)          # values and key order
  e = m1["embeddings"]["embeddings"]
  for task in ("control", "cell_model", "dose_response", "truth", "activity",
               "replicates"):
    assert e[task]["status"] == "ok", (task, e[task])
  csvs = sorted(f for f in os.listdir(outs[1]) if f.endswith(".csv"))
  assert len(csvs) == 4
  for f in csvs:
    assert (outs[1] / f).read_bytes() == (outs[4] / f).read_bytes(), f


@pytest.fixture
def toy_task():
  """A task added with one function and one registration; removed after."""
  from gandl_jax.evaluate import registry, report

  def section(sets, rctx):
    rows = [[n, s["toy"].get("n_rows")] for n, s in sets.items() if "toy" in s]
    return "\n".join(["## Toy task", "", report.table(["embeddings", "rows"],
                                                      rows), ""])

  @registry.register_task("toy", section=section, requires=("control",),
                          default=False)
  def toy(ctx):
    acc = ctx.shared["control"].metrics["balanced_accuracy"]
    return {"n_rows": int(len(ctx.emb.meta)),
            "feature_sum": float(ctx.emb.features.astype(np.float64).sum()),
            "control_balanced_accuracy": acc}

  yield toy
  registry.unregister_task("toy")


def test_registered_task_in_metrics_and_report(data, tmp_path, toy_task):
  """One function + one registration: the task runs on every set after the
  task it requires, sees the post-processed rows and that task's model,
  and lands in metrics.json and report.md."""
  from gandl_jax.evaluate import postprocess
  from gandl_jax.evaluate import registry
  from gandl_jax.evaluate.io import load_embeddings
  d, md, X, _ = data
  out = tmp_path / "out"
  m = evaluate([EmbeddingSet("trained", str(d / "emb.parquet"),
                             metadata=str(d / "metadata.csv")),
                EmbeddingSet("random", str(d / "random.parquet"))], str(out),
               tasks=["toy"], options=FAST, log=lambda s: None)
  disk = _strict_json(out / "metrics.json")
  assert disk == json.loads(json.dumps(m))
  assert disk["tasks_requested"] == ["toy"]
  for name, path in (("trained", "emb.parquet"), ("random", "random.parquet")):
    e = disk["embeddings"][name]
    assert list(e) == ["input", "postprocessing", "control", "toy",
                       "timing_s"]
    t = e["toy"]
    assert t["status"] == "ok"
    assert t["n_rows"] == len(md)
    emb, _ = postprocess(load_embeddings(str(d / path),
                                         str(d / "metadata.csv")), FAST,
                         owned=True)
    np.testing.assert_allclose(
        t["feature_sum"], emb.features.astype(np.float64).sum(), rtol=1e-9)
    assert t["control_balanced_accuracy"] == \
        e["control"]["random"]["balanced_accuracy"]
    assert "toy" in e["timing_s"]
  report = (out / "report.md").read_text()
  sec = report[report.index("## Toy task"):]
  assert f"| trained | {len(md)} |" in sec and f"| random | {len(md)} |" in sec
  # Its requirement failing fails it with the reason.
  with pytest.raises(AllTasksFailed) as err:
    evaluate([EmbeddingSet("x", str(d / "random.parquet"))],
             str(tmp_path / "fail"), tasks=["toy"], options=FAST,
             log=lambda s: None)
  t = err.value.metrics["embeddings"]["x"]["toy"]
  assert t["status"] == "failed"
  assert t["reason"].startswith("needs the control classifier: ")
  assert "toy" in registry.TASKS


def test_toy_task_removed_after_its_test():
  from gandl_jax.evaluate import registry
  assert "toy" not in registry.TASKS
  with pytest.raises(ValueError, match="unknown task"):
    registry.resolve(["toy"])


def _cli(args, timeout=240):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, "-m", "gandl_jax.cli.evaluate",
                         *args], capture_output=True, text=True, env=env,
                        timeout=timeout)


@pytest.mark.e2e
def test_cli_one_plate_split_failure_fails_the_task(data, tmp_path):
  """One plate: the plate split cannot run, so the control task is
  "failed" (in part: its random split is kept and reported) and the exit
  status is 3, not 0; dose-response still runs on the random split's
  classifier."""
  d, md, X, _ = data
  one = md.copy()
  one["experiment"], one["plate"] = "HRCE-1", 1
  meta = tmp_path / "one_plate.csv"
  one.to_csv(meta, index=False)
  out = tmp_path / "one"
  r = _cli([f"--embeddings={d / 'emb.parquet'}", f"--metadata={meta}",
            f"--output={out}", "--tasks=control,dose_response",
            "--c_grid=0.1"])
  assert r.returncode == 3, r.stderr[-2000:]
  m = _strict_json(out / "metrics.json")
  c = m["embeddings"]["embeddings"]["control"]
  assert c["status"] == "failed" and c["partial"] is True
  assert c["reason"].startswith("plate split: ")
  assert c["random"]["status"] == "ok"
  assert c["plate"]["status"] == "failed"
  assert m["embeddings"]["embeddings"]["dose_response"]["status"] == "ok"
  report = (out / "report.md").read_text()
  acc = c["random"]["balanced_accuracy"]
  assert f"{acc:.3f}" in report
  assert "plate split: " in report


@pytest.mark.e2e
def test_cli_unknown_task_is_a_usage_error(data, tmp_path):
  """A misspelt --tasks is a bad command line: exit 2 with the usage line,
  before anything is read or written."""
  d = data[0]
  r = _cli([f"--embeddings={d / 'emb.parquet'}",
            f"--output={tmp_path / 'o'}", "--tasks=activty"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert "unknown task(s) ['activty']" in r.stderr
  assert not (tmp_path / "o").exists()
  r = _cli(["--bogus_flag=1"])
  assert r.returncode == 2 and "bogus_flag" in r.stderr


def test_rerun_into_the_same_output_removes_the_previous_runs_files(
    data, tmp_path):
  """A second run into the same directory removes what the first wrote
  (listed in its manifest) and nothing else: no table of a set the new run
  does not evaluate is left to read as its result."""
  from gandl_jax.evaluate import outputs
  d, md, X, _ = data
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  (out / "figures").mkdir()
  (out / "figures" / "my_plot.png").write_text("mine")
  opts = dataclasses.replace(FAST, retrieval=dataclasses.replace(
      FAST.retrieval, null_size=200))
  evaluate([EmbeddingSet("trained", str(d / "emb.parquet"),
                         metadata=str(d / "metadata.csv")),
            EmbeddingSet("other", str(d / "random.parquet"))], str(out),
           tasks=["control", "activity", "replicates"], options=opts,
           log=lambda s: None)
  first = set(json.loads((out / outputs.MANIFEST).read_text())["files"])
  assert {"map_activity_other.csv", "replicates_other.csv",
          "figures/confusion_control_other.png", "metrics.json",
          "report.md"} <= first
  for rel in first:
    assert (out / rel).exists(), rel
  evaluate([EmbeddingSet("trained", str(d / "emb.parquet"),
                         metadata=str(d / "metadata.csv"))], str(out),
           tasks=["control"], options=opts, log=lambda s: None)
  second = set(json.loads((out / outputs.MANIFEST).read_text())["files"])
  for rel in first - second:
    assert not (out / rel).exists(), rel
  assert not (out / "map_activity_other.csv").exists()
  assert not (out / "map_activity_trained.csv").exists()
  assert not (out / "figures" / "confusion_control_other.png").exists()
  assert (out / "figures" / "confusion_control_trained.png").exists()
  assert (out / "notes.txt").read_text() == "mine"
  assert (out / "figures" / "my_plot.png").read_text() == "mine"
  # A manifest naming a path outside the directory removes nothing there.
  outside = tmp_path / "outside.txt"
  outside.write_text("keep")
  (out / outputs.MANIFEST).write_text(json.dumps(
      {"files": ["../outside.txt", str(outside), "report.md"]}))
  evaluate([EmbeddingSet("trained", str(d / "emb.parquet"),
                         metadata=str(d / "metadata.csv"))], str(out),
           tasks=["control"], options=opts, log=lambda s: None)
  assert outside.read_text() == "keep"
  # A run whose every task fails leaves no result of the earlier run.
  with pytest.raises(AllTasksFailed):
    evaluate([EmbeddingSet("x", str(d / "random.parquet"))], str(out),
             tasks=["control"], options=opts, log=lambda s: None)
  assert not (out / "metrics.json").exists()
  assert not (out / "report.md").exists()
  assert (out / "notes.txt").read_text() == "mine"
