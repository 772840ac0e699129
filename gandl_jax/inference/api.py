"""Public Python API: load a trained (or imported) model and use it.

  import gandl_jax
  model = gandl_jax.load("gs://bucket/gandl/rxrx19a-256")   # latest step
  imgs = model.generate(seeds=range(8), truncation_psi=0.7)  # uint8 NHWC
  feats = model.embed(images)          # (N, 512) float32, GAN-DL's embedding
  logits = model.discriminate(images)  # (N,) float32

`images` are uint8 NHWC arrays as read from the PNGs/TFRecords, with the
model's resolution and channel count (5 for RxRx19a); they are normalized
inside exactly as in training (x * 2/255 - 1).

Minibatch standard deviation: as in the reference implementation, D's output
for an image depends weakly on the other images of its minibatch-stddev
group. `discriminate` and `embed` run fixed batches of `batch_size` images
(a multiple of the group size) in input order, grouping as training does; a
last partial batch is completed with images from the start of the input.
Results are therefore deterministic for a given input order and batch size.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from gandl_jax import checkpoint
from gandl_jax import families
from gandl_jax import images as image_lib
from gandl_jax.model import networks

NOISE_MODES = networks.NOISE_MODES


class Model:
  """A generator (G_ema) and discriminator with batched, jitted inference.

  Attributes: `config` (model config dict), `step`, `kimg`, `meta`,
  `resolution`, `img_channels`, `z_dim`, `embedding_layers`.
  """

  def __init__(self, variables: Mapping[str, Any], meta: Mapping[str, Any],
               compute_dtype: str = "float32", batch_size: int = 64):
    if "model" not in meta:
      raise ValueError("meta must hold the model config under 'model'")
    for k in ("G_ema", "D"):
      if k not in variables:
        raise ValueError(f"model variables lack {k!r} (have "
                         f"{sorted(variables)})")
    self.meta = dict(meta)
    self.config: Dict[str, Any] = dict(meta["model"])
    self.step = int(meta.get("step", 0))
    self.kimg = float(meta.get("kimg", 0.0))
    self.generator, self.discriminator = networks.build(self.config, compute_dtype)
    self.resolution = int(self.config["resolution"])
    self.img_channels = int(self.config["img_channels"])
    self.z_dim = int(self.config["z_dim"])
    self.embedding_layers = networks.embedding_layers(self.resolution)
    self._group = int(self.config.get("mbstd_group_size") or 1)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = int(math.ceil(batch_size / self._group) * self._group)
    device = jax.local_devices()[0]
    self.g_variables = jax.device_put(
        {k: variables["G_ema"][k] for k in ("params", "buffers")}, device)
    self.d_variables = jax.device_put({"params": variables["D"]["params"]},
                                  device)
    G, D = self.generator, self.discriminator

    def _gen(g_vars, z, key, psi, noise_mode):
      rngs = {"noise": key} if noise_mode == "random" else None
      return G.apply(g_vars, z, truncation_psi=psi, noise_mode=noise_mode,
                     rngs=rngs)

    def _disc(d_vars, images_u8):
      x = image_lib.to_float(images_u8)
      logits, feats = D.apply(d_vars, x, return_features=True)
      return {k: v.astype(jnp.float32) for k, v in feats.items()} | {
          "logit": logits.astype(jnp.float32)}

    self._gen = jax.jit(_gen, static_argnames=("psi", "noise_mode"))
    self._disc = jax.jit(_disc)

  def __repr__(self) -> str:
    c = self.config
    return (f"Model(resolution={c['resolution']}, img_channels="
            f"{c['img_channels']}, z_dim={c['z_dim']}, step={self.step}, "
            f"kimg={self.kimg:g}, source={self.meta.get('source')!r})")

  # --------------------------------------------------------------------------
  # Generator.

  def _latents(self, seeds, z) -> np.ndarray:
    if (seeds is None) == (z is None):
      raise ValueError("give exactly one of `seeds` or `z`")
    if seeds is not None:
      if isinstance(seeds, (int, np.integer)):
        seeds = [seeds]
      return image_lib.seeds_to_z(seeds, self.z_dim)
    z = np.asarray(z, np.float32)
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z must have shape (N, {self.z_dim}), got {z.shape}")
    return z

  def generate_float(self, seeds: Optional[Union[int, Sequence[int]]] = None,
                     z: Optional[np.ndarray] = None,
                     truncation_psi: float = 1.0, noise_mode: str = "const",
                     noise_seed: int = 0) -> np.ndarray:
    """Like `generate` but float32 in the network's [-1, 1] range (N, R, R, C)."""
    if noise_mode not in NOISE_MODES:
      raise ValueError(f"noise_mode must be one of {NOISE_MODES}, "
                       f"got {noise_mode!r}")
    z = self._latents(seeds, z)
    psi = float(truncation_psi)
    key = jax.random.PRNGKey(noise_seed)
    out = []
    bs = self.batch_size
    for i in range(0, len(z), bs):
      chunk = z[i:i + bs]
      n = len(chunk)
      if n < bs and len(z) > bs:  # keep one compiled shape
        chunk = np.concatenate([chunk, np.zeros((bs - n, self.z_dim),
                                                np.float32)])
      key, sub = jax.random.split(key)
      img = self._gen(self.g_variables, jnp.asarray(chunk), sub, psi, noise_mode)
      out.append(np.asarray(img, np.float32)[:n])
    return np.concatenate(out)

  def generate(self, seeds: Optional[Union[int, Sequence[int]]] = None,
               z: Optional[np.ndarray] = None, truncation_psi: float = 1.0,
               noise_mode: str = "const", noise_seed: int = 0) -> np.ndarray:
    """uint8 NHWC images from G_ema.

    seeds: ints; z = RandomState(seed).randn(1, z_dim) each (the reference's
      convention, so seeds give the same latents as its generate.py).
    z: (N, z_dim) latents instead of seeds.
    truncation_psi: w = w_avg + psi * (w - w_avg) on all ws.
    noise_mode: 'const' (the stored noise, deterministic), 'random' (drawn
      from `noise_seed`) or 'none'.
    """
    return image_lib.to_uint8(self.generate_float(seeds, z, truncation_psi, noise_mode,
                                        noise_seed))

  # --------------------------------------------------------------------------
  # Discriminator.

  def _check_images(self, images: Any) -> np.ndarray:
    if not isinstance(images, np.ndarray):
      images = np.asarray(images)
    expected = (self.resolution, self.resolution, self.img_channels)
    if images.dtype != np.uint8:
      raise TypeError(f"images must be uint8 in [0, 255] (as read from the "
                      f"PNGs), got dtype {images.dtype}; convert float "
                      f"images in [-1, 1] with gandl_jax.images.to_uint8")
    if images.ndim == 3 and tuple(images.shape) == expected:
      raise ValueError(f"images must be a batch (N, {expected[0]}, "
                       f"{expected[1]}, {expected[2]}); got a single image "
                       f"{images.shape}: use images[None]")
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f"images must have shape (N, {expected[0]}, {expected[1]}, "
          f"{expected[2]}) (NHWC: resolution {self.resolution}, "
          f"{self.img_channels} channels), got {images.shape}")
    if len(images) == 0:
      raise ValueError("images is empty")
    return images

  def _run_d(self, images: Any, keys: Sequence[str]) -> Dict[str, np.ndarray]:
    images = self._check_images(images)
    n = len(images)
    bs = min(self.batch_size,
             int(math.ceil(n / self._group) * self._group))
    out = {k: [] for k in keys}
    for i in range(0, n, bs):
      chunk = images[i:i + bs]
      m = len(chunk)
      if m < bs:  # complete the batch with images from the start, cyclically
        idx = np.arange(bs - m) % n
        chunk = np.concatenate([chunk, images[idx]])
      feats = self._disc(self.d_variables, jnp.asarray(chunk))
      for k in keys:
        out[k].append(np.asarray(feats[k], np.float32)[:m])
    return {k: np.concatenate(v) for k, v in out.items()}

  def discriminate(self, images: np.ndarray) -> np.ndarray:
    """D logits (N,) float32 for uint8 NHWC images."""
    return self._run_d(images, ["logit"])["logit"][:, 0]

  def embed(self, images: np.ndarray, layer: str = "fc") -> np.ndarray:
    """float32 features (N, F) of D's `layer` (default 'fc', GAN-DL's
    embedding; see `embedding_layers` for the others)."""
    networks.check_embedding_layer(layer, self.resolution)
    feats = self._run_d(images, [layer])[layer]
    return feats.reshape(len(feats), -1)


def load(checkpoint_dir_or_path: Union[str, Any],
         step: Union[None, int, str] = None,
         compute_dtype: str = "float32", batch_size: int = 64,
         allow_fallback: bool = False) -> Any:
  """Loads a model from a workdir, its checkpoints/ dir or a step dir.

  A GAN checkpoint gives a `Model`; another family's (meta 'family', e.g.
  the ConvAE baseline's) the model of that family's `load`
  (`gandl_jax.families`; `baselines.convae.inference.ConvAEModel`).

  The latest step unless `step` is given ('best': the step with the best
  representation-probe score recorded during training). Works on
  checkpoints written by `gandl-train` and by `gandl-import`. An unreadable
  latest step is an error unless `allow_fallback` (then the newest readable
  one is used and `model.meta['fallback']` says why; see
  `checkpoint.restore_model`).
  """
  variables, meta = checkpoint.restore_model(checkpoint_dir_or_path, step,
                                             allow_fallback=allow_fallback)
  plugin = families.plugin(meta)
  return (Model if plugin is None else plugin.load)(
      variables, meta, compute_dtype=compute_dtype, batch_size=batch_size)
