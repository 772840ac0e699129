r"""Per-device memory and FLOPs of the four training phases, compiled ahead of
time for a TPU this machine does not have, and the predicted sec/kimg.

  python -m tools.plan_tpu --config configs/gandl_rxrx19a.py:256 --batch 64 \
      --devices 8
  python -m tools.plan_tpu --config configs/gandl_rxrx19a.py:512 --batch 64 \
      --devices 8 --remat blocks

Each phase (G main, G reg, D main, D reg: `Trainer.phases`) is lowered with
the Trainer's own shardings (state replicated, batch split over `data`) on the
target's devices and compiled; nothing runs. Targets:

  tpu_v3  (default) a TPU v3 slice described by libtpu without hardware
          (`jax.experimental.topologies`, "deviceless AOT"): 2 cores per chip,
          16 GiB HBM and 61.5 TFLOP/s bf16 (123 per chip) per core. Needs the
          libtpu wheel matching jax (`pip install "jax[tpu]==<jax version>"`);
          no TPU is touched.
  tpu_v5e a TPU v5e slice likewise (`v5e:2x4` for a v5e-8): one core per chip,
          16 GiB HBM and 197 TFLOP/s bf16 per chip.
  cpu     XLA:CPU with `--devices` simulated host devices: runs anywhere
          (tests), but its memory figures are only a proxy for a TPU's
          (other layouts, fusion and scheduling).

With --export_batch (default 64) the export function (gandl-export's D
forward on uint8 images) is compiled too and printed as 'export'.

Printed per phase: XLA's memory analysis per device (arguments, outputs,
aliased i.e. donated, temporaries, generated code; total = arguments +
outputs - aliased + temporaries + code, against the HBM), FLOPs per device
from XLA's cost analysis and per image of the phase's batch, and, for the
iteration, the predicted sec/kimg at `--utilization` of the peak:

  flops/iteration = sum over phases of flops / every (G reg every pl_interval,
                    D reg every r1_interval; the main phases every iteration)
  sec/kimg        = flops/iteration / (peak * utilization) * 1000 / batch

and the days `config.total_kimg` takes. Ends with one JSON line.
"""
import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from tools.bench.harness import cost  # XLA's cost analysis, one place

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch (0: the config's).")
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices (TPU cores).")
_TARGET = flags.DEFINE_enum("target", "tpu_v3", ["tpu_v3", "tpu_v5e", "cpu"],
                            "Compile target (see the module docstring).")
_EXPORT_BATCH = flags.DEFINE_integer(
    "export_batch", 64, "Also compile the export function (gandl-export's "
    "data-parallel D forward to the embedding) at this global batch of uint8 "
    "images; 0: skip.")
_REMAT = flags.DEFINE_string(
    "remat", None, "config.remat for this plan (none, blocks, blocks_dots); "
    "default: the config's. Comma-separated: one plan per value.")
_UTIL = flags.DEFINE_float(
    "utilization", 0.2, "Fraction of the peak FLOP/s assumed for sec/kimg "
    "(default 0.2: XLA's own TPU cost model bounds these memory-bound "
    "programs to about 23% at 256x256; docs/performance.md).")
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak TFLOP/s per device (0: the target's; cpu: "
    "none, no sec/kimg).")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Memory per device in GiB (0: the "
                          "target's).")
_PHASES = flags.DEFINE_list("phases", [], "Only these phases (default: all "
                            "that run).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the JSON line "
                                "to this file.")
_FROM_JSON = flags.DEFINE_string(
    "from_json", None, "Compile nothing: re-print the plans of an earlier "
    "--json_out (or the JSON line saved from stdout) with this run's "
    "--utilization, --peak_tflops and --hbm_gib.")

GIB = 2**30
# Per device (a TPU v3 chip has 2 TensorCores, each its own JAX device; a
# v5e chip has one, 16 GiB HBM and 197 TFLOP/s bf16).
TARGETS = {
    "tpu_v3": {"name": "TPU v3", "hbm_gib": 16.0, "peak_tflops": 61.5},
    "tpu_v5e": {"name": "TPU v5e", "hbm_gib": 16.0, "peak_tflops": 197.0},
    "cpu": {"name": "XLA:CPU (host devices)", "hbm_gib": 0.0,
            "peak_tflops": 0.0},
}
MEMORY_FIELDS = ("arguments", "outputs", "aliased", "temporaries", "code")


def tpu_v3_topology(devices: int) -> str:
  """libtpu's topology name for a v3 slice of `devices` cores: 'v3:AxB'
  (2 cores per chip; v3-8 = 'v3:2x2')."""
  chips = devices // 2
  if devices < 2 or devices % 2 or chips & (chips - 1):
    raise ValueError(f"--devices={devices}: a TPU v3 slice has 2 cores per "
                     f"chip and a power of two of chips (8 for a v3-8)")
  a = 2 ** (int(math.log2(chips)) // 2)
  return f"v3:{a}x{chips // a}"


def tpu_v5e_topology(devices: int) -> str:
  """libtpu's topology name for a v5e slice of `devices` chips (one core
  each): 'v5e:AxB' (v5e-8 = 'v5e:2x4')."""
  if devices < 1 or devices & (devices - 1) or devices > 256:
    raise ValueError(f"--devices={devices}: a TPU v5e slice has a power of "
                     f"two of chips, at most 256 (8 for a v5e-8)")
  a = 2 ** (int(math.log2(devices)) // 2)
  return f"v5e:{a}x{devices // a}"


def topology_name(target: str, devices: int) -> str:
  return {"tpu_v3": tpu_v3_topology,
          "tpu_v5e": tpu_v5e_topology}[target](devices)


def target_devices(target: str, devices: int):
  """The `devices` devices to compile for (compile-only for TPUs)."""
  import jax  # pylint: disable=import-outside-toplevel
  if target == "cpu":
    found = jax.devices("cpu")
    if len(found) < devices:
      raise ValueError(
          f"--devices={devices} but XLA:CPU has {len(found)} device(s): run "
          f"with XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    return found[:devices]
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  name = topology_name(target, devices)
  try:
    topo = topologies.get_topology_desc(name, "tpu")
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"cannot describe TPU topology {name!r} without hardware ({e}); it "
        f"needs the libtpu matching jax {jax.__version__}: pip install "
        f"'jax[tpu]=={jax.__version__}' (or -e '.[tpu]')") from e
  return list(topo.devices)


def memory_breakdown(compiled) -> dict:
  """Bytes per device from XLA's memory analysis, with total = arguments +
  outputs - aliased (donated) + temporaries + generated code."""
  m = compiled.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes),
         "outputs": int(m.output_size_in_bytes),
         "aliased": int(m.alias_size_in_bytes),
         "temporaries": int(m.temp_size_in_bytes),
         "code": int(m.generated_code_size_in_bytes)}
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] +
                  out["temporaries"] + out["code"])
  return out


def conv_flops(n: int, h: int, w: int, c_in: int, c_out: int, k: int,
               padding: str = "VALID") -> int:
  """2 * multiply-adds of a stride-1 k x k convolution on an n x h x w x
  c_in input, counting only taps that fall on the input (what XLA's cost
  analysis counts): VALID: 2 n (h-k+1)(w-k+1) c_in c_out k^2; SAME (odd k):
  the zero padding is not counted."""
  if padding == "VALID":
    taps = (h - k + 1) * (w - k + 1) * k * k
  elif padding == "SAME":
    p = k // 2
    inside = lambda size: sum(min(i + p, size - 1) - max(i - p, 0) + 1
                              for i in range(size))
    taps = inside(h) * inside(w)
  else:
    raise ValueError(f"padding must be VALID or SAME, got {padding!r}")
  return 2 * n * taps * c_in * c_out


def analytic(model_cfg, param_counts) -> dict:
  """Closed-form cross-checks: FLOPs of one image through G's synthesis and
  D (a 3x3 conv as 2 * H * W * Cin * Cout * 9 at its output resolution, G's
  upsampling conv0 as the stride-2 transposed conv it is, i.e. at its input
  resolution; 1x1 convs and dense layers likewise; resampling filters,
  modulation and activations left out), and the bytes of the replicated
  float32 state: G params, G EMA, G Adam (m, v), D params, D Adam (m, v)."""
  from gandl_jax.model import networks  # pylint: disable=import-outside-toplevel
  cfg = dict(model_cfg)
  ch = lambda r: networks.channels_at(r, cfg["channel_base"],
                                      cfg["channel_max"])
  c_img, w_dim = cfg["img_channels"], cfg["w_dim"]
  res = networks.block_resolutions(cfg["resolution"])
  g = 0
  for r in res:
    c = ch(r)
    if r > 4:                                     # conv0 (up) + affine
      g += 2 * (r // 2) ** 2 * 9 * ch(r // 2) * c + 2 * w_dim * ch(r // 2)
    g += 2 * r * r * 9 * c * c + 2 * w_dim * c   # conv1 + affine
    g += 2 * r * r * c * c_img + 2 * w_dim * c    # toRGB
  d = 0
  for r in reversed(res[1:]):
    c, c2 = ch(r), ch(r // 2)
    if r == cfg["resolution"]:
      d += 2 * r * r * c_img * c                  # fromRGB
    d += 2 * r * r * 9 * c * c                    # conv0
    d += 2 * (r // 2) ** 2 * (9 * c * c2 + c * c2)  # conv1 (down), skip
  c4 = ch(4)
  d += 2 * 16 * 9 * (c4 + cfg["mbstd_num_channels"]) * c4 + 2 * 16 * c4 * c4
  g_params, d_params = param_counts
  return {"g_forward_flops": g, "d_forward_flops": d,
          "g_params": g_params, "d_params": d_params,
          "state_bytes": 4 * (4 * g_params + 3 * d_params)}


def phase_images(trainer, name: str) -> int:
  """Images (per global batch) one call of phase `name` is counted for: the
  path-length phase runs on batch // pl_batch_shrink, the others on batch."""
  return trainer.pl_batch if name == "g_reg" else trainer.batch


def compile_phases(config, devices, phases=()):
  """{phase: {'every', 'images', 'memory', 'flops', ...}} for `config` on
  `devices` (lowered with the Trainer's shardings, compiled, not run)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gandl_jax import sharding  # pylint: disable=import-outside-toplevel
  from gandl_jax.train.steps import Trainer  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(devices)
  trainer = Trainer(config, mesh)
  state = trainer.abstract_state()
  r, c = config.model.resolution, config.model.img_channels
  # The real batch as the input pipeline ships it: uint8, normalized on the
  # device.
  real = jax.ShapeDtypeStruct((trainer.batch, r, r, c), jnp.uint8,
                              sharding=sharding.data_sharded(mesh))
  beta = jax.ShapeDtypeStruct((), jnp.float32,
                              sharding=sharding.replicated(mesh))
  n = len(devices)
  results = {}
  for phase in trainer.phases:
    if not phase.every or (phases and phase.name not in phases):
      continue
    args = trainer._args(phase, state, real, beta)  # pylint: disable=protected-access
    t0 = time.time()
    compiled = trainer.compiled(phase.name, state).lower(*args).compile()
    images = phase_images(trainer, phase.name)
    res = {"every": phase.every, "images": images,
           "memory": memory_breakdown(compiled),
           "compile_s": round(time.time() - t0, 1)}
    res.update(cost(compiled))
    # cost_analysis is of the per-device (SPMD-partitioned) program, which
    # sees images / n of the batch.
    res["flops_per_image"] = res["flops"] * n / images
    results[phase.name] = res
    m = res["memory"]
    print(f"{phase.name}: compiled in {res['compile_s']:.0f} s; "
          f"{m['total'] / GIB:.2f} GiB per device (arguments "
          f"{m['arguments'] / GIB:.2f}, temporaries {m['temporaries'] / GIB:.2f}"
          f", code {m['code'] / GIB:.2f}), "
          f"{res['flops_per_image'] / 1e9:.1f} GFLOP per image",
          file=sys.stderr, flush=True)
    del compiled
  from gandl_jax.model import networks  # pylint: disable=import-outside-toplevel
  from gandl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  counts = (networks.count_params(state.g_params),
            networks.count_params(state.d_params))
  return results, analytic(config_lib.full_model_config(config.model), counts)


def compile_export(config, devices, batch: int, layer: str = "fc") -> dict:
  """Memory and FLOPs per device of the export function (gandl-export's
  `model.embed.data_parallel_features`: uint8 images -> D -> `layer`) for a
  global `batch`, with replicated D parameters and the batch split over
  `data`, compiled on `devices` (not run)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gandl_jax import sharding  # pylint: disable=import-outside-toplevel
  from gandl_jax.model import embed, networks  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(devices)
  G, D = networks.build(config.model, config.num_bf16_res)
  shapes = jax.eval_shape(lambda k: networks.init(k, G, D)[1],
                          jax.random.PRNGKey(0))
  repl = sharding.replicated(mesh)
  d_vars = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
      {"params": shapes["params"]})
  r, c = config.model.resolution, config.model.img_channels
  images = jax.ShapeDtypeStruct((batch, r, r, c), jnp.uint8,
                                sharding=sharding.data_sharded(mesh))
  t0 = time.time()
  # The jitted one-pass function behind `data_parallel_features` (which
  # wraps it to pick the layer, so has no `.lower`).
  compiled = embed.data_parallel_layer_features(D, mesh, (layer,)).lower(
      d_vars, images).compile()
  res = {"images": batch, "layer": layer,
         "memory": memory_breakdown(compiled),
         "compile_s": round(time.time() - t0, 1)}
  res.update(cost(compiled))
  res["flops_per_image"] = res["flops"] * len(devices) / batch
  print(f"export: compiled in {res['compile_s']:.0f} s; "
        f"{res['memory']['total'] / GIB:.2f} GiB per device, "
        f"{res['flops_per_image'] / 1e9:.1f} GFLOP per image",
        file=sys.stderr, flush=True)
  return res


def predict(results: dict, batch: int, devices: int, peak_tflops: float,
            utilization: float, total_kimg: float) -> dict:
  """Amortized FLOPs per iteration (per device) and, given a peak, the
  predicted sec/kimg and days for `total_kimg`."""
  flops_iter = sum(r["flops"] / r["every"] for r in results.values())
  out = {"flops_per_iteration_per_device": flops_iter,
         "flops_per_image": flops_iter * devices / batch}
  if peak_tflops > 0:
    sec_iter = flops_iter / (peak_tflops * 1e12 * utilization)
    out["sec_per_kimg"] = sec_iter * 1000.0 / batch
    out["days"] = out["sec_per_kimg"] * total_kimg / 86400.0
  if all("xla_optimal_s" in r for r in results.values()) and results:
    sec_iter = sum(r["xla_optimal_s"] / r["every"] for r in results.values())
    out["xla_optimal_sec_per_kimg"] = sec_iter * 1000.0 / batch
    if peak_tflops > 0:   # the utilization XLA's estimate amounts to
      out["xla_optimal_utilization"] = flops_iter / (sec_iter * peak_tflops *
                                                     1e12)
  return out


def plan(config, target: str, devices: int, remat: str, utilization: float,
         peak_tflops: float = 0.0, hbm_gib: float = 0.0, phases=(),
         export_batch: int = 0):
  """The full plan (one JSON-able dict) for one remat setting; with
  `export_batch`, also the export function's compiled figures ('export')."""
  spec = TARGETS[target]
  config = config.copy_and_resolve_references()
  config.remat = remat
  peak = peak_tflops or spec["peak_tflops"]
  hbm = hbm_gib or spec["hbm_gib"]
  devs = target_devices(target, devices)
  results, closed = compile_phases(config, devs, phases)
  pred = predict(results, int(config.batch_size), devices, peak, utilization,
                 float(config.total_kimg))
  export = compile_export(config, devs, export_batch) if export_batch else None
  for r in list(results.values()) + ([export] if export else []):
    r["fits"] = (r["memory"]["total"] <= hbm * GIB) if hbm else None
  return {"export": export,"target": spec["name"], "devices": devices,
          "resolution": int(config.model.resolution),
          "batch": int(config.batch_size),
          "num_bf16_res": config.num_bf16_res, "remat": remat,
          "hbm_gib": hbm or None, "peak_tflops_per_device": peak or None,
          "utilization": utilization if peak else None,
          "total_kimg": float(config.total_kimg), "phases": results,
          "analytic": closed, **pred}


def replan(p: dict, utilization: float, peak_tflops: float = 0.0,
           hbm_gib: float = 0.0) -> dict:
  """An earlier plan `p` (compiled figures kept) with another utilization,
  peak or memory size."""
  p = dict(p)
  peak = peak_tflops or p["peak_tflops_per_device"] or 0.0
  hbm = hbm_gib or p["hbm_gib"] or 0.0
  results = {k: dict(v) for k, v in p["phases"].items()}
  export = dict(p["export"]) if p.get("export") else None
  for r in list(results.values()) + ([export] if export else []):
    r["fits"] = (r["memory"]["total"] <= hbm * GIB) if hbm else None
  p["export"] = export
  for key in ("sec_per_kimg", "days", "xla_optimal_sec_per_kimg",
              "xla_optimal_utilization"):
    p.pop(key, None)
  p.update(predict(results, p["batch"], p["devices"], peak, utilization,
                   p["total_kimg"]))
  p.update(phases=results, hbm_gib=hbm or None,
           peak_tflops_per_device=peak or None,
           utilization=utilization if peak else None)
  return p


def format_plan(p: dict) -> str:
  g = lambda b: f"{b / GIB:7.2f}"
  lines = [f"{p['target']} x {p['devices']}, {p['resolution']}x"
           f"{p['resolution']}, batch {p['batch']}, num_bf16_res {p['num_bf16_res']}, "
           f"remat={p['remat']}  (memory in GiB per device)",
           f"{'phase':8s} {'every':>5s} " +
           " ".join(f"{f:>11s}" for f in MEMORY_FIELDS + ("total",)) +
           f" {'fits':>5s} {'GFLOP/img':>10s}"]
  for name, r in p["phases"].items():
    m = r["memory"]
    fits = {True: "yes", False: "NO", None: "-"}[r["fits"]]
    lines.append(f"{name:8s} {r['every']:5d} " +
                 " ".join(f"{g(m[f]):>11s}" for f in MEMORY_FIELDS +
                          ("total",)) +
                 f" {fits:>5s} {r['flops_per_image'] / 1e9:10.1f}")
  e = p.get("export")
  if e:
    m = e["memory"]
    fits = {True: "yes", False: "NO", None: "-"}[e.get("fits")]
    lines.append(f"{'export':8s} {'':5s} " +
                 " ".join(f"{g(m[f]):>11s}" for f in MEMORY_FIELDS +
                          ("total",)) +
                 f" {fits:>5s} {e['flops_per_image'] / 1e9:10.1f}"
                 f"  (batch {e['images']}, uint8 -> {e['layer']})")
  lines.append(f"amortized: {p['flops_per_image'] / 1e9:.1f} GFLOP per image "
               f"(regularizers weighted by 1/every; phases compiled: "
               f"{', '.join(p['phases'])})")
  if "sec_per_kimg" in p:
    lines.append(
        f"predicted at {p['utilization']:.0%} of {p['peak_tflops_per_device']}"
        f" TFLOP/s per device: {p['sec_per_kimg']:.2f} sec/kimg, "
        f"{p['days']:.2f} days for {p['total_kimg']:g} kimg")
  a = p.get("analytic")
  if a:
    lines.append(
        f"closed form: G forward {a['g_forward_flops'] / 1e9:.1f}, D forward "
        f"{a['d_forward_flops'] / 1e9:.1f} GFLOP/img (convs and dense layers)"
        f"; state {a['state_bytes'] / GIB:.2f} GiB ({a['g_params'] / 1e6:.1f}"
        f"M G x 4 + {a['d_params'] / 1e6:.1f}M D x 3 float32)")
  if "xla_optimal_sec_per_kimg" in p:
    util = p.get("xla_optimal_utilization")
    lines.append(f"XLA's own cost model ('optimal_seconds', a lower bound): "
                 f"{p['xla_optimal_sec_per_kimg']:.2f} sec/kimg" +
                 (f" = {util:.0%} of the peak" if util else ""))
  return "\n".join(lines)


def main(argv):
  del argv
  if _FROM_JSON.value:
    from gandl_jax import io  # pylint: disable=import-outside-toplevel
    try:
      saved = json.loads(io.read_text(_FROM_JSON.value).strip().splitlines()[-1])
      plans = [replan(p, _UTIL.value, _PEAK.value, _HBM.value)
               for p in saved["plans"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
      sys.exit(f"--from_json={_FROM_JSON.value}: expected a JSON line of "
               f"this tool ({type(e).__name__}: {e})")
    for p in plans:
      print(format_plan(p), flush=True)
    print(json.dumps({**saved, "plans": plans}))
    return
  if _CONFIG.value is None:
    sys.exit("--config is required (or --from_json)")
  if _TARGET.value == "cpu":
    flag = f"--xla_force_host_platform_device_count={_DEVICES.value}"
    if "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                                 flag).strip()
  # Compile-only use of libtpu touches no TPU: let it load while another
  # process (a second plan, a training run) holds libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")   # TPU targets are compile-only
  config = _CONFIG.value
  if _BATCH.value:
    config.batch_size = _BATCH.value
  remats = ([r.strip() for r in _REMAT.value.split(",") if r.strip()]
            if _REMAT.value else [config.get("remat", "none")])
  from gandl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  for remat in remats:
    if remat not in config_lib.REMAT_OPTIONS:
      sys.exit(f"--remat={remat!r}: expected one of "
               f"{list(config_lib.REMAT_OPTIONS)}")
  try:
    config_lib.validate(config, num_devices=_DEVICES.value)
  except ValueError as e:
    sys.exit(str(e))
  plans = []
  for remat in remats:
    p = plan(config, _TARGET.value, _DEVICES.value, remat, _UTIL.value,
             _PEAK.value, _HBM.value, tuple(_PHASES.value),
             _EXPORT_BATCH.value)
    print(format_plan(p), flush=True)
    plans.append(p)
  line = json.dumps({"jax": jax.__version__, "libtpu": _libtpu_version(),
                     "plans": plans})
  print(line)
  if _JSON_OUT.value:
    from gandl_jax import io  # pylint: disable=import-outside-toplevel
    io.write_text(_JSON_OUT.value, line + "\n")


def _libtpu_version():
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return None


if __name__ == "__main__":
  app.run(main)
