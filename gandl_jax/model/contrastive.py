"""ContraD's contrastive losses and the two-view augmentation for microscopy.

ContraD (Jeong & Shin, ICLR 2021, "Training GANs with Stronger Augmentations
via Contrastive Discriminator"; official code jh-jeong/ContraD) trains the
discriminator's representation with contrastive losses only, and puts the
real/fake decision in a small head on top of it:

  L_D = L_con^+ + lambda * L_con^- + L_dis

- L_con^+ (`nt_xent`): SimCLR's NT-Xent on two augmented views of each real
  image, through a projection head h_r. For 2N normalized projections z and
  the positive pair (i, j) of the same image:
  l(i, j) = -log( exp(z_i.z_j / tau) / sum_{k != i} exp(z_i.z_k / tau) ),
  averaged over all 2N ordered positive pairs.
- L_con^- (`fake_supcon`): a supervised-contrastive loss through a second
  projection head h_f, with the fakes as anchors: every fake's positives are
  the other fakes, and the two real views are in the denominators only. It
  pulls fake embeddings together and away from the reals'.
  For fake i among M fakes, with R the 2N real projections:
  l(i) = -1/(M-1) sum_{j fake, j != i} log( exp(z_i.z_j / tau) /
         sum_{k in R or fakes, k != i} exp(z_i.z_k / tau) ).
- L_dis: the usual logistic GAN loss on a linear head whose input is the
  representation with its gradient stopped (the head does not shape the
  representation); G's loss goes through the head without the stop.
The defaults are the official code's: tau = 0.1, lambda = 1. Projections
are L2-normalized inside the losses (cosine similarity, as SimCLR); the
losses compute in float32 (float64 where given float64).

`ProjectionHeads` holds ContraD's two projection heads (h_r, h_f: each a
2-layer MLP, as the official code's `projection` and `projection2`).

`views` makes the two views for SimCLR on 5-channel fluorescence images:
random resized crops, flips, 90-degree rotations and per-channel intensity
jitter (ContraD's SimCLR views use colour jitter and greyscale, which are
RGB-specific; cells have no canonical orientation, so all eight dihedral
symmetries are used).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_EXCLUDED = -1e9  # Logit of a pair left out of a softmax (self-similarity).


def _normalize(z: Array) -> Array:
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def nt_xent(z1: Array, z2: Array, temperature: float = 0.1) -> Array:
  """SimCLR's NT-Xent loss (ContraD's L_con^+) of two views' projections.

  Args:
    z1, z2: (N, D) projections of the first and second view of the same N
      images (row i of both is one image); normalized here.
    temperature: tau.

  Returns:
    The scalar loss: the mean over the 2N anchors of -log softmax_k(z.z_k /
    tau) at the anchor's other view, the softmax over the 2N - 1 others.
  """
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f"nt_xent: z1 and z2 must both be (N, D), got "
                     f"{z1.shape} and {z2.shape}")
  n = z1.shape[0]
  z = _normalize(jnp.concatenate([z1, z2]))
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), _EXCLUDED, logits)
  log_prob = jax.nn.log_softmax(logits, axis=1)
  idx = jnp.arange(n)
  positives = jnp.concatenate([log_prob[idx, idx + n], log_prob[idx + n, idx]])
  return -jnp.mean(positives)


def fake_supcon(real1: Array, real2: Array, fakes: Array,
                temperature: float = 0.1) -> Array:
  """ContraD's L_con^-: supervised contrastive loss with fakes as anchors.

  Args:
    real1, real2: (N, D) projections (second head) of two views of the reals.
    fakes: (M, D) projections of (augmented) fakes, M >= 2.
    temperature: tau.

  Returns:
    The scalar loss: mean over fakes i of the mean over the other fakes j of
    -log softmax_k(z_i.z_k / tau)[j], k over all 2N + M projections but i.
  """
  if real1.shape != real2.shape or fakes.ndim != 2 or fakes.shape[0] < 2 or (
      fakes.shape[1] != real1.shape[1]):
    raise ValueError(f"fake_supcon: expected real1, real2 (N, D) and fakes "
                     f"(M >= 2, D), got {real1.shape}, {real2.shape}, "
                     f"{fakes.shape}")
  r, m = 2 * real1.shape[0], fakes.shape[0]
  z = _normalize(jnp.concatenate([real1, real2, fakes]))
  logits = z[r:] @ z.T / temperature  # (M, 2N + M)
  self_mask = jnp.arange(r + m)[None, :] == (r + jnp.arange(m))[:, None]
  logits = jnp.where(self_mask, _EXCLUDED, logits)
  log_prob = jax.nn.log_softmax(logits, axis=1)
  positive = (jnp.arange(r + m)[None, :] >= r) & ~self_mask
  per_anchor = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / (m - 1)
  return -jnp.mean(per_anchor)


def contrad_loss(real_z1: Array, real_z2: Array, real_f1: Array,
                 real_f2: Array, fake_f: Array, temperature: float = 0.1,
                 fake_weight: float = 1.0) -> Array:
  """L_con^+ + fake_weight * L_con^- (the contrastive part of ContraD's D
  loss; the real/fake head's loss is added separately).

  Args:
    real_z1, real_z2: first-head (h_r) projections of two views of the reals.
    real_f1, real_f2: second-head (h_f) projections of the same two views.
    fake_f: second-head projections of the fakes.
    temperature: tau of both terms.
    fake_weight: lambda.
  """
  return (nt_xent(real_z1, real_z2, temperature) +
          fake_weight * fake_supcon(real_f1, real_f2, fake_f, temperature))


# ---------------------------------------------------------------------------
# Projection heads.


class ProjectionHeads(nn.Module):
  """ContraD's two projection heads on D's representation.

  `__call__(h)` -> (z, f): h_r(h) for SimCLR's loss on the real views and
  h_f(h) for the fakes' loss; each head is Dense(width) -> ReLU ->
  Dense(proj_dim) (width: the representation's, as the official code's).
  The heads train with D and are not part of the exported model.
  """
  proj_dim: int = 128

  @nn.compact
  def __call__(self, h: Array) -> Tuple[Array, Array]:
    h = h.astype(jnp.float32)
    width = h.shape[-1]

    def head(name):
      x = nn.relu(nn.Dense(width, name=f"{name}_hidden")(h))
      return nn.Dense(self.proj_dim, name=f"{name}_out")(x)
    return head("real"), head("fake")


# ---------------------------------------------------------------------------
# Views.


def _crop_resize(image: Array, key: Array, scale: Tuple[float, float],
                 ratio: Tuple[float, float]) -> Array:
  """A random crop of area fraction ~ U(scale) and aspect ratio (w / h)
  log-uniform in `ratio`, resized back to the image size (bilinear)."""
  h, w, _ = image.shape
  ka, kr, kx, ky = jax.random.split(key, 4)
  area = jax.random.uniform(ka, (), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(kr, (), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  cw = jnp.minimum(jnp.sqrt(area * aspect) * w, w)
  ch = jnp.minimum(jnp.sqrt(area / aspect) * h, h)
  x0 = jax.random.uniform(kx, ()) * (w - cw)
  y0 = jax.random.uniform(ky, ()) * (h - ch)
  s = jnp.stack([h / ch, w / cw])
  t = -jnp.stack([y0, x0]) * s
  return jax.image.scale_and_translate(image, image.shape, (0, 1), s, t,
                                       method="linear", antialias=False)


def _dihedral(image: Array, flip: Array, k: Array) -> Array:
  image = jnp.where(flip, image[:, ::-1], image)
  return jax.lax.switch(k, [lambda x, r=r: jnp.rot90(x, r, axes=(0, 1))
                            for r in range(4)], image)


def _one_view(key: Array, images: Array, crop_scale, crop_ratio, flip, rot90,
              jitter_prob, brightness_std, contrast_std) -> Array:
  b, h, w, c = images.shape
  kc, kf, kr, kj, kb, kn = jax.random.split(key, 6)
  x = images.astype(jnp.float32)
  if crop_scale is not None:
    x = jax.vmap(lambda im, k: _crop_resize(im, k, crop_scale, crop_ratio))(
        x, jax.random.split(kc, b))
  if flip or rot90:
    flips = (jax.random.bernoulli(kf, 0.5, (b,)) if flip
             else jnp.zeros((b,), bool))
    ks = (jax.random.randint(kr, (b,), 0, 4) if rot90
          else jnp.zeros((b,), jnp.int32))
    x = jax.vmap(_dihedral)(x, flips, ks)
  if jitter_prob > 0:
    on = jax.random.bernoulli(kj, jitter_prob, (b, 1, 1, 1))
    bright = jax.random.normal(kb, (b, 1, 1, c)) * brightness_std
    contrast = jnp.exp2(jax.random.normal(kn, (b, 1, 1, c)) * contrast_std)
    x = jnp.where(on, contrast * (x + bright), x)
  return x


def view(key: Array, images: Array, **kwargs) -> Array:
  """One view of `views` (same options): what D sees of a fake in ContraD,
  whose fakes go through the same augmentation as the reals' views."""
  defaults = dict(crop_scale=(0.25, 1.0), crop_ratio=(3 / 4, 4 / 3),
                  flip=True, rot90=True, jitter_prob=0.8, brightness_std=0.2,
                  contrast_std=0.5)
  unknown = set(kwargs) - set(defaults)
  if unknown:
    raise TypeError(f"view: unknown option(s) {sorted(unknown)}")
  if images.ndim != 4:
    raise ValueError(f"view: images must be (B, H, W, C), got shape "
                     f"{images.shape}")
  o = {**defaults, **kwargs}
  if o["rot90"] and images.shape[1] != images.shape[2]:
    raise ValueError(f"view: rot90 needs square images, got "
                     f"{images.shape[1]}x{images.shape[2]}")
  return _one_view(key, images, o["crop_scale"], o["crop_ratio"], o["flip"],
                   o["rot90"], o["jitter_prob"], o["brightness_std"],
                   o["contrast_std"])


def views(key: Array, images: Array, *,
          crop_scale: Optional[Tuple[float, float]] = (0.25, 1.0),
          crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3),
          flip: bool = True, rot90: bool = True, jitter_prob: float = 0.8,
          brightness_std: float = 0.2, contrast_std: float = 0.5
          ) -> Tuple[Array, Array]:
  """Two independently augmented views of NHWC float images in [-1, 1].

  Each view, per image: a random resized crop (area fraction uniform in
  `crop_scale`, aspect ratio log-uniform in `crop_ratio`; None = no crop),
  a horizontal flip with probability 1/2, a rotation by a uniform multiple
  of 90 degrees (with the flip: the 8 symmetries of the square; needs H ==
  W), and with probability `jitter_prob` a per-channel intensity jitter
  x -> c * (x + b), b ~ N(0, brightness_std), log2 c ~ N(0, contrast_std)
  (the ADA color group's form). Pure and jittable; a fixed key gives fixed
  views.
  """
  if images.ndim != 4:
    raise ValueError(f"views: images must be (B, H, W, C), got shape "
                     f"{images.shape}")
  if rot90 and images.shape[1] != images.shape[2]:
    raise ValueError(f"views: rot90 needs square images, got "
                     f"{images.shape[1]}x{images.shape[2]}")
  k1, k2 = jax.random.split(key)
  args = (crop_scale, crop_ratio, flip, rot90, jitter_prob, brightness_std,
          contrast_std)
  return _one_view(k1, images, *args), _one_view(k2, images, *args)
