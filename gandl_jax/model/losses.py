"""StyleGAN2 losses and regularizers as pure functions (stylegan2-ada-pytorch's
`StyleGAN2Loss` formulas), plus the schedule arithmetic they need.

Everything here is float32 whatever the networks' compute dtype.
"""
from __future__ import annotations

from typing import Callable, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def g_nonsaturating_loss(fake_logits: Array) -> Array:
  """G minimizes softplus(-D(G(z))), averaged over the batch."""
  return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def d_logistic_loss(real_logits: Array, fake_logits: Array) -> Array:
  """D minimizes softplus(D(G(z))) + softplus(-D(x)), averaged over the batch."""
  return (jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32))) +
          jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32))))


def r1_penalty(logits_fn: Callable[[Array], Array], real_images: Array
               ) -> Tuple[Array, Array]:
  """Per-sample ||d sum(D(x)) / dx||^2 on real images, and the logits.

  The loss is `mean(penalty) * gamma / 2` (times the lazy interval).
  Differentiable with respect to whatever `logits_fn` closes over (R1 needs
  gradients of gradients).
  """
  def total(x):
    logits = logits_fn(x).astype(jnp.float32)
    return jnp.sum(logits), logits
  grads, logits = jax.grad(total, has_aux=True)(real_images)
  penalty = jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=(1, 2, 3))
  return penalty, logits


def path_lengths(synthesis_fn: Callable[[Array], Array], ws: Array,
                 noise_key: Array) -> Tuple[Array, Array]:
  """Per-sample path lengths ||J_w^T y||, y ~ N(0, 1/(H*W)); and the images.

  `ws` is (N, num_ws, w_dim); the Jacobian-vector product is taken through
  the synthesis network as in the reference:
  `sqrt(mean_over_ws(sum_over_w_dim(grad^2)))`.
  """
  images, vjp = jax.vjp(synthesis_fn, ws)
  h, w = images.shape[1], images.shape[2]
  noise = jax.random.normal(noise_key, images.shape, jnp.float32) / jnp.sqrt(
      float(h * w))
  (grads,) = vjp(noise.astype(images.dtype))
  grads = grads.astype(jnp.float32)
  return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(grads), axis=2), axis=1)), images


def path_length_penalty(lengths: Array, pl_mean: Array, decay: float
                        ) -> Tuple[Array, Array]:
  """Per-sample (length - a)^2 with `a` the updated running mean, and `a`.

  As in the reference, the updated mean `pl_mean + decay * (mean(lengths) -
  pl_mean)` is used inside the penalty (and carries gradient through the
  batch mean); the caller stores `stop_gradient(a)` as the new `pl_mean`.
  """
  new_mean = pl_mean + decay * (jnp.mean(lengths) - pl_mean)
  return jnp.square(lengths - new_mean), new_mean


def lazy_regularization(lr: float, betas: Tuple[float, float],
                        interval: int) -> Tuple[float, Tuple[float, float]]:
  """Adam lr and betas for lazy regularization every `interval` steps.

  c = interval / (interval + 1); lr -> lr * c, beta -> beta ** c. With no
  regularization (interval <= 0) nothing changes.
  """
  if not interval or interval <= 0:
    return lr, betas
  c = interval / (interval + 1)
  return lr * c, (betas[0] ** c, betas[1] ** c)


def ema_beta(batch_size: int, nimg: float, half_life_kimg: float,
             rampup: float = None) -> float:
  """G EMA decay per step: 0.5 ** (batch / half_life_images).

  With `rampup`, the half-life is at most `nimg * rampup` (images seen so
  far), as in stylegan2-ada-pytorch.
  """
  ema_nimg = half_life_kimg * 1000.0
  if rampup is not None:
    ema_nimg = min(ema_nimg, nimg * rampup)
  return 0.5 ** (batch_size / max(ema_nimg, 1e-8))
