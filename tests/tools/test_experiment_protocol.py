"""tools/experiments/protocol.py's tables: means over seeds and differences
paired by seed, against numpy and the t closed form."""
import math

import numpy as np
import pytest

from tools.experiments import protocol

T975_2 = 4.302652729911275  # t_{0.975, 2 degrees of freedom}


def _rows():
  rows = [{"set": "untrained D", "seed": s, "kimg": 0.0, "acc": v}
          for s, v in zip((0, 1, 2), (0.60, 0.55, 0.65))]
  rows += [{"set": "classical", "seed": -1, "kimg": 0.0, "acc": 1.0}]
  for name, vals in (("off", {10: (0.70, 0.66, 0.74), 20: (0.62, 0.57, 0.60)}),
                     ("ada", {10: (0.72, 0.70, 0.75), 20: (0.71, 0.69, 0.76)})):
    for kimg, vs in vals.items():
      rows += [{"set": name, "seed": s, "kimg": float(kimg), "acc": v}
               for s, v in zip((0, 1, 2), vs)]
  rows.append({"set": "off", "seed": 2, "kimg": 30.0, "acc": float("nan")})
  return rows


def test_summarize_is_mean_with_t_interval_over_seeds():
  summary = {(s["set"], s["kimg"]): s
             for s in protocol.summarize(_rows(), ["acc"])}
  cell = summary[("off", 10.0)]["acc"]
  v = np.array([0.70, 0.66, 0.74])
  half = T975_2 * v.std(ddof=1) / math.sqrt(3)
  assert cell["mean"] == pytest.approx(v.mean())
  assert (cell["low"], cell["high"]) == pytest.approx((v.mean() - half,
                                                       v.mean() + half))
  # Non-finite values are left out; a kimg with none has no cell.
  assert "acc" not in summary[("off", 30.0)]
  text = protocol.table(list(summary.values()), ["acc"])
  assert f"| off | 10 | 3 | {v.mean():.3f} [{v.mean() - half:.2f}, " in text
  assert "| classical | 0 | 1 | 1.000 |" in text   # one value: no interval


def test_paired_differences_pair_by_seed_and_kimg():
  rows = _rows()
  vs_off = {(d["set"], d["kimg"]): d
            for d in protocol.paired_differences(rows, "acc", "off")}
  d = vs_off[("ada", 20.0)]
  diffs = np.array([0.71 - 0.62, 0.69 - 0.57, 0.76 - 0.60])
  assert d["diff"] == pytest.approx(diffs.mean())
  half = T975_2 * diffs.std(ddof=1) / math.sqrt(3)
  assert d["low"] == pytest.approx(diffs.mean() - half)
  assert d["no_difference"] is False
  # The seedless baseline and the untrained D (no off row at kimg 0) are
  # not paired.
  assert {k[0] for k in vs_off} == {"ada"}
  # A baseline measured at one kimg (the untrained D) pairs with every kimg.
  vs_init = {(d["set"], d["kimg"]): d for d in
             protocol.paired_differences(rows, "acc", "untrained D")}
  assert vs_init[("off", 20.0)]["diff"] == pytest.approx(
      np.mean([0.62 - 0.60, 0.57 - 0.55, 0.60 - 0.65]))
  assert vs_init[("off", 20.0)]["no_difference"] is True
  text = protocol.difference_table(list(vs_init.values()), "minus init")
  assert "| off | 20 | 3 | +0.000" not in text
  assert "(no difference)" in text
  one = protocol.paired_differences(
      [{"set": "a", "seed": 0, "kimg": 1.0, "acc": 0.7},
       {"set": "b", "seed": 0, "kimg": 1.0, "acc": 0.6}], "acc", "b")
  assert protocol.difference_table(one, "x").splitlines()[-1] == (
      "| a | 1 | 1 | +0.100 (one seed: no interval) |")


def test_peak_and_last_per_run():
  rows = _rows()
  peaks = {p["set"]: p for p in protocol.peak_and_last(
      [r for r in rows if r["set"] in ("off", "ada")], "acc")}
  off = peaks["off"]
  assert off["n"] == 3
  assert off["best"]["mean"] == pytest.approx(np.mean([0.70, 0.66, 0.74]))
  assert off["last"]["mean"] == pytest.approx(np.mean([0.62, 0.57, 0.60]))
  assert off["drop"]["mean"] == pytest.approx(
      np.mean([0.62 - 0.70, 0.57 - 0.66, 0.60 - 0.74]))
  # ada's seed 2 peaks last: drop 0 there, best kimg averaged.
  assert peaks["ada"]["drop"]["mean"] == pytest.approx(
      np.mean([0.71 - 0.72, 0.69 - 0.70, 0.0]))
  assert peaks["ada"]["best_kimg"] == pytest.approx((10 + 10 + 20) / 3)
  # Two points per run: the slope per 10 kimg is last minus first (seed 2's
  # NaN at 30 kimg left out).
  assert off["trend"]["mean"] == pytest.approx(off["drop"]["mean"])
  assert peaks["ada"]["trend"]["mean"] == pytest.approx(
      np.mean([0.71 - 0.72, 0.69 - 0.70, 0.76 - 0.75]))
  text = protocol.peak_table(list(peaks.values()))
  assert "| off | 3 | 0.700 [" in text and "| -0.103 [" in text
  assert text.count("| -0.103 [") == 2   # last - best and the trend


def test_trend_is_the_least_squares_slope_per_10_kimg():
  # Seed s: 0.5 + (0.01 + s/1000) kimg, plus 0.02 at 10 kimg. Closed form of
  # the least-squares slope over kimg 0, 10, 20, 30 (mean 15, sum of squared
  # deviations 500): b + 0.02 (10 - 15) / 500, so per 10 kimg
  # 10 b - 0.002; the mean of 10 b over seeds 0-2 is 0.11.
  rows = [{"set": "x", "seed": s, "kimg": k,
           "acc": 0.5 + (0.01 + s / 1000) * k + (0.02 if k == 10 else 0.0)}
          for s in range(3) for k in (0.0, 10.0, 20.0, 30.0)]
  trend = protocol.peak_and_last(rows, "acc")[0]["trend"]
  assert trend["mean"] == pytest.approx(0.108)
  assert trend["sd"] == pytest.approx(0.01)


def test_plot_writes_one_figure_per_label(tmp_path):
  paths = protocol.plot(protocol.summarize(_rows(), ["acc"]), ["acc"],
                        str(tmp_path), "_x")
  assert paths == [str(tmp_path / "acc_x.png")]
  with open(paths[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_forgetting_summary_sections(tmp_path):
  rows = [{"set": "untrained D", "seed": s, "kimg": 0.0, "source": "evaluate",
           "control/plate": 0.55 + 0.01 * s} for s in range(3)]
  rows.append({"set": "classical features", "seed": -1, "kimg": 0.0,
               "source": "evaluate", "control/plate": 1.0})
  for v, base in (("off", 0.6), ("ada", 0.7)):
    for s in range(3):
      rows.append({"set": v, "seed": s, "kimg": 20.0, "source": "evaluate",
                   "control/plate": base + 0.02 * s})
      for k, drop in ((5.0, 0.0), (10.0, 0.1 if v == "off" else 0.0)):
        rows.append({"set": v, "seed": s, "kimg": k, "source": "probe",
                     "probe/control_bacc": 0.8 - drop,
                     "probe/control/b8": 0.7, "probe/plates": 4.0,
                     "probe/seconds": 2.0,
                     "augment_p": 0.1 if v == "ada" else None})
  text = protocol.forgetting_sections(rows, str(tmp_path))
  # ada minus off at 20 kimg, paired by seed: +0.100 exactly, every seed.
  assert "| ada | 20 | 3 | +0.100 [0.10, 0.10] |" in text
  assert "| off | 20 | 3 | +0.060 [" in text    # minus the untrained D
  assert "| classical features | 0 | 1 | n/a | 1.000 | n/a |" in text
  # Probe columns: per-layer control, the selection layer, ADA's p; not the
  # bookkeeping ones.
  header = next(l for l in text.splitlines() if "probe/control/b8" in l)
  assert "augment_p" in header and "probe/plates" not in header
  assert "probe/control_bacc" not in header   # = its layer's column
  assert "probe/seconds" not in header
  # off lost 0.1 between its best (5 kimg) and its last probe; ada nothing.
  assert "| off | 3 | 0.800 [0.80, 0.80] | 5 | 0.700 [0.70, 0.70] | " \
      "-0.100 [-0.10, -0.10] |" in text
  assert (tmp_path / "control_plate.png").exists()
  assert (tmp_path / "probe_control_bacc.png").exists()


def test_forgetting_layers_pair_within_their_layer(tmp_path, monkeypatch):
  rows = []
  for layer, init, trained in (("fc", 0.50, 0.55), ("b8", 0.60, 0.80)):
    name = protocol.layer_set("untrained D", layer)
    rows += [{"set": name, "seed": s, "kimg": 0.0, "layer": layer,
              "source": "evaluate", "control/plate": init + 0.01 * s}
             for s in range(3)]
    rows += [{"set": protocol.layer_set("off", layer), "seed": s,
              "kimg": 20.0, "layer": layer, "source": "evaluate",
              "control/plate": trained + 0.03 * s} for s in range(3)]
  # Probe: seed s's b8 rises by 0.01 (1 + s) per kimg, fc stays flat.
  rows += [{"set": "off", "seed": s, "kimg": k, "source": "probe",
            "probe/control_bacc": 0.6, "probe/control/fc": 0.6,
            "probe/control/b8": 0.5 + 0.01 * (1 + s) * k}
           for s in range(3) for k in (5.0, 10.0, 15.0)]
  drawn = []
  monkeypatch.setattr(protocol, "plot", lambda summary, *a, **k: drawn.extend(
      {s["set"] for s in summary}) or [])
  text = protocol.forgetting_sections(rows, str(tmp_path))
  assert set(drawn) == {"untrained D", "off"}   # figures: fc only
  # Each layer minus its own untrained D: 0.05 + 0.02 s and 0.20 + 0.02 s,
  # mean 0.07 and 0.22, sd 0.02.
  h = T975_2 * 0.02 / math.sqrt(3)
  assert f"| off | 20 | 3 | +0.070 [{0.07 - h:.2f}, {0.07 + h:.2f}]" in text
  assert (f"| off [b8] | 20 | 3 | +0.220 [{0.22 - h:.2f}, {0.22 + h:.2f}]"
          in text)
  # Trend per 10 kimg: 0.1 (1 + s), mean 0.2, sd 0.1; fc exactly flat.
  h = T975_2 * 0.1 / math.sqrt(3)
  line = next(l for l in text.splitlines() if l.startswith("| off | 3 | +0.200"))
  assert line == (f"| off | 3 | +0.200 [{0.2 - h:.2f}, {0.2 + h:.2f}] | "
                  "+0.000 [0.00, 0.00] |")
  assert protocol.layer_set("off", "fc") == "off"


def test_probe_layers_in_network_order():
  row = {f"probe/control/{l}": 0.5 for l in ("fc", "b16", "conv", "b8", "b32")}
  assert protocol.forgetting_probe_labels([row]) == [
      "probe/control/b32", "probe/control/b16", "probe/control/b8",
      "probe/control/conv", "probe/control/fc"]


def test_plot_with_rows_draws_each_seed(tmp_path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = _rows()
  drawn = []
  orig = plt.Axes.plot
  def spy(self, *args, **kwargs):
    drawn.append(kwargs.get("label"))
    return orig(self, *args, **kwargs)
  plt.Axes.plot = spy
  try:
    protocol.plot(protocol.summarize(rows, ["acc"]), ["acc"], str(tmp_path),
                  rows=rows)
  finally:
    plt.Axes.plot = orig
  # off and ada: 3 seeds each (thin, unlabelled) and their mean.
  assert sorted(l for l in drawn if l) == ["ada (mean)", "off (mean)"]
  assert drawn.count(None) == 6
