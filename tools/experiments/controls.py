r"""Controls for "why does a random DenseNet beat the discriminator?".

Runs on a finished workdir of tools/experiments/training_benefit.py (its
shards, raw metadata and DenseNet embeddings) and evaluates extra sets with
the same protocol (docs/experiments.md, "Why the random DenseNet wins"):

  dim           the random DenseNet's 5 x 1024 features reduced to 64 and
                256 dims by PCA (unsupervised, all sites) and by a Gaussian
                random projection (seed 0): is its lead its dimension?
  wide          the untrained D of configs/demo.py at 4x its width
                (channel_max 256, channel_base 8192; seeds 0,1,2; layers fc
                and, for seed 0, conv): is the D's deficit its width?
  channel_mean  the random DenseNet on the mean of the five channels (one
                1024-d vector) next to the per-channel set: how much does
                processing each stain separately add?
  per_stain     the discriminator the same way as the DenseNet: each stain
                through D alone (the other four channels black), the five
                feature vectors concatenated; untrained and trained (the
                saved step nearest --per_stain_kimg) D, seeds --seeds,
                layers fc and b16, next to the same checkpoints' ordinary
                (all-stains) embeddings: does per-stain processing close the
                gap to the DenseNet, and does training help there?

  python -m tools.experiments.controls --workdir /work/exp/hard --control dim
  python -m tools.experiments.controls --workdir /work/exp/hard --control wide
  python -m tools.experiments.controls --workdir /work/exp/hard --control per_stain

Writes WORKDIR/controls/<control>/{eval/, headline.txt}; stages resumable.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import List

import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished workdir of "
                               "tools/experiments/training_benefit.py.",
                               required=True)
_CONTROL = flags.DEFINE_enum("control", None,
                             ["dim", "wide", "channel_mean", "per_stain"],
                             "Which control to run.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"],
                           "D seeds (wide, per_stain).")
_PER_STAIN_KIMG = flags.DEFINE_float(
    "per_stain_kimg", 2.0, "per_stain: the training budget whose checkpoint "
    "(the saved step nearest it) is the trained D.")
_PER_STAIN_LAYERS = flags.DEFINE_list("per_stain_layers", ["fc", "b16"],
                                      "per_stain: D layers.")
DATASETS = ("rxrx19a", "rxrx1")
NAMED_COMPOUNDS = ("Remdesivir (GS-5734)", "GS-441524")


def _features(df):
  return [c for c in df.columns if c[0] == "f" and c[1:].isdigit()]


def _write_set(meta, x: np.ndarray, path: str) -> str:
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from gandl_jax import io as gio  # pylint: disable=import-outside-toplevel
  cols = [f"f{i:04d}" for i in range(x.shape[1])]
  df = pd.concat([meta.reset_index(drop=True), pd.DataFrame(
      x.astype(np.float32), columns=cols)], axis=1)
  gio.atomic_write(path, lambda f: df.to_parquet(f), mode="wb")
  return path


def reduce_dim(x: np.ndarray, kind: str, dim: int, seed: int = 0
               ) -> np.ndarray:
  """(N, F) -> (N, dim): PCA scores (centred, top singular vectors) or a
  Gaussian random projection scaled by 1/sqrt(dim)."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(0)
  if kind == "pca":
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:dim].T
  rng = np.random.default_rng(seed)
  return x @ rng.standard_normal((x.shape[1], dim)) / np.sqrt(dim)


def control_dim(workdir: str, out: str) -> List:
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from gandl_jax.evaluate import pipeline as ev  # pylint: disable=import-outside-toplevel
  sets = []
  for kind in ("pca", "randproj"):
    for dim in (64, 256):
      paths = {}
      for d in DATASETS:
        df = pd.read_parquet(os.path.join(workdir, "embeddings",
                                          f"densenet_{d}.parquet"))
        feats = _features(df)
        paths[d] = _write_set(df.drop(columns=feats),
                              reduce_dim(df[feats].to_numpy(), kind, dim),
                              os.path.join(out, f"{kind}{dim}_{d}.parquet"))
      sets.append(ev.EmbeddingSet(f"DenseNet random -> {kind} {dim}",
                                  paths["rxrx19a"], paths["rxrx1"]))
  return sets


def control_wide(workdir: str, out: str) -> List:
  # pylint: disable=import-outside-toplevel
  from gandl_jax import sharding
  from gandl_jax.cli import demo
  from gandl_jax.evaluate import pipeline as ev
  from gandl_jax.inference import api, export
  mesh = sharding.make_mesh()
  stages = demo.Stages(out, logging.info)
  data = {d: os.path.join(workdir, "shards", d, "*.tfrecord") for d in DATASETS}
  sets = []
  for seed in [int(s) for s in _SEEDS.value]:
    config = demo.demo_config()
    config.seed = seed
    config.model.channel_base = 8192
    config.model.channel_max = 256
    config.data.path = data["rxrx19a"]
    ckpt = os.path.join(out, f"init-seed{seed}")
    stages.run(f"init-{seed}", lambda c=config, p=ckpt: {
        "checkpoint": demo.save_initial_model(c, mesh, p)})
    for layer in (("fc", "conv") if seed == 0 else ("fc",)):
      tag = f"seed{seed}-{layer}"

      def one(ckpt=ckpt, tag=tag, layer=layer):
        model = api.load(ckpt)
        for d in DATASETS:
          export.export_model(model, data[d],
                              os.path.join(out, f"{tag}_{d}.parquet"),
                              layer=layer, batch=64, checkpoint=ckpt,
                              mesh=mesh)
        return {}
      stages.run(f"export-{tag}", one)
      sets.append(ev.EmbeddingSet(
          f"untrained D x4 wide [{layer}] seed{seed}",
          os.path.join(out, f"{tag}_rxrx19a.parquet"),
          os.path.join(out, f"{tag}_rxrx1.parquet")))
  return sets


def control_channel_mean(workdir: str, out: str) -> List:
  # pylint: disable=import-outside-toplevel
  import pandas as pd
  from gandl_jax.baselines import densenet
  from gandl_jax.data import pipeline
  from gandl_jax.evaluate import pipeline as ev
  backbone = densenet.load_backbone("none", 0)
  paths = {}
  for d in DATASETS:
    batches, _ = pipeline.eval_host_batches(
        os.path.join(workdir, "shards", d, "*.tfrecord"), host_batch=64)
    metas, feats = [], []
    for b in batches:
      valid = np.asarray(b["valid"], bool)
      images = np.asarray(b["image"])[valid].astype(np.float32)
      gray = np.round(images.mean(-1, keepdims=True)).astype(np.uint8)
      feats.append(densenet.densenet_concat_features(gray, backbone, batch=64))
      metas.append(pd.DataFrame({k: np.asarray(v)[valid] for k, v in b.items()
                                 if k not in pipeline.NON_METADATA_KEYS}))
    meta = pd.concat(metas, ignore_index=True)
    meta["site_id"] = meta["site_id"].astype(str)
    paths[d] = _write_set(meta, np.concatenate(feats),
                          os.path.join(out, f"mean_{d}.parquet"))
  return [ev.EmbeddingSet("DenseNet random, channel mean (1024)",
                          paths["rxrx19a"], paths["rxrx1"]),
          ev.EmbeddingSet("DenseNet random, per channel (5x1024)",
                          os.path.join(workdir, "embeddings",
                                       "densenet_rxrx19a.parquet"),
                          os.path.join(workdir, "embeddings",
                                       "densenet_rxrx1.parquet"))]


def per_stain_features(embed, images: np.ndarray) -> np.ndarray:
  """(N, H, W, C) uint8 -> (N, C * F): `embed` of each channel alone (the
  others 0, i.e. black: no stain), concatenated in channel order."""
  feats = []
  for c in range(images.shape[-1]):
    alone = np.zeros_like(images)
    alone[..., c] = images[..., c]
    feats.append(np.asarray(embed(alone), np.float32))
  return np.concatenate(feats, axis=1)


def control_per_stain(workdir: str, out: str) -> List:
  # pylint: disable=import-outside-toplevel
  import pandas as pd
  from gandl_jax import checkpoint
  from gandl_jax.cli import demo
  from gandl_jax.data import pipeline
  from gandl_jax.evaluate import pipeline as ev
  from gandl_jax.inference import api
  stages = demo.Stages(out, logging.info)
  emb = os.path.join(workdir, "embeddings")
  batch = int(demo.demo_config().batch_size)
  sets = []
  for seed in [int(s) for s in _SEEDS.value]:
    train_dir = os.path.join(workdir, f"train-seed{seed}")
    saved = checkpoint.list_steps(train_dir)
    step = min(saved, key=lambda s: abs(s * batch -
                                        _PER_STAIN_KIMG.value * 1000))
    kimg = step * batch / 1000
    for label, ckpt, at, tag_kimg in (
        ("untrained D", os.path.join(workdir, f"init-seed{seed}"), None, 0),
        (f"trained D {kimg:g} kimg", train_dir, step, kimg)):
      for layer in _PER_STAIN_LAYERS.value:
        tag = f"seed{seed}-kimg{tag_kimg:g}-{layer}"

        def one(ckpt=ckpt, at=at, tag=tag, layer=layer):
          model = api.load(ckpt, at)
          for d in DATASETS:
            batches, _ = pipeline.eval_host_batches(
                os.path.join(workdir, "shards", d, "*.tfrecord"),
                host_batch=64)
            metas, feats = [], []
            for b in batches:
              valid = np.asarray(b["valid"], bool)
              images = np.asarray(b["image"])[valid]
              feats.append(per_stain_features(
                  lambda x, l=layer: model.embed(x, l), images))
              metas.append(pd.DataFrame(
                  {k: np.asarray(v)[valid] for k, v in b.items()
                   if k not in pipeline.NON_METADATA_KEYS}))
            meta = pd.concat(metas, ignore_index=True)
            meta["site_id"] = meta["site_id"].astype(str)
            _write_set(meta, np.concatenate(feats),
                       os.path.join(out, f"{tag}_{d}.parquet"))
          return {"step": model.step}
        stages.run(f"export-{tag}", one)
        sets.append(ev.EmbeddingSet(
            f"{label} per stain [{layer}] seed{seed}",
            os.path.join(out, f"{tag}_rxrx19a.parquet"),
            os.path.join(out, f"{tag}_rxrx1.parquet")))
        # The same checkpoint's ordinary embedding (all stains at once), as
        # tools/experiments/training_benefit.py exported it.
        base = f"seed{seed}-kimg{tag_kimg:g}" + ("" if layer == "fc" else
                                                 f"-{layer}")
        if os.path.exists(os.path.join(emb, f"{base}_rxrx19a.parquet")):
          sets.append(ev.EmbeddingSet(
              f"{label} all stains [{layer}] seed{seed}",
              os.path.join(emb, f"{base}_rxrx19a.parquet"),
              os.path.join(emb, f"{base}_rxrx1.parquet")))
  return sets


CONTROLS = {"dim": control_dim, "wide": control_wide,
            "channel_mean": control_channel_mean,
            "per_stain": control_per_stain}


def main(argv):
  del argv
  # pylint: disable=import-outside-toplevel
  from gandl_jax.cli import demo
  from gandl_jax import io as gio
  from gandl_jax.evaluate import pipeline as ev
  logging.set_verbosity(logging.INFO)
  workdir = os.path.abspath(_WORKDIR.value)
  out = os.path.join(workdir, "controls", _CONTROL.value)
  os.makedirs(out, exist_ok=True)
  sets = CONTROLS[_CONTROL.value](workdir, out)
  raw = os.path.join(workdir, "raw")
  sets[0] = dataclasses.replace(
      sets[0], metadata=os.path.join(raw, "RxRx19a", "metadata.csv"),
      rxrx1_metadata=os.path.join(raw, "RxRx1", "metadata.csv"))
  metrics = ev.evaluate(
      sets, os.path.join(out, "eval"),
      truth=os.path.join(raw, "RxRx19a", "synthetic_truth.csv"),
      compounds=NAMED_COMPOUNDS, log=logging.info)
  text = "\n".join(["Command: `python -m tools.experiments.controls " + " ".join(
      sys.argv[1:]) + "`", ""]
                   + demo.headline(metrics)) + "\n"
  gio.write_text(os.path.join(out, "headline.txt"), text)
  print(text)


if __name__ == "__main__":
  app.run(main)
