"""Image conventions in one place: latents from seeds, pixel scaling between
uint8 and the networks' [-1, 1], and 5-channel -> RGB composites and grids.

Composite inputs are uint8 NHWC (or HWC) arrays whose channels follow
`gandl_jax.schema.RXRX19A_CHANNELS` (w1 Hoechst, w2 ConA, w3 Phalloidin,
w4 Syto14, w5 WGA). Styles:

  'bgr'   Hoechst -> blue, mean(ConA, Syto14) -> green,
          mean(Phalloidin, WGA) -> red.
  'rxrx'  the colouring of Recursion's rxrx1-utils (`rxrx.io.RGB_MAP`): each
          channel w_i is scaled by 255 / range_i, clipped to 1, times its RGB
          colour (truncated to integers), then summed and clipped to 255.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, Tuple

import numpy as np

from gandl_jax import schema

# ----------------------------------------------------------------------------
# Latents and pixel scaling (shared by training, inference and export).

# uint8 [0, 255] -> [-1, 1]: x * (2 / 255) - 1, in float32.
PIXEL_SCALE = np.float32(2.0 / 255.0)


def seeds_to_z(seeds: Iterable[int], z_dim: int) -> np.ndarray:
  """Latents of the reference's convention: RandomState(seed).randn(1, z_dim)."""
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds is empty")
  bad = [s for s in seeds if not 0 <= s < 2**32]
  if bad:
    raise ValueError(f"seeds must be in [0, 2**32), got {bad[:5]}")
  return np.concatenate([np.random.RandomState(s).randn(1, z_dim)
                         for s in seeds]).astype(np.float32)


def to_uint8(images: Any) -> np.ndarray:
  """[-1, 1] float images -> uint8 as the reference: (x * 127.5 + 128),
  clipped to [0, 255], truncated."""
  x = np.asarray(images, np.float32) * 127.5 + 128
  return np.clip(x, 0, 255).astype(np.uint8)


def to_float(images: Any) -> Any:
  """uint8 [0, 255] -> float32 [-1, 1] as training sees them (numpy or jax
  arrays); float input is taken to be in [-1, 1] already."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) * PIXEL_SCALE - np.float32(1.0)
  return images.astype(np.float32)


# ----------------------------------------------------------------------------
# RGB composites and grids (for viewing).

STYLES = ("bgr", "rxrx")

# rxrx1-utils rxrx/io.py RGB_MAP: channel index -> (RGB colour, display range).
RXRX_RGB_MAP: Mapping[int, Tuple[Tuple[int, int, int], Tuple[int, int]]] = {
    1: ((19, 0, 249), (0, 51)),
    2: ((42, 255, 31), (0, 107)),
    3: ((255, 0, 25), (0, 64)),
    4: ((45, 255, 252), (0, 191)),
    5: ((250, 0, 253), (0, 89)),
    6: ((254, 255, 40), (0, 191)),
}

# 'bgr' style: RGB output channel -> stain short names averaged into it.
BGR_GROUPS: Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]] = (
    ("phalloidin", "wga"),   # red
    ("cona", "syto14"),      # green
    ("hoechst",),            # blue
)


def _as_batch(images: np.ndarray, channels: Sequence[schema.Channel]
              ) -> Tuple[np.ndarray, bool]:
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC or HWC, got shape {images.shape}")
  if images.dtype != np.uint8:
    raise TypeError(f"images must be uint8, got {images.dtype}")
  if images.shape[-1] != len(channels):
    raise ValueError(f"images have {images.shape[-1]} channels, expected "
                     f"{len(channels)} ({[c.short for c in channels]})")
  return images, single


def to_rgb(images: np.ndarray, style: str = "bgr",
           channels: Sequence[schema.Channel] = schema.RXRX19A_CHANNELS
           ) -> np.ndarray:
  """uint8 (N, H, W, C) or (H, W, C) -> uint8 RGB (N, H, W, 3) / (H, W, 3)."""
  images, single = _as_batch(images, channels)
  if style == "bgr":
    by_short = {c.short: i for i, c in enumerate(channels)}
    out = []
    for group in BGR_GROUPS:
      idx = [by_short[s] for s in group if s in by_short]
      if not idx:
        raise ValueError(f"'bgr' composite needs one of {group} among the "
                         f"channels {[c.short for c in channels]}")
      out.append(np.mean(images[..., idx].astype(np.float32), axis=-1))
    rgb = np.clip(np.rint(np.stack(out, axis=-1)), 0, 255).astype(np.uint8)
  elif style == "rxrx":
    acc = np.zeros(images.shape[:3] + (3,), np.int64)
    for i, ch in enumerate(channels):
      if ch.index not in RXRX_RGB_MAP:
        raise ValueError(f"no rxrx colour for channel w{ch.index}")
      colour, (lo, hi) = RXRX_RGB_MAP[ch.index]
      x = (images[..., i].astype(np.float64) / 255.0) / ((hi - lo) / 255.0)
      x = np.minimum(x + lo / 255.0, 1.0)
      acc += (x[..., None] * np.asarray(colour, np.float64)).astype(np.int64)
    rgb = np.minimum(acc, 255).astype(np.uint8)
  else:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  return rgb[0] if single else rgb


def dataset_channels(info_channels: Sequence[Mapping[str, Any]]
                     ) -> Tuple[schema.Channel, ...]:
  """The `schema.Channel`s of a dataset_info.json `channels` list: RxRx's by
  their w-number, a LoadData set's by name (the Cell Painting stains get
  RxRx's short names, so the 'bgr' composite colours them alike)."""
  rxrx = {c.index: c for c in schema.RXRX1_CHANNELS}
  out = []
  for c in info_channels:
    if "name" in c:
      known = schema.CELL_PAINTING_STAINS.get(c["name"])
      out.append(schema.Channel(int(c["index"]), str(c.get("stain", "")),
                                str(c.get("target", "")),
                                known[2] if known else str(c["name"])))
    else:
      out.append(rxrx[int(c["index"])])
  return tuple(out)


def preview_rgb(images: np.ndarray,
                channels: Sequence[schema.Channel] = schema.RXRX19A_CHANNELS
                ) -> np.ndarray:
  """RGB previews of any channel set: the 'bgr' composite when the channels
  hold its stains, otherwise the mean of the channels in grey."""
  images = np.asarray(images)
  channels = tuple(channels) or schema.RXRX19A_CHANNELS
  if len(channels) == images.shape[-1]:
    try:
      return to_rgb(images, "bgr", channels)
    except ValueError:
      pass
  grey = np.clip(np.rint(images.astype(np.float32).mean(-1)), 0, 255)
  return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def channel_strip(images: np.ndarray, pad: int = 2) -> np.ndarray:
  """Raw per-channel view: uint8 (N, H, W, C) -> (N, H, C*W + (C-1)*pad)
  greyscale, channels side by side in their stored order."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 NHWC, got {images.dtype} "
                     f"{images.shape}")
  n, h, w, c = images.shape
  out = np.zeros((n, h, c * w + (c - 1) * pad), np.uint8)
  for i in range(c):
    out[:, :, i * (w + pad):i * (w + pad) + w] = images[..., i]
  return out


def grid(images: np.ndarray, cols: int = 0, pad: int = 2,
         pad_value: int = 0) -> np.ndarray:
  """Tiles (N, H, W[, C]) into one (rows*H + ..., cols*W + ...[, C]) image;
  `cols=0` picks a near-square layout. Unused cells stay `pad_value`."""
  images = np.asarray(images)
  if images.ndim not in (3, 4) or len(images) == 0:
    raise ValueError(f"images must be a non-empty (N, H, W[, C]) batch, got "
                     f"{images.shape}")
  n, h, w = images.shape[:3]
  cols = cols if cols > 0 else int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  shape = (rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad)
  out = np.full(shape + images.shape[3:], pad_value, images.dtype)
  for k in range(n):
    r, c = divmod(k, cols)
    y, x = r * (h + pad), c * (w + pad)
    out[y:y + h, x:x + w] = images[k]
  return out
