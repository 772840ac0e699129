r"""Benchmark of discriminator embedding throughput (the export path).

Times `gandl_jax.inference.export.sharded_embed_fn` (what `gandl-export`
runs per batch: uint8 images -> float -> D -> the embedding layer) on
device-resident random uint8 images with freshly initialized weights (speed
does not depend on their values).

  python tools/bench_embed.py --config configs/demo.py --batch 64

With --reference (a checkout of stylegan2-ada-pytorch; torch from the
[import] extra) the reference's own Discriminator runs the same batch in a
subprocess (tools/sg2ada_reference.py: uint8 -> float, `D(img, c)` under
no_grad), in timed rounds alternating with ours (--rounds each):

  python tools/bench_embed.py --config configs/demo.py --batch 64 \
      --reference /path/to/stylegan2-ada-pytorch

Prints one human-readable summary and one JSON line.
"""
import json
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gandl_jax import sharding
from gandl_jax.inference import api, export
from gandl_jax.model import networks

import sg2ada_reference  # tools/, next to this script

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 16, "Batches per timed round.")
_LAYER = flags.DEFINE_string("layer", "fc", "Embedding layer.")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Checkout of stylegan2-ada-pytorch: also time its D "
    "forward on the same batch, in alternating rounds.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per side.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  G, D = networks.build(config.model, config.compute_dtype)
  g_vars, d_vars = networks.init(jax.random.PRNGKey(config.seed), G, D)
  model = api.Model({"G_ema": g_vars, "D": d_vars},
                    {"model": config.model.to_dict()},
                    compute_dtype=config.compute_dtype,
                    batch_size=_BATCH.value)
  fn = export.sharded_embed_fn(model, mesh, _LAYER.value)
  b, r, c = _BATCH.value, model.resolution, model.img_channels
  host = np.random.default_rng(1).integers(0, 256, (b, r, r, c), np.uint8)
  images = jax.device_put(host, sharding.data_sharded(mesh))

  t0 = time.time()
  jax.block_until_ready(fn(images))
  compile_s = time.time() - t0
  jax.block_until_ready(fn(images))

  def our_round():
    t0 = time.time()
    for _ in range(_BATCHES.value):
      out = fn(images)
    jax.block_until_ready(out)
    return time.time() - t0

  ref, ours_s, ref_s = None, [], []
  if _REFERENCE.value:
    ref = sg2ada_reference.Worker(
        _REFERENCE.value, sg2ada_reference.spec_from_config(config, "embed", b))
  try:
    for _ in range(_ROUNDS.value):
      ours_s.append(our_round())
      if ref:
        ref_s.append(ref.run("embed", _BATCHES.value)[0])
  finally:
    if ref:
      ref.close()

  per_round = b * _BATCHES.value
  img_s = per_round * len(ours_s) / sum(ours_s)
  result = {
      "device": jax.devices()[0].device_kind,
      "num_devices": int(mesh.devices.size), "resolution": r, "batch": b,
      "layer": _LAYER.value, "compute_dtype": config.compute_dtype,
      "channel_base": config.model.channel_base,
      "img_per_sec": img_s,
      "img_per_sec_rounds": [per_round / t for t in ours_s],
      "compile_sec": compile_s,
  }
  print(f"{result['device']} x{result['num_devices']}: {r}x{r}x{c}, batch {b}, "
        f"{config.compute_dtype}, layer {_LAYER.value}: {img_s:.0f} img/s "
        f"(compile {compile_s:.1f} s)")
  if ref:
    ref_img_s = per_round * len(ref_s) / sum(ref_s)
    result.update({
        "reference_img_per_sec": ref_img_s,
        "reference_img_per_sec_rounds": [per_round / t for t in ref_s],
        "speedup_vs_reference": img_s / ref_img_s, "reference": ref.info})
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
    print(f"stylegan2-ada-pytorch D forward (torch {ref.info['torch']}, "
          f"{ref.info['device']}, {ref.info['threads']} threads, custom ops "
          f"{ref.info['custom_ops']}): {ref_img_s:.0f} img/s; rounds "
          f"alternating ours [{fmt(result['img_per_sec_rounds'])}] / reference "
          f"[{fmt(result['reference_img_per_sec_rounds'])}] img/s; "
          f"ours / reference = {result['speedup_vs_reference']:.2f}x")
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
