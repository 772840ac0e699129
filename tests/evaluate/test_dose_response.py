"""4PL fits recover known EC50s; intervals match closed forms / scipy."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gandl_jax.evaluate import dose_response as dr

DOSES = 10 * 10 ** (-0.5 * np.arange(8))[::-1]      # 8 half-log doses, uM


def test_four_pl_closed_form():
  c = np.array([0.01, 0.3, 1.0, 7.0])
  y = dr.four_pl(c, 0.1, 0.9, 0.3, 1.7)
  expect = 0.1 + 0.8 * c ** 1.7 / (c ** 1.7 + 0.3 ** 1.7)
  np.testing.assert_allclose(y, expect, rtol=1e-12)
  assert dr.four_pl(0.3, 0.1, 0.9, 0.3, 1.7) == pytest.approx(0.5)


@pytest.mark.parametrize("ec50,hill,bottom,top", [
    (0.05, 1.0, 0.0, 1.0), (0.8, 1.5, 0.1, 0.9), (3.0, 0.8, -0.2, 1.2),
    (0.3, 3.0, 0.0, 0.6)])
def test_noiseless_recovery(ec50, hill, bottom, top):
  y = dr.four_pl(DOSES, bottom, top, ec50, hill)
  fit = dr.fit_4pl(DOSES, y)
  assert fit["flag"] == dr.FLAG_OK
  assert fit["ec50"] == pytest.approx(ec50, rel=1e-4)
  assert fit["hill"] == pytest.approx(hill, rel=1e-4)
  assert fit["bottom"] == pytest.approx(bottom, abs=1e-4)
  assert fit["top"] == pytest.approx(top, abs=1e-4)
  assert fit["efficacy"] == pytest.approx(
      dr.four_pl(DOSES.max(), bottom, top, ec50, hill), abs=1e-5)
  # Closed form: the fitted curve passes the midpoint at the EC50.
  mid = dr.four_pl(fit["ec50"], fit["bottom"], fit["top"], fit["ec50"],
                   fit["hill"])
  assert mid == pytest.approx((bottom + top) / 2, abs=1e-4)


def test_noisy_recovery():
  rng = np.random.default_rng(0)
  errs = []
  for ec50 in (0.1, 0.4, 1.2, 2.5):
    c = np.repeat(DOSES, 6)
    y = dr.four_pl(c, 0.0, 1.0, ec50, 1.2) + 0.08 * rng.standard_normal(len(c))
    fit = dr.fit_4pl(c, y)
    assert fit["flag"] == dr.FLAG_OK
    errs.append(abs(np.log10(fit["ec50"]) - np.log10(ec50)))
  assert max(errs) < 0.15


def test_flat_and_too_few():
  rng = np.random.default_rng(1)
  flat = dr.fit_4pl(DOSES, 0.3 + 0.01 * rng.standard_normal(len(DOSES)))
  assert flat["flag"] == dr.FLAG_FLAT and flat["ec50"] is None
  few = dr.fit_4pl(DOSES[:3], [0, 0.5, 1])
  assert few["flag"] == dr.FLAG_FEW and "3 distinct" in few["reason"]


def test_ec50_outside_range_flagged():
  y = dr.four_pl(DOSES, 0.0, 1.0, 200.0, 1.0)     # EC50 far above the doses
  fit = dr.fit_4pl(DOSES, y)
  assert fit["flag"] in (dr.FLAG_OUTSIDE, dr.FLAG_FLAT)


def test_wilson_known_value():
  lo, hi = dr.wilson_interval(np.array([5]), np.array([10]))
  assert lo[0] == pytest.approx(0.2366, abs=1e-4)
  assert hi[0] == pytest.approx(0.7634, abs=1e-4)


def test_summarize_points_t_interval():
  rng = np.random.default_rng(2)
  df = pd.DataFrame({"group": "HRCE", "treatment": "X",
                     "conc": np.repeat([0.1, 1.0], 7),
                     "rescue": rng.standard_normal(14),
                     "healthy": rng.random(14) > 0.5})
  pts = dr.summarize_points(df)
  sub = df[df["conc"] == 1.0]["rescue"].to_numpy()
  lo, hi = stats.t.interval(0.95, len(sub) - 1, loc=sub.mean(),
                            scale=stats.sem(sub))
  row = pts[pts["conc"] == 1.0].iloc[0]
  assert row["ci_low"] == pytest.approx(lo) and row["ci_high"] == pytest.approx(hi)
  assert row["n"] == 7


def test_fit_all_ranks_actives_first():
  rows = []
  for name, ec50, top in (("inactive", 1.0, 0.0), ("weak", 1.0, 0.4),
                          ("strong", 0.2, 1.0), ("strong_late", 2.0, 1.0)):
    for c in DOSES:
      rows.append({"group": "HRCE", "treatment": name, "conc": c, "n": 10,
                   "mean": dr.four_pl(c, 0.0, top, ec50, 1.0) if top else
                   0.01 * np.sin(c)})
  fits = dr.fit_all(pd.DataFrame(rows), hit_threshold=0.5)
  assert fits["treatment"].tolist()[:2] == ["strong", "strong_late"]
  assert fits.set_index("treatment")["hit"].to_dict() == {
      "strong": True, "strong_late": True, "weak": False, "inactive": False}
  assert fits["rank"].tolist() == [1, 2, 3, 4]


def test_fit_all_grouping_equals_per_group_loop(monkeypatch):
  """The grouped pass gives each curve the same points and summaries as the
  old loop over `points.groupby(...)` sub-frames (rows shuffled, two cell
  types, unequal dose counts, a row without a group)."""
  rng = np.random.default_rng(3)
  rows = []
  for group in ("HRCE", "VERO"):
    for t in range(7):
      for c in DOSES[:3 + t % 4]:
        rows.append({"group": group, "treatment": f"C{t}", "conc": c,
                     "n": int(rng.integers(1, 20)),
                     "mean": dr.four_pl(c, 0.0, 1.0, 0.3 * (t + 1), 1.2) +
                     0.05 * rng.standard_normal()})
  rows.append({"group": None, "treatment": "C0", "conc": 1.0, "n": 3,
               "mean": 0.5})
  points = pd.DataFrame(rows).sample(frac=1, random_state=1).reset_index(
      drop=True)
  seen = []
  real = dr.fit_4pl_many
  def spy(curves, cfg):
    seen.extend(curves)
    return real(curves, cfg)
  monkeypatch.setattr(dr, "fit_4pl_many", spy)
  fits = dr.fit_all(points)
  expect = []
  for (g, t), sub in points.groupby(["group", "treatment"], sort=True):
    expect.append(((g, t), (sub["conc"].to_numpy(), sub["mean"].to_numpy(),
                            sub["n"].to_numpy()),
                   {"n_sites": int(sub["n"].sum()),
                    "n_concentrations": int(sub["conc"].nunique()),
                    "max_mean_rescue": float(sub["mean"].max()),
                    "conc_min": float(sub["conc"].min()),
                    "conc_max": float(sub["conc"].max())}))
  assert len(seen) == len(expect) == 14
  by_key = fits.set_index(["group", "treatment"])
  for (key, curve, summary), got in zip(expect, seen):
    for a, b in zip(curve, got):
      np.testing.assert_array_equal(a, b)
    row = by_key.loc[key]
    for k, v in summary.items():
      assert row[k] == v


def _dose_sets(names, keys, seed=0):
  rng = np.random.default_rng(seed)
  sets = []
  for name in names:
    pts, fits = [], []
    for g, t in keys:
      ec = 10 ** rng.uniform(-1, 1)
      for c in np.geomspace(0.01, 30, 6):
        m = 1 / (1 + ec / c) + rng.normal(0, 0.05)
        pts.append(dict(group=g, treatment=t, conc=c, mean=m,
                        ci_low=m - 0.1, ci_high=m + 0.1))
      fits.append(dict(group=g, treatment=t, top=1.0, bottom=0.0,
                       log10_ec50=np.log10(ec), hill=1.0, efficacy=0.9,
                       flag="ok"))
    sets.append((name, pd.DataFrame(pts), pd.DataFrame(fits)))
  return sets


def test_dose_response_panels_one_colour_per_set_text_outside(
    tmp_path, monkeypatch):
  """Five sets (as the demo's): each in its own colour (trained D and
  ConvAE no longer share one), in the given order (headline first), every
  text outside the axes, the planted EC50 marked; the PNG is written."""
  from matplotlib import colors as mcolors
  from gandl_jax.evaluate import plots
  for n in (1, 5, 10, 14, 25):
    cols = [mcolors.to_hex(c) for c in plots.set_colors(n)]
    assert len(set(cols)) == n
  names = ["trained D", "untrained D", "ConvAE", "classical", "DenseNet"]
  keys = [("HRCE", "A"), ("HRCE", "B"), ("VERO", "A"), ("HRCE", "C")]
  captured = {}
  real_save = plots._save

  def save(fig, path):
    captured["fig"] = fig
    fig.canvas.draw()
    captured["axes"] = [(ax, ax.get_window_extent(),
                         [t for t in ax.texts],
                         [ln for ln in ax.get_lines()]) for ax in fig.axes]
    real_save(fig, path)

  monkeypatch.setattr(plots, "_save", save)
  out = tmp_path / "dr.png"
  plots.dose_response_figure(str(out), keys, _dose_sets(names, keys),
                             planted_ec50={"A": 0.5})
  assert out.stat().st_size > 10_000
  used = {}
  for ax, box, texts, lines in captured["axes"]:
    if not ax.axison:
      continue
    for t in texts:                 # every text below the panel
      tb = t.get_window_extent()
      assert tb.y1 <= box.y0 + 1e-6, t.get_text()
    labels = [t.get_text() for t in texts]
    assert [l.split(":")[0] for l in labels if not l.startswith("planted")
            ] == names             # headline set first, the given order
    for t in texts:
      if not t.get_text().startswith("planted"):
        used.setdefault(t.get_text().split(":")[0],
                        set()).add(mcolors.to_hex(t.get_color()))
    title = ax.get_title()
    planted = [ln for ln in lines if ln.get_label() == "planted EC50"]
    assert bool(planted) == title.startswith("A ")
  colours = {n: c.pop() for n, c in used.items() if len(c) == 1}
  assert set(colours) == set(names)
  assert len(set(colours.values())) == len(names)
  # The legend is outside every panel (below them).
  legend = captured["fig"].legends[0]
  lb = legend.get_window_extent()
  assert all(lb.y1 <= box.y0 for ax, box, _, _ in captured["axes"]
             if ax.axison)
  assert [t.get_text() for t in legend.get_texts()][:5] == names
