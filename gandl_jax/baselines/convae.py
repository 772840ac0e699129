"""The ConvAE baseline from Python: train into a workdir, export its
bottleneck as an embedding set (docs/baselines.md, "ConvAE").

  from gandl_jax.baselines import convae
  config = convae.demo_config("/tmp/shards32/*.tfrecord")   # or the 256 config
  convae.train(config, "/tmp/convae", total_kimg=2.0)
  convae.export("/tmp/convae", "/tmp/shards32", "/tmp/convae.parquet")

`train` is `gandl-train --config configs/convae_rxrx19a.py ...` (the same
loop as the GAN: resume, checkpoints, metrics, SIGTERM), `export` is
`gandl-export --workdir ...` on the ConvAE's workdir. The model is
gandl_jax/model/convae.py, its training step gandl_jax/train/convae.py.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import ml_collections

from gandl_jax import config as config_lib
from gandl_jax.inference import export as export_lib
from gandl_jax.train import loop


def demo_config(data_path: str = "", resolution: int = 32
                ) -> ml_collections.ConfigDict:
  """The demo-sized ConvAE (`configs/convae_rxrx19a.py:demo`): 32x32x5, the
  GAN demo's feature maps (64), a 128-d bottleneck (the paper's 1024 scaled
  as the GAN's embedding is, 512 -> 64), batch 16, Adam lr 0.005, 2 kimg.
  `resolution`: the shards' (any power of two from 8; the same layers)."""
  config = config_lib.convae_base_config()
  config.model = config_lib.convae_model_config(
      resolution=int(resolution), channel_base=1024, channel_max=64,
      bottleneck_dim=128)
  config.data.path = data_path
  # 0.005 rather than the full config's 0.002: after 1 kimg on the demo
  # shards L2 0.0635 vs 0.0676 (lr 0.01: 0.0603; 0.0005: 0.086),
  # docs/baselines.md.
  config.optim.lr = 0.005
  config_lib.demo_schedule(config)
  config.image_grid_size = 4
  return config


def train(config: ml_collections.ConfigDict, workdir: str, *,
          total_kimg: Optional[float] = None, mesh: Optional[Any] = None,
          max_steps: Optional[int] = None,
          allow_config_change: Sequence[str] = ()) -> Dict[str, Any]:
  """Trains (or resumes) a ConvAE in `workdir` until `total_kimg` thousand
  images (default `config.total_kimg`); returns `loop.train`'s summary
  ({'step', 'kimg', 'reason', 'metrics', 'workdir'})."""
  if config_lib.family(config) != config_lib.FAMILY_CONVAE:
    raise ValueError(f"not a ConvAE config (config.family is "
                     f"{config_lib.family(config)!r}); start from "
                     f"convae.demo_config() or configs/convae_rxrx19a.py")
  if total_kimg is not None:
    config = config.copy_and_resolve_references()
    config.total_kimg = float(total_kimg)
  return loop.train(config, workdir, mesh=mesh, max_steps=max_steps,
                    allow_config_change=allow_config_change)


def export(workdir: str, data: str, output: str, *,
           batch: int = export_lib.DEFAULT_BATCH, **kwargs
           ) -> export_lib.ExportSummary:
  """The bottleneck of `workdir`'s latest ConvAE checkpoint for every site of
  `data` -> `output` (gandl-export's layout; `export_embeddings`' keyword
  arguments: step, fmt, filter, mesh, overwrite, ...)."""
  return export_lib.export_embeddings(workdir, data, output, batch=batch,
                                      **kwargs)
