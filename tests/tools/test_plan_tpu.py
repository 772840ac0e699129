"""tools/plan_tpu.py in its CPU mode: memory breakdown, FLOPs per image and
the sec/kimg arithmetic, checked against closed forms."""
import jax
import jax.numpy as jnp
import pytest

from tiny import load_tool, tiny_config

plan_tpu = load_tool("plan_tpu")


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_conv_flops_match_cost_analysis(padding):
  n, h, w, c_in, c_out, k = 2, 8, 6, 4, 6, 3
  f = lambda x, k_: jax.lax.conv_general_dilated(
      x, k_, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  compiled = jax.jit(f).lower(
      jax.ShapeDtypeStruct((n, h, w, c_in), jnp.float32),
      jax.ShapeDtypeStruct((k, k, c_in, c_out), jnp.float32)).compile()
  expected = plan_tpu.conv_flops(n, h, w, c_in, c_out, k, padding)
  assert plan_tpu.cost(compiled)["flops"] == expected
  if padding == "VALID":   # the textbook 2 * H_out * W_out * Cin * Cout * k^2
    assert expected == 2 * n * (h - 2) * (w - 2) * c_in * c_out * k * k


def test_tpu_v3_topology_names():
  assert plan_tpu.tpu_v3_topology(8) == "v3:2x2"
  assert plan_tpu.tpu_v3_topology(32) == "v3:4x4"
  assert plan_tpu.tpu_v3_topology(2) == "v3:1x1"
  with pytest.raises(ValueError, match="2 cores per chip"):
    plan_tpu.tpu_v3_topology(12)
  assert plan_tpu.topology_name("tpu_v5e", 8) == "v5e:2x4"
  assert plan_tpu.topology_name("tpu_v5e", 4) == "v5e:2x2"
  assert plan_tpu.topology_name("tpu_v5e", 1) == "v5e:1x1"
  assert plan_tpu.topology_name("tpu_v3", 8) == "v3:2x2"
  with pytest.raises(ValueError, match="power of two"):
    plan_tpu.tpu_v5e_topology(6)


def test_predict_arithmetic():
  # 2 devices, batch 8: per device 4e12 (G main) + 6e12 (D main) +
  # 8e12 / 4 (G reg) + 16e12 / 16 (D reg) = 13e12 FLOPs per iteration.
  results = {"g_main": {"flops": 4e12, "every": 1},
             "d_main": {"flops": 6e12, "every": 1},
             "g_reg": {"flops": 8e12, "every": 4},
             "d_reg": {"flops": 16e12, "every": 16}}
  p = plan_tpu.predict(results, batch=8, devices=2, peak_tflops=50.0,
                       utilization=0.4, total_kimg=100.0)
  assert p["flops_per_iteration_per_device"] == pytest.approx(13e12)
  assert p["flops_per_image"] == pytest.approx(13e12 * 2 / 8)
  sec_iter = 13e12 / (50e12 * 0.4)
  assert p["sec_per_kimg"] == pytest.approx(sec_iter * 1000 / 8)
  assert p["days"] == pytest.approx(p["sec_per_kimg"] * 100 / 86400)


def test_plan_on_cpu_devices():
  plans = {b: plan_tpu.plan(tiny_config(batch_size=b), "cpu", 2, "none",
                            0.35, phases=("d_main",)) for b in (8, 16)}
  for b, p in plans.items():
    assert p["batch"] == b and p["devices"] == 2
    r = p["phases"]["d_main"]
    m = r["memory"]
    assert all(m[k] >= 0 for k in m) and m["temporaries"] > 0
    assert m["total"] == (m["arguments"] + m["outputs"] - m["aliased"] +
                          m["temporaries"] + m["code"])
    # The replicated state dominates the arguments; the real batch
    # (b / 2 images of 8x8x5 uint8 per device, as the pipeline ships them)
    # and beta are the rest.
    state = p["analytic"]["state_bytes"]
    real = b // 2 * 8 * 8 * 5
    assert state + real <= m["arguments"] <= state + real + 4096
    assert m["aliased"] > 0.9 * state       # the state is donated
  # Per device, FLOPs grow with the images each device sees; per image they
  # stay about constant (the per-call optimizer update is amortized).
  f8 = plans[8]["phases"]["d_main"]["flops"]
  f16 = plans[16]["phases"]["d_main"]["flops"]
  assert 1.7 * f8 < f16 < 2.0 * f8
  per_img = [p["phases"]["d_main"]["flops_per_image"] for p in plans.values()]
  assert per_img[1] == pytest.approx(per_img[0], rel=0.15)
  # D main runs G once and D forward + backward on fakes and reals: at least
  # the closed-form G + 2 D forwards, at most G + 6 D plus the elementwise
  # work the closed form leaves out.
  a = plans[16]["analytic"]
  low = a["g_forward_flops"] + 2 * a["d_forward_flops"]
  assert low < per_img[1] < 4 * (a["g_forward_flops"] +
                                 6 * a["d_forward_flops"])
  # With ADA and ContraD on, D main carries the projection heads and their
  # Adam state and runs D on two more views of the reals; the `ada` phase is
  # planned every ada_interval iterations.
  both = plan_tpu.plan(tiny_config(batch_size=8, augment="ada",
                                   ada_interval=4, contrastive=True),
                       "cpu", 2, "none", 0.35, phases=("d_main", "ada"))
  assert both["phases"]["ada"]["every"] == 4 and "ada" not in plans[8][
      "phases"]
  d0, d1 = plans[8]["phases"]["d_main"], both["phases"]["d_main"]
  assert d1["memory"]["arguments"] > d0["memory"]["arguments"] + 1000
  assert d1["flops_per_image"] > 1.5 * d0["flops_per_image"]


def test_export_compiles_on_cpu_devices():
  # The export plan of the TPU compile test, on 2 CPU devices: D forward on
  # uint8 images only, so fewer FLOPs per image than D main, and about the
  # closed-form D forward (within 4% here; XLA counts the FIR filters as
  # shifted sums and the elementwise work the closed form leaves out).
  p = plan_tpu.plan(tiny_config(batch_size=8), "cpu", 2, "none", 0.35,
                    phases=("d_main",), export_batch=8)
  e = p["export"]
  assert e["images"] == 8 and e["layer"] == "fc"
  assert e["memory"]["total"] > 0   # "fits" is None: a CPU has no HBM size
  d_fwd = p["analytic"]["d_forward_flops"]
  assert 0.9 * d_fwd < e["flops_per_image"] < 1.1 * d_fwd
  assert e["flops_per_image"] < p["phases"]["d_main"]["flops_per_image"]


def test_replan_changes_only_the_prediction():
  results = {"g_main": {"flops": 4e12, "every": 1, "xla_optimal_s": 0.5,
                        "memory": {"total": 17 * plan_tpu.GIB}},
             "d_main": {"flops": 6e12, "every": 1, "xla_optimal_s": 0.5,
                        "memory": {"total": 3 * plan_tpu.GIB}}}
  p = {"batch": 8, "devices": 2, "total_kimg": 100.0, "hbm_gib": 16.0,
       "peak_tflops_per_device": 50.0, "utilization": 0.4, "phases": results,
       **plan_tpu.predict(results, 8, 2, 50.0, 0.4, 100.0)}
  q = plan_tpu.replan(p, 0.2)
  assert q["sec_per_kimg"] == pytest.approx(2 * p["sec_per_kimg"])
  assert q["xla_optimal_sec_per_kimg"] == p["xla_optimal_sec_per_kimg"] == (
      pytest.approx(1.0 * 1000 / 8))
  assert q["xla_optimal_utilization"] == pytest.approx(10e12 / (1.0 * 50e12))
  assert [r["fits"] for r in q["phases"].values()] == [False, True]
  assert plan_tpu.replan(p, 0.2, hbm_gib=32)["phases"]["g_main"]["fits"]

