"""Adaptive discriminator augmentation (ADA) for N-channel images.

The augmentation of Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data", as stylegan2-ada-pytorch has it
(`training/augment.py` `AugmentPipe`, `training/training_loop.py` for the
adjustment of p), written as pure JAX functions on NHWC float32 images in
[-1, 1] with any number of channels:

- `blit` group: x-flip, rotation by multiples of 90 degrees, integer
  translation;
- `geom` group: isotropic scale, pre-rotation, anisotropic scale,
  post-rotation, fractional translation. The geometric transforms of both
  groups are composed into one inverse homogeneous matrix per image and
  executed as the reference does: reflect padding (by the margin the batch
  needs), 2x upsampling with the symlet-6 wavelet low-pass filter, bilinear
  sampling (grid_sample, zeros outside, align_corners=False), filtered 2x
  downsampling. Same probability multipliers, standard deviations and order
  of composition as the reference. As there, flips and 90-degree rotations
  go through that resampling too, whose sym6 filter is not symmetric: they
  come out as a slightly low-passed permutation of the pixels, not an exact
  one (integer translations are exact);
- `color` group, per channel: brightness (additive, N(0, brightness_std))
  then contrast (multiplicative, 2^N(0, contrast_std)), i.e.
  `x -> c * (x + b)` as the reference's color matrix for brightness and
  contrast, with independent draws for every (image, channel). The
  reference's luma flip, hue rotation and saturation are left out on
  purpose: they are defined on an RGB cube around the grey axis (1, 1, 1),
  while our channels are independent fluorescent stains (DNA, ER, actin,
  ...) with no shared luma axis; rotating or reflecting around (1, 1, 1)
  would mix one stain's intensity into another, which no microscope does.
  Per-stain gain and offset changes (exposure, staining and background
  differences between plates) are what the data vary in, so that is the
  color group.

Everything is differentiable with respect to the images (G's gradient flows
through the augmentation of fakes, as in the reference's `training/loss.py`,
where every image D sees -- reals and fakes, every D pass -- goes through
the pipeline).

The random choices and their application are split so that parity with the
reference is testable: `draw` makes the raw uniform / normal draws, in the
reference's order and shapes; `params_from_draws` turns them, with p, into
the per-image parameters (the pytree `apply` reads); `sample_params` does
both; `apply(images, params)` is deterministic. `adjust_p` is the ADA
heuristic as a pure function; a fixed-p mode is not calling it.

Differences from the reference, by design:
- jit needs static shapes, so the reflect padding is always the largest the
  reference can use (W-1, H-1 on each side); the reference's data-dependent
  margin (the batch's worst-case corner plus the filter support, clamped to
  the image size) is reproduced by zeroing outside it, so the output is the
  reference's; the cost is the largest-margin cost for every batch.
- When every geometric parameter of the batch is the identity (p = 0),
  the geometric part is skipped (the reference runs its resampling, which
  is the identity up to float rounding).
- Color draws are per channel (the reference's are per image, and its
  color group only takes 1 or 3 channels).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Symlet-6 scaling (low-pass) filter, the reference's `Hz_geom`
# (PyWavelets' Wavelet('sym6').rec_lo), normalized to unit DC gain below.
_SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057,
         -0.048311742585633, 0.4910559419267466, 0.787641141030194,
         0.3379294217276218, -0.07263752278646252, -0.021060292512300564,
         0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_HZ_PAD = len(_SYM6) // 4  # 3: the reference's Hz_pad.

GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate_pre", "aniso",
             "rotate_post", "xfrac")
COLOR = ("brightness", "contrast")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probability multipliers (0 = off) and ranges, as `AugmentPipe`'s.

  Attributes:
    xflip, rotate90, xint: blit multipliers (x-flip, 90-degree rotations,
      integer translation).
    xint_max: range of integer translation, relative to the image size.
    scale, rotate, aniso, xfrac: geom multipliers (isotropic scale,
      arbitrary rotation, anisotropic scale, fractional translation).
    scale_std: log2 standard deviation of isotropic scaling.
    rotate_max: range of arbitrary rotation, 1 = full circle.
    aniso_std: log2 standard deviation of anisotropic scaling.
    xfrac_std: standard deviation of fractional translation, relative to
      the image size.
    brightness, contrast: per-channel color multipliers.
    brightness_std: standard deviation of the additive brightness.
    contrast_std: log2 standard deviation of the contrast factor.
  """
  xflip: float = 0.0
  rotate90: float = 0.0
  xint: float = 0.0
  xint_max: float = 0.125
  scale: float = 0.0
  rotate: float = 0.0
  aniso: float = 0.0
  xfrac: float = 0.0
  scale_std: float = 0.2
  rotate_max: float = 1.0
  aniso_std: float = 0.2
  xfrac_std: float = 0.125
  brightness: float = 0.0
  contrast: float = 0.0
  brightness_std: float = 0.2
  contrast_std: float = 0.5

  def enabled(self) -> Tuple[str, ...]:
    """Names of the draws this configuration makes, in the reference's order."""
    on = {"xflip": self.xflip, "rotate90": self.rotate90, "xint": self.xint,
          "scale": self.scale, "rotate_pre": self.rotate,
          "aniso": self.aniso, "rotate_post": self.rotate,
          "xfrac": self.xfrac, "brightness": self.brightness,
          "contrast": self.contrast}
    return tuple(k for k in GEOMETRIC + COLOR if on[k] > 0)


_BLIT = dict(xflip=1, rotate90=1, xint=1)
_GEOM = dict(scale=1, rotate=1, aniso=1, xfrac=1)
_COLOR = dict(brightness=1, contrast=1)
PIPELINES = {
    "blit": _BLIT, "geom": _GEOM, "color": _COLOR,
    "bg": {**_BLIT, **_GEOM}, "bgc": {**_BLIT, **_GEOM, **_COLOR},
}


def pipeline(name: str = "bgc", **overrides: float) -> AugmentConfig:
  """The named pipeline ('blit', 'geom', 'color', 'bg', 'bgc': the
  reference's `--augpipe` presets with our color group) with overrides."""
  if name not in PIPELINES:
    raise ValueError(f"augment pipeline {name!r}: expected one of "
                     f"{sorted(PIPELINES)}")
  return AugmentConfig(**{**PIPELINES[name], **overrides})


# ---------------------------------------------------------------------------
# Random draws and parameters.


def draw(key: Array, batch: int, channels: int,
         config: AugmentConfig) -> Dict[str, Tuple[Array, Array]]:
  """The raw draws of one batch: {name: (value draw, gate uniform)}.

  Shapes and distributions follow the reference's `torch.rand` / `randn`
  calls: uniform [0, 1) for xflip, rotate90, xint (B, 2), rotate_pre,
  rotate_post; standard normal for scale, aniso, xfrac (B, 2); gates
  uniform (B,), or (B, 1) for the two translations. Color draws are
  (B, channels), normal value and uniform gate. Only enabled transforms
  draw.
  """
  names = config.enabled()
  keys = jax.random.split(key, 2 * max(len(names), 1))
  out = {}
  for i, name in enumerate(names):
    kv, kg = keys[2 * i], keys[2 * i + 1]
    if name in ("xint", "xfrac"):
      vshape, gshape = (batch, 2), (batch, 1)
    elif name in COLOR:
      vshape = gshape = (batch, channels)
    else:
      vshape = gshape = (batch,)
    if name in ("scale", "aniso", "xfrac") + COLOR:
      value = jax.random.normal(kv, vshape, jnp.float32)
    else:
      value = jax.random.uniform(kv, vshape, jnp.float32)
    out[name] = (value, jax.random.uniform(kg, gshape, jnp.float32))
  return out


def params_from_draws(draws: Dict[str, Tuple[Array, Array]], p: Any,
                      config: AugmentConfig, height: int, width: int
                      ) -> Dict[str, Array]:
  """Per-image parameters from raw draws and the probability p.

  As the reference: each transform applies where its gate < multiplier * p;
  the two rotations share P(pre or post) = rotate * p, each with
  p_rot = 1 - sqrt(1 - rotate * p). Returns {name: array}: xflip (B,) in
  {0, 1}; rotate90 (B,) in {0, 1, 2, 3}; xint (B, 2) integer pixels;
  scale, aniso (B,) factors; rotate_pre, rotate_post (B,) radians; xfrac
  (B, 2) relative to the image size; brightness, contrast (B, C).
  """
  p = jnp.asarray(p, jnp.float32)
  out = {}

  def gate(name, mult):
    return draws[name][1] < mult * p

  if "xflip" in draws:
    i = jnp.floor(draws["xflip"][0] * 2)
    out["xflip"] = jnp.where(gate("xflip", config.xflip), i, 0.0)
  if "rotate90" in draws:
    i = jnp.floor(draws["rotate90"][0] * 4)
    out["rotate90"] = jnp.where(gate("rotate90", config.rotate90), i, 0.0)
  if "xint" in draws:
    t = (draws["xint"][0] * 2 - 1) * config.xint_max
    t = jnp.where(gate("xint", config.xint), t, 0.0)
    out["xint"] = jnp.round(t * jnp.asarray([width, height], jnp.float32))
  if "scale" in draws:
    s = jnp.exp2(draws["scale"][0] * config.scale_std)
    out["scale"] = jnp.where(gate("scale", config.scale), s, 1.0)
  p_rot = 1 - jnp.sqrt(jnp.clip(1 - config.rotate * p, 0, 1))
  for name in ("rotate_pre", "rotate_post"):
    if name in draws:
      theta = (draws[name][0] * 2 - 1) * np.float32(np.pi) * config.rotate_max
      out[name] = jnp.where(draws[name][1] < p_rot, theta, 0.0)
  if "aniso" in draws:
    s = jnp.exp2(draws["aniso"][0] * config.aniso_std)
    out["aniso"] = jnp.where(gate("aniso", config.aniso), s, 1.0)
  if "xfrac" in draws:
    t = draws["xfrac"][0] * config.xfrac_std
    out["xfrac"] = jnp.where(gate("xfrac", config.xfrac), t, 0.0)
  if "brightness" in draws:
    b = draws["brightness"][0] * config.brightness_std
    out["brightness"] = jnp.where(gate("brightness", config.brightness), b,
                                  0.0)
  if "contrast" in draws:
    c = jnp.exp2(draws["contrast"][0] * config.contrast_std)
    out["contrast"] = jnp.where(gate("contrast", config.contrast), c, 1.0)
  return out


def sample_params(key: Array, images_shape: Tuple[int, int, int, int],
                  p: Any, config: AugmentConfig) -> Dict[str, Array]:
  """Every random choice for a batch of shape (B, H, W, C), as a pytree."""
  b, h, w, c = images_shape
  return params_from_draws(draw(key, b, c, config), p, config, h, w)


# ---------------------------------------------------------------------------
# Homogeneous 2D matrices, (B, 3, 3).


def _mat(rows):
  """Stacks a 3x3 nested list of (B,) arrays / scalars into (B, 3, 3)."""
  b = next(jnp.shape(x)[0] for r in rows for x in r if jnp.ndim(x))
  return jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(x, jnp.float32),
                                                (b,)) for x in r], -1)
                    for r in rows], -2)


def _translate(tx, ty):
  return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def _scale(sx, sy):
  return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _rotate(theta):
  c, s = jnp.cos(theta), jnp.sin(theta)
  return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def geometric_matrix(params: Dict[str, Array], height: int, width: int
                     ) -> Array:
  """G_inv (B, 3, 3): output pixel -> input pixel, in coordinates centred on
  the image, composed in the reference's order."""
  b = next(iter(params.values())).shape[0]
  g = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (b, 3, 3))
  if "xflip" in params:
    g = g @ _scale(1 / (1 - 2 * params["xflip"]), 1.0)
  if "rotate90" in params:
    g = g @ _rotate(np.float32(np.pi / 2) * params["rotate90"])
  if "xint" in params:
    g = g @ _translate(-params["xint"][:, 0], -params["xint"][:, 1])
  if "scale" in params:
    g = g @ _scale(1 / params["scale"], 1 / params["scale"])
  if "rotate_pre" in params:
    g = g @ _rotate(params["rotate_pre"])
  if "aniso" in params:
    g = g @ _scale(1 / params["aniso"], params["aniso"])
  if "rotate_post" in params:
    g = g @ _rotate(params["rotate_post"])
  if "xfrac" in params:
    g = g @ _translate(-params["xfrac"][:, 0] * width,
                       -params["xfrac"][:, 1] * height)
  return g


# ---------------------------------------------------------------------------
# Resampling: reflect pad, 2x wavelet upsampling, bilinear sampling, 2x
# filtered downsampling.


def _filter() -> np.ndarray:
  f = np.asarray(_SYM6, np.float64)
  return (f / f.sum()).astype(np.float32)


def _correlate(x: Array, taps: np.ndarray, axis: int) -> Array:
  """'Valid' correlation of `x` with `taps` along `axis`."""
  n = x.shape[axis] - len(taps) + 1
  out = 0.0
  for t, v in enumerate(taps):
    out = out + float(v) * jax.lax.slice_in_dim(x, t, t + n, axis=axis)
  return out


def _upsample2x(x: Array, axis: int) -> Array:
  """The reference's `upsample2d` along one axis: zero insertion, zero
  padding (6, 5), convolution with the filter times 2; length 2n."""
  f = _filter()
  shape = list(x.shape)
  z = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
  shape[axis] *= 2
  z = z.reshape(shape)
  pad = [(0, 0)] * x.ndim
  pad[axis] = ((len(f) + 1) // 2, (len(f) - 2) // 2)
  z = jnp.pad(z, pad)
  return _correlate(z, 2 * f[::-1], axis)


def _downsample2x(x: Array, axis: int) -> Array:
  """The reference's `downsample2d(padding=-2 * Hz_pad, flip_filter=True)`
  along one axis: crop, correlate with the filter, keep every 2nd."""
  f = _filter()
  crop = 2 * _HZ_PAD - (len(f) - 1) // 2  # 1 each side.
  x = jax.lax.slice_in_dim(x, crop, x.shape[axis] - crop, axis=axis)
  y = _correlate(x, f, axis)
  return jax.lax.slice_in_dim(y, 0, y.shape[axis], stride=2, axis=axis)


def _margin(g_inv: Array, height: int, width: int) -> Array:
  """The reference's padding (x0, y0, x1, y1), int32, for the whole batch."""
  cx, cy = (width - 1) / 2, (height - 1) / 2
  corners = jnp.asarray([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1],
                         [-cx, cy, 1]], jnp.float32).T  # (3, 4)
  cp = g_inv @ corners  # (B, 3, 4)
  xy = jnp.transpose(cp[:, :2, :], (1, 0, 2)).reshape(2, -1)
  m = jnp.max(jnp.concatenate([-xy, xy]), axis=1)
  m = m + jnp.asarray([2 * _HZ_PAD - cx, 2 * _HZ_PAD - cy] * 2, jnp.float32)
  m = jnp.maximum(m, 0.0)
  m = jnp.minimum(m, jnp.asarray([width - 1, height - 1] * 2, jnp.float32))
  return jnp.ceil(m).astype(jnp.int32)


def _bilinear(images: Array, ix: Array, iy: Array, valid_x: Tuple[Array,
              Array], valid_y: Tuple[Array, Array]) -> Array:
  """grid_sample(bilinear, zeros) at pixel coordinates (B, Ho, Wo); texels
  outside [lo, hi) of `valid_x` / `valid_y` read as zero."""
  _, h, w, _ = images.shape
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  wx1, wy1 = ix - x0, iy - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  out = 0.0
  for dy, wy in ((0, 1 - wy1), (1, wy1)):
    for dx, wx in ((0, 1 - wx1), (1, wx1)):
      xi, yi = x0 + dx, y0 + dy
      ok = ((xi >= valid_x[0]) & (xi < valid_x[1]) & (yi >= valid_y[0]) &
            (yi < valid_y[1]))
      texel = jax.vmap(lambda im, y, x: im[y, x])(
          images, jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1))
      out = out + texel * jnp.where(ok, wx * wy, 0.0)[..., None]
  return out


def resample(images: Array, g_inv: Array) -> Array:
  """Executes G_inv (B, 3, 3) on NHWC images as the reference's geometric
  stage does (padding, upsampling, bilinear sampling, downsampling)."""
  _, h, w, _ = images.shape
  px, py = w - 1, h - 1  # Static padding: the reference's largest margin.
  mx0, my0, mx1, my1 = _margin(g_inv, h, w)
  x = jnp.pad(images, ((0, 0), (py, py), (px, px), (0, 0)), mode="reflect")
  # Zero outside the reference's (data-dependent) padded window.
  cols = jnp.arange(w + 2 * px)
  rows = jnp.arange(h + 2 * py)
  in_x = (cols >= px - mx0) & (cols < px + w + mx1)
  in_y = (rows >= py - my0) & (rows < py + h + my1)
  x = x * (in_y[:, None] & in_x[None, :]).astype(x.dtype)[None, :, :, None]
  x = _upsample2x(_upsample2x(x, 1), 2)
  # Output canvas (2(H + 2 Hz_pad), 2(W + 2 Hz_pad)) -> input pixel coords.
  ho, wo = 2 * (h + 2 * _HZ_PAD), 2 * (w + 2 * _HZ_PAD)
  u = (jnp.arange(wo, dtype=jnp.float32) + 1 - wo / 2) / 2
  v = (jnp.arange(ho, dtype=jnp.float32) + 1 - ho / 2) / 2
  a = g_inv[:, :2, :2]
  bx = (a[:, 0, 0, None, None] * u[None, None, :] +
        a[:, 0, 1, None, None] * v[None, :, None] + g_inv[:, 0, 2, None, None])
  by = (a[:, 1, 0, None, None] * u[None, None, :] +
        a[:, 1, 1, None, None] * v[None, :, None] + g_inv[:, 1, 2, None, None])
  ix = 2 * bx + (w + 2 * px) - 1
  iy = 2 * by + (h + 2 * py) - 1
  x = _bilinear(x, ix, iy, (2 * (px - mx0), 2 * (px + w + mx1)),
                (2 * (py - my0), 2 * (py + h + my1)))
  return _downsample2x(_downsample2x(x, 1), 2)


def apply(images: Array, params: Dict[str, Array]) -> Array:
  """Applies `params` (from `sample_params`) to NHWC float images.

  Deterministic and differentiable with respect to `images`.
  """
  if images.ndim != 4:
    raise ValueError(f"augment.apply: images must be (B, H, W, C), got shape "
                     f"{images.shape}")
  images = images.astype(jnp.float32)
  _, h, w, _ = images.shape
  if any(k in params for k in GEOMETRIC):
    g_inv = geometric_matrix(params, h, w)
    identity = jnp.all(g_inv == jnp.eye(3, dtype=jnp.float32))
    images = jax.lax.cond(identity, lambda x, g: x, resample, images, g_inv)
  if "brightness" in params:
    images = images + params["brightness"][:, None, None, :]
  if "contrast" in params:
    images = images * params["contrast"][:, None, None, :]
  return images


def augment(key: Array, images: Array, p: Any,
            config: AugmentConfig) -> Array:
  """`apply(images, sample_params(key, images.shape, p, config))`."""
  return apply(images, sample_params(key, images.shape, p, config))


# ---------------------------------------------------------------------------
# The ADA heuristic.


def adjust_p(p: Any, sign_sum: Any, count: Any, batch_size: int,
             interval: int = 4, kimg: float = 500, target: float = 0.6
             ) -> Array:
  """One ADA update of p, as the reference's training loop.

  r_t = sign_sum / count is E[sign(D(real))] over the reals D saw since the
  last update (every `interval` iterations);
  p <- max(p + sign(r_t - target) * batch_size * interval / (kimg * 1000),
  0). No upper clamp (as the reference). With count == 0 (no statistics) p
  is returned unchanged (the reference would turn p into NaN). float32, as
  the reference's `p` buffer. In the reference the signs come from every D
  pass on reals (the main D phase and the lazy R1 phase alike), and the
  update runs after iteration i when i % interval == 0 (i counted from 1).

  Args:
    p: the current probability (scalar).
    sign_sum: sum of sign(D(x)) over the real images seen since the last
      update.
    count: how many real logits went into `sign_sum`.
    batch_size: images per iteration (the global batch).
    interval: iterations between updates (the reference's `ada_interval`).
    kimg: kimg for p to move by one unit (the reference's `ada_kimg`).
    target: the target r_t (the reference's `ada_target`).
  """
  p = jnp.asarray(p, jnp.float32)
  count = jnp.asarray(count, jnp.float32)
  r_t = jnp.asarray(sign_sum, jnp.float32) / jnp.maximum(count, 1.0)
  step = jnp.sign(r_t - target) * (batch_size * interval / (kimg * 1000))
  return jnp.where(count > 0, jnp.maximum(p + step, 0.0), p)


__all__ = ["AugmentConfig", "PIPELINES", "pipeline", "draw",
           "params_from_draws", "sample_params", "geometric_matrix",
           "resample", "apply", "augment", "adjust_p"]
