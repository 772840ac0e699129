"""The convolutional autoencoder (ConvAE) baseline of the GAN-DL paper.

  config.py     its config keys and defaults, checkpoint layout, layer name
  model.py      the network, pixel L2 and the optional perceptual term
  train.py      training state, jitted step, reconstruction grid, `train`
  inference.py  `ConvAEModel` (what `gandl_jax.load` returns) and the
                bottleneck `Embedding` for gandl-export

From Python:

  from gandl_jax.baselines.convae import config, train
  from gandl_jax.inference import export
  cfg = config.demo_config("/tmp/shards32/*.tfrecord")   # or the 256 config
  train.train(cfg, "/tmp/convae", total_kimg=2.0)
  export.export_embeddings("/tmp/convae", "/tmp/shards32", "/tmp/convae.parquet")

From the command line: `gandl-train --config configs/convae_rxrx19a.py`,
`gandl-export --workdir ...` (docs/baselines.md, "ConvAE").

Importing this package registers the family with the core
(`gandl_jax.families`, which imports it by the family's name when a config
or checkpoint names 'convae'). Only the config module is imported here; the
trainer and the inference model are imported when first used.
"""
from gandl_jax import families
from gandl_jax.baselines.convae import config as _config


def _train_parts(config, mesh, channels):
  from gandl_jax.baselines.convae import train  # pylint: disable=import-outside-toplevel
  return train.train_parts(config, mesh, channels)


def _load(variables, meta, **kwargs):
  from gandl_jax.baselines.convae import inference  # pylint: disable=import-outside-toplevel
  return inference.ConvAEModel(variables, meta, **kwargs)


def _embedding(model, layer, batch, num_hosts):
  from gandl_jax.baselines.convae import inference  # pylint: disable=import-outside-toplevel
  return inference.embedding(model, layer, batch, num_hosts)


FAMILY = families.register(families.Family(
    name=_config.FAMILY, base_config=_config.base_config,
    validate=_config.validate, shape_keys=_config.SHAPE_KEYS,
    check_model=_config.check_model, train_parts=_train_parts, load=_load,
    embedding=_embedding))
