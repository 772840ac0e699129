"""gandl-jax: GAN-DL (StyleGAN2 discriminator embeddings for microscopy) in JAX."""
__version__ = "0.1.0"
