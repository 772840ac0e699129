"""Sample images from a model to a file (gandl-generate): PNG grids of RGB
composites or raw channels, or `.npz` with the raw uint8 channels."""
from __future__ import annotations

import json
from typing import Any, Dict, Sequence

import numpy as np
from PIL import Image

from gandl_jax import families
from gandl_jax import images as image_lib
from gandl_jax.inference import api
from gandl_jax import io as gio

SAMPLE_VIEWS = ("bgr", "rxrx", "raw")


def save_samples(model: api.Model, out: str, seeds: Sequence[int],
                 truncation_psi: float = 1.0, noise_mode: str = "const",
                 noise_seed: int = 0, view: str = "bgr", cols: int = 0
                 ) -> Dict[str, Any]:
  """Generates images for `seeds` and writes `out`:

  - `*.npz`: `images` uint8 (N, H, W, C) (raw channels), `seeds`, `z`,
    `truncation_psi`, `noise_mode`, `step`, `config_json`;
  - `*.png`: a grid, one cell per seed; `view` 'bgr' / 'rxrx' are RGB
    composites (gandl_jax.images), 'raw' shows the channels side by side
    in greyscale (one row per seed unless `cols` says otherwise).
  Returns a small summary dict.
  """
  family = families.name(model.meta)
  if family != families.GAN:
    raise ValueError(f"this is a {family!r} checkpoint: it has no generator "
                     f"to sample from (gandl-generate needs a GAN checkpoint; "
                     f"the training grids are in WORKDIR/samples/)")
  ext = str(out).lower().rsplit(".", 1)[-1] if "." in str(out) else ""
  if ext not in ("png", "npz"):
    raise ValueError(f"--out must end in .png or .npz, got {out!r}")
  if view not in SAMPLE_VIEWS:
    raise ValueError(f"view must be one of {SAMPLE_VIEWS}, got {view!r}")
  seeds = [int(s) for s in seeds]
  z = image_lib.seeds_to_z(seeds, model.z_dim)
  images = model.generate(z=z, truncation_psi=truncation_psi,
                          noise_mode=noise_mode, noise_seed=noise_seed)
  if ext == "npz":
    def write(tmp):
      np.savez_compressed(
          tmp, images=images, seeds=np.asarray(seeds, np.int64), z=z,
          truncation_psi=np.float32(truncation_psi),
          noise_mode=np.array(noise_mode), step=np.int64(model.step),
          config_json=np.array(json.dumps(model.config)))
  else:
    if view == "raw":
      tiles = image_lib.channel_strip(images)
      picture = image_lib.grid(tiles, cols=cols or 1)
    elif view == "bgr":
      # The training data's channels (a Cell Painting set's stains are
      # coloured like RxRx's; other sets in grey).
      channels = image_lib.dataset_channels(
          (model.meta.get("dataset") or {}).get("channels") or [])
      picture = image_lib.grid(image_lib.preview_rgb(images, channels),
                               cols=cols)
    else:
      picture = image_lib.grid(image_lib.to_rgb(images, style=view),
                               cols=cols)

    def write(tmp):
      Image.fromarray(picture).save(tmp, format="PNG")
  with gio.atomic_path(str(out)) as tmp:
    write(tmp)
  return {"out": str(out), "num_images": len(seeds),
          "shape": tuple(images.shape), "step": model.step}
