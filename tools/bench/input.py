r"""Images/s of the training input pipeline (tf.data -> global jax.Array).

  python -m tools.bench.input --resolution 256 --workers 2
  python -m tools.bench.input --data 'gs://BUCKET/shards/rxrx19a-256/*.tfrecord'

Without --data it writes a synthetic RxRx19a (gandl-synth) at the requested
resolution into --scratch and converts it (both are reused on later runs).
Records the rate of the host pipeline alone (decode, augment, batch; uint8)
and with delivery as global uint8 arrays sharded over all local devices.

With --config, the training iteration fed two ways in alternating rounds of
one process, on the same compiled phases and state: 'resident', one
device-resident batch as `tools.bench.train` times it, and 'end_to_end',
each iteration's batch from `pipeline.train_batches` (uint8 to the device,
two batches in flight) as gandl-train feeds it. Records both img/s and the
gap (the input path's cost); the load average is in every record:

  python -m tools.bench.input --config configs/demo.py
"""
import os
import time

from absl import flags
from ml_collections import config_flags

from tools.bench import harness

harness.define_flags(rounds=1, warmup=1)

_DATA = flags.DEFINE_string("data", None, "Shard dir or glob; default: synthetic.")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Image edge (synthetic data).")
_WORKERS = flags.DEFINE_integer("workers", -1, "tf.data num_parallel_calls "
                                "(-1: AUTOTUNE).")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Batches per round.")
_SHUFFLE = flags.DEFINE_integer("shuffle_buffer", 1024, "Shuffle buffer.")
_PLATES = flags.DEFINE_integer("plates", 1, "Synthetic plates per experiment "
                               "(1: 768 sites).")
_SCRATCH = flags.DEFINE_string("scratch", "/tmp/gandl-bench-input", "Where the "
                               "synthetic data goes.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config: time the iteration end to end (input "
    "pipeline) against a device-resident batch.")
_ITERS = flags.DEFINE_integer(
    "iterations", 0, "With --config: iterations per round (0: the lcm of "
    "the regularization intervals, so every round runs the same phases).")


def _synthetic_shards(resolution: int) -> str:
  from gandl_jax.data import convert  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  base = os.path.join(_SCRATCH.value, f"{resolution}-p{_PLATES.value}")
  shards = os.path.join(base, "shards")
  try:
    pipeline.read_dataset_info(shards)
    return shards
  except FileNotFoundError:
    pass
  t = time.time()
  root = synthetic.generate(base, size=resolution, plates=_PLATES.value, seed=0)
  harness.say(f"synthetic: {time.time() - t:.1f} s")
  t = time.time()
  convert.convert("rxrx19a", root, shards, resolution, workers=os.cpu_count() or 1)
  harness.say(f"convert: {time.time() - t:.1f} s")
  return shards


def _round(it, steps, block):
  """One round: `steps` batches from `it`."""
  def run():
    for _ in range(steps):
      x = next(it)
      if block:
        x["image"].block_until_ready()
  return run


def _end_to_end(config, path):
  """'resident' vs 'end_to_end' iterations (module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from gandl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from gandl_jax import sharding  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from gandl_jax.train.steps import Trainer  # pylint: disable=import-outside-toplevel

  config.data.path = path
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.devices.size, jax.process_count())
  tr = Trainer(config, mesh)
  b = tr.batch
  data = pipeline.train_batches(
      config.data, global_batch=b, mesh=mesh, seed=config.seed,
      resolution=config.model.resolution,
      channels=config.model.img_channels)
  resident = next(data)["image"]     # uint8, data-sharded, stays on device
  run = {"state": tr.init_state(config.seed), "step": 0}
  t = time.time()
  tr.precompile(run["state"], resident)
  harness.say(f"compiled in {time.time() - t:.1f} s")
  interval = int(np.lcm(config.loss.r1_interval, config.loss.pl_interval))
  iters = _ITERS.value or interval

  def steps(n, feed):
    metrics = None
    for _ in range(n):
      real = resident if feed is None else next(feed)["image"]
      run["state"], metrics = tr.train_step(run["state"], real, run["step"],
                                            run["step"] * b)
      run["step"] += 1
    jax.block_until_ready((run["state"], metrics))

  steps(-run["step"] % interval or interval, None)   # first run + align
  times = harness.alternate(
      {"resident": lambda: steps(iters, None),
       "end_to_end": lambda: steps(iters, data)},
      flags.FLAGS.rounds, flags.FLAGS.warmup)
  cfg = {"config": harness.config_source(), "resolution":
         config.model.resolution, "batch": b, "iterations": iters,
         "num_bf16_res": config.num_bf16_res,
         "num_devices": int(mesh.devices.size),
         "device_prefetch": pipeline.DEVICE_PREFETCH,
         "num_parallel_calls": config.data.num_parallel_calls}
  rates = {}
  for side, timing in times.items():
    rates[side] = iters * b / timing.median
    harness.emit(f"{side}_img_per_sec", rates[side], "images/s", cfg,
                 timing=timing)
  gap = 100.0 * (1.0 - rates["end_to_end"] / rates["resident"])
  harness.emit("end_to_end_gap_percent", gap, "%", cfg,
               timing=times["end_to_end"])
  harness.say(f"{config.model.resolution}x{config.model.resolution}, batch "
              f"{b}: device-resident {rates['resident']:.1f} img/s, end to "
              f"end {rates['end_to_end']:.1f} img/s (gap {gap:.1f}%); load "
              f"{times['resident'].load_before} -> "
              f"{times['resident'].load_after}")


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from gandl_jax import sharding  # pylint: disable=import-outside-toplevel

  if _CONFIG.value is not None:
    config = _CONFIG.value
    res = int(config.model.resolution)
    _end_to_end(config, _DATA.value or _synthetic_shards(res))
    return
  path = _DATA.value or _synthetic_shards(_RESOLUTION.value)
  info = pipeline.read_dataset_info(path)
  res, ch = info["resolution"], info["num_channels"]
  mesh = sharding.make_mesh()
  cfg = dict(path=path, shuffle_buffer=_SHUFFLE.value, x_flip=True, rot90=True,
             num_parallel_calls=_WORKERS.value, prefetch=2)
  gb = _BATCH.value
  harness.say(f"data: {path} ({info['num_examples']} sites, {res}x{res}x{ch}); "
              f"devices: {mesh.devices.size} x {jax.devices()[0].platform}; "
              f"workers: {_WORKERS.value}; batch: {gb}")
  config = {"data": _DATA.value or "synthetic", "resolution": res,
            "channels": ch, "workers": _WORKERS.value, "batch": gb,
            "steps": _STEPS.value, "shuffle_buffer": _SHUFFLE.value}
  ds, _ = pipeline.train_dataset(
      path, host_batch=sharding.host_batch_size(gb), seed=0,
      shuffle_buffer=_SHUFFLE.value, num_parallel_calls=_WORKERS.value,
      process_index=jax.process_index(), process_count=jax.process_count())
  host = ({"image": x} for x in ds.as_numpy_iterator())
  t = harness.time_rounds(_round(host, _STEPS.value, False),
                          flags.FLAGS.rounds, flags.FLAGS.warmup)
  harness.emit("host_images_per_s", _STEPS.value * gb / t.median, "images/s",
               config, timing=t)
  it = pipeline.train_batches(cfg, global_batch=gb, mesh=mesh, seed=0,
                              resolution=res, channels=ch)
  t = harness.time_rounds(_round(it, _STEPS.value, True), flags.FLAGS.rounds,
                          flags.FLAGS.warmup)
  harness.emit("device_images_per_s", _STEPS.value * gb / t.median,
               "images/s", config, timing=t)


if __name__ == "__main__":
  harness.run(main, "input")
