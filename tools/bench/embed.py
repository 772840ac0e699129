r"""Discriminator embedding throughput (the export path).

Times `gandl_jax.inference.export.sharded_embed_fn` (what `gandl-export` runs
per batch: uint8 images -> float -> D -> the embedding layer) on
device-resident random uint8 images with freshly initialized weights (speed
does not depend on their values).

  python -m tools.bench.embed --config configs/demo.py --batch 64

With --reference (a checkout of stylegan2-ada-pytorch; torch from the
[import] extra) the reference's own Discriminator runs the same batch in a
subprocess (uint8 -> float, `D(img, c)` under no_grad), in rounds
alternating with ours, after our figure is emitted (see tools.bench.train for
--reference_timeout and --reference_omp_wait_policy):

  python -m tools.bench.embed --config configs/demo.py --batch 64 \
      --reference /path/to/stylegan2-ada-pytorch
"""
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from gandl_jax import sharding
from gandl_jax.inference import api, export
from gandl_jax.model import networks
from tools.bench import harness, sg2ada_reference

harness.define_flags(rounds=2, warmup=1)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 16, "Batches per round.")
_LAYER = flags.DEFINE_string("layer", "fc", "Embedding layer.")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Checkout of stylegan2-ada-pytorch: also time its D "
    "forward on the same batch, in alternating rounds.")
sg2ada_reference.define_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  G, D = networks.build(config.model, config.num_bf16_res)
  g_vars, d_vars = networks.init(jax.random.PRNGKey(config.seed), G, D)
  model = api.Model({"G_ema": g_vars, "D": d_vars},
                    {"model": config.model.to_dict()},
                    compute_dtype=config.num_bf16_res,
                    batch_size=_BATCH.value)
  fn = export.sharded_embed_fn(model, mesh, _LAYER.value)
  b, r, c = _BATCH.value, model.resolution, model.img_channels
  host = np.random.default_rng(1).integers(0, 256, (b, r, r, c), np.uint8)
  images = jax.device_put(host, sharding.data_sharded(mesh))
  compile_t = harness.time_rounds(
      lambda: jax.block_until_ready(fn(images)), 1)

  def ours():
    for _ in range(_BATCHES.value):
      out = fn(images)
    jax.block_until_ready(out)

  times = harness.alternate({"ours": ours}, flags.FLAGS.rounds,
                            flags.FLAGS.warmup)
  images_per_round = b * _BATCHES.value
  cfg = {"config": harness.config_source(), "resolution": r,
         "channels": c, "batch": b, "batches": _BATCHES.value,
         "layer": _LAYER.value, "num_bf16_res": config.num_bf16_res,
         "channel_base": config.model.channel_base,
         "num_devices": int(mesh.devices.size)}
  # Our figures first: a reference that fails later cannot lose them.
  img_s = images_per_round / times["ours"].median
  harness.emit("img_per_sec", img_s, "images/s", cfg, timing=times["ours"])
  harness.emit("compile_sec", compile_t.median, "s", cfg)
  harness.say(f"{r}x{r}x{c}, batch {b}, layer {_LAYER.value}: "
              f"{img_s:.0f} img/s (compile {compile_t.median:.1f} s)")
  if not _REFERENCE.value:
    return
  ref = sg2ada_reference.from_flags(
      _REFERENCE.value, sg2ada_reference.spec_from_config(config, "embed", b))
  try:
    times = harness.alternate(
        {"ours": ours,
         "reference": harness.worker_side(ref, "embed", _BATCHES.value)},
        flags.FLAGS.rounds, flags.FLAGS.warmup)
  finally:
    ref.close()
  img_s = images_per_round / times["ours"].median
  rt = times["reference"]
  ref_img_s = images_per_round / rt.median
  rcfg = dict(cfg, reference=ref.info)
  harness.emit("reference_img_per_sec", ref_img_s, "images/s", rcfg,
               timing=rt)
  harness.emit("speedup_vs_reference", img_s / ref_img_s, "x",
               dict(rcfg, ours_img_per_sec=img_s), timing=times["ours"])
  harness.say(f"stylegan2-ada-pytorch D forward ({ref.info.get('device')}, "
              f"custom ops {ref.info.get('custom_ops')}): {ref_img_s:.0f} "
              f"img/s; ours alongside {img_s:.0f}; ours / reference = "
              f"{img_s / ref_img_s:.2f}x")


if __name__ == "__main__":
  harness.run(main, "embed")
