"""gandl-jax: GAN-DL (StyleGAN2 discriminator embeddings for microscopy) in JAX."""
__version__ = "0.1.0"

__all__ = ["load", "Model"]


def __getattr__(name):
  # `gandl_jax.load` / `gandl_jax.Model` (gandl_jax/inference/api.py),
  # imported on first use so that `import gandl_jax.schema` stays free of jax.
  if name in ("load", "Model"):
    from gandl_jax.inference import api  # pylint: disable=import-outside-toplevel
    return getattr(api, name)
  raise AttributeError(f"module 'gandl_jax' has no attribute {name!r}")
