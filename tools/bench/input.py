r"""Images/s of the training input pipeline (tf.data -> global jax.Array).

  python tools/bench_input.py --resolution 256 --workers 2
  python tools/bench_input.py --data 'gs://BUCKET/shards/rxrx19a-256/*.tfrecord'

Without --data it writes a synthetic RxRx19a (gandl-synth) at the requested
resolution into --scratch and converts it (both are reused on later runs).
Prints the rate of the host pipeline alone (decode, augment, normalize,
batch) and with delivery as global arrays sharded over all local devices.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_DATA = flags.DEFINE_string("data", None, "Shard dir or glob; default: synthetic.")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Image edge (synthetic data).")
_WORKERS = flags.DEFINE_integer("workers", -1, "tf.data num_parallel_calls "
                                "(-1: AUTOTUNE).")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 40, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
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
  print(f"synthetic: {time.time() - t:.1f} s", flush=True)
  t = time.time()
  convert.convert("rxrx19a", root, shards, resolution, workers=os.cpu_count() or 1)
  print(f"convert: {time.time() - t:.1f} s", flush=True)
  return shards


def _rate(it, steps, warmup, batch, block):
  for _ in range(warmup):
    x = next(it)
  t = time.time()
  for _ in range(steps):
    x = next(it)
    if block:
      x["image"].block_until_ready()
  return steps * batch / (time.time() - t)


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
  print(f"data: {path} ({info['num_examples']} sites, {res}x{res}x{ch}); "
        f"devices: {mesh.devices.size} x {jax.devices()[0].platform}; "
        f"CPU cores: {os.cpu_count()}; workers: {_WORKERS.value}; batch: {gb}",
        flush=True)
  ds, _ = pipeline.train_dataset(
      path, host_batch=sharding.host_batch_size(gb), seed=0,
      shuffle_buffer=_SHUFFLE.value, num_parallel_calls=_WORKERS.value,
      process_index=jax.process_index(), process_count=jax.process_count())
  host = ({"image": x} for x in ds.as_numpy_iterator())
  r_host = _rate(host, _STEPS.value, _WARMUP.value, gb, block=False)
  print(f"host pipeline (tf.data -> numpy float32): {r_host:,.0f} images/s", flush=True)
  it = pipeline.train_batches(cfg, global_batch=gb, mesh=mesh, seed=0,
                              resolution=res, channels=ch)
  r_dev = _rate(it, _STEPS.value, _WARMUP.value, gb, block=True)
  print(f"train_batches (-> global jax.Array on {mesh.devices.size} devices): "
        f"{r_dev:,.0f} images/s", flush=True)


if __name__ == "__main__":
  app.run(main)
