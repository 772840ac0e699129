r"""Images/s of the training input pipeline (tf.data -> global jax.Array).

  python -m tools.bench.input --resolution 256 --workers 2
  python -m tools.bench.input --data 'gs://BUCKET/shards/rxrx19a-256/*.tfrecord'

Without --data it writes a synthetic RxRx19a (gandl-synth) at the requested
resolution into --scratch and converts it (both are reused on later runs).
Records the rate of the host pipeline alone (decode, augment, normalize,
batch) and with delivery as global arrays sharded over all local devices.
"""
import os
import time

from absl import flags

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


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from gandl_jax import sharding  # pylint: disable=import-outside-toplevel

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
