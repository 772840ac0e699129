"""ImageNet DenseNet-121 baselines of the GAN-DL paper, in JAX.

The network is `tf.keras.applications.DenseNet121` without its classifier,
re-implemented as pure JAX functions on the Keras weights (converted once,
by layer name; the tests check the features against Keras' own
`model.predict`). JAX rather than Keras runs it because the project installs
`tensorflow-cpu`: Keras would be confined to the host CPU, while the JAX port
runs data-parallel on the same TPUs/GPUs as `gandl-export`, and on a CPU it is
about as fast as Keras (docs/baselines.md, `tools/bench_baselines.py`).

Weights (`load_backbone`; the machinery is `gandl_jax.baselines.keras_weights`,
shared with the ResNet-50 port):

* `imagenet`: Keras' ImageNet weights (`densenet121_weights_tf_dim_ordering_
  tf_kernels_notop.h5`, 29 MB); Keras downloads them into ~/.keras/models on
  first use, so this is the only choice that touches the network;
* a local (or gs://) weights file: `.weights.h5` / `.keras` (Keras 3) or a
  legacy `.h5` (e.g. the file above, copied to an offline machine), with or
  without the ImageNet classifier;
* `none` (alias `random`): Keras' random initialisation (seeded), for tests
  and the offline demo; files record it as `random`.

Input handling (each channel of a site separately): the shards' uint8 channel
at the shards' resolution (or resized to `image_size`, bilinear with
antialiasing), scaled to [0, 1], replicated to three channels and normalised
with the ImageNet mean / std of `keras.applications.densenet.
preprocess_input` (its "torch" mode): RGB plane k = (x - MEAN[k]) / STD[k].

Concatenated baseline (`concat_features`, `densenet_concat_features`,
`export_concat`): every channel through the network, the 1024-d output of
the last BN + ReLU averaged over space, the channels' vectors concatenated in
the shards' channel order (features [1024 c, 1024 (c + 1)) = channel c; 5120-d
for RxRx19a's five channels).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from gandl_jax import io as gio
from gandl_jax.baselines import keras_weights

BLOCKS: Tuple[int, ...] = (6, 12, 24, 16)   # DenseNet-121's dense blocks
FEATURE_DIM = 1024                           # channels of the last block
MIN_SIZE = 32                                # smallest input Keras accepts
# keras.applications.densenet.preprocess_input ("torch" mode): x / 255, then
# per RGB channel (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHTS_IMAGENET = keras_weights.WEIGHTS_IMAGENET
WEIGHTS_RANDOM = keras_weights.WEIGHTS_RANDOM
RANDOM_ALIASES = keras_weights.RANDOM_ALIASES
WEIGHT_SUFFIXES = keras_weights.WEIGHT_SUFFIXES
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
                "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_"
                "notop.h5")

LAYER_CONCAT = "densenet121_concat"          # `gandl.layer` of exported files
META_WEIGHTS = "gandl.weights"
META_WEIGHTS_SEED = "gandl.weights_seed"
META_IMAGE_SIZE = "gandl.image_size"
META_INPUT = "gandl.input"
META_CHANNELS = "gandl.channels"
DEFAULT_BATCH = 32

_DN = ("NHWC", "HWIO", "NHWC")

Params = keras_weights.Params


# ---------------------------------------------------------------------------
# The network (pure functions on a {keras layer name: arrays} dict).


def _bn_relu(p, x):
  """Inference-mode BatchNormalization folded to x * scale + shift, ReLU."""
  return jnp.maximum(x * p["scale"].astype(x.dtype) + p["shift"].astype(x.dtype),
                     0)


def _conv(kernel, x, stride: int = 1, padding: str = "VALID"):
  kernel = kernel.astype(x.dtype)
  if kernel.shape[:2] == (1, 1) and stride == 1:  # a matmul (faster on CPU)
    return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=_DN)


def _avg_pool2(x):
  """AveragePooling2D(2, strides=2, 'valid')."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def feature_map(params: Params, x):
  """DenseNet-121 without its head: (N, H, W, 3) preprocessed images ->
  (N, h, w, 1024), the output of Keras' final `bn` + `relu` layers
  (`DenseNet121(include_top=False, pooling=None)`)."""
  x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  x = _conv(params["conv1_conv"]["kernel"], x, 2)
  x = _bn_relu(params["conv1_bn"], x)
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, after the ReLU
  x = lax.reduce_window(x, -jnp.inf, lax.max,
                        (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
  for b, n in enumerate(BLOCKS):
    for i in range(n):
      name = f"conv{b + 2}_block{i + 1}"
      y = _bn_relu(params[f"{name}_0_bn"], x)
      y = _conv(params[f"{name}_1_conv"]["kernel"], y)
      y = _bn_relu(params[f"{name}_1_bn"], y)
      y = _conv(params[f"{name}_2_conv"]["kernel"], y, padding="SAME")
      x = jnp.concatenate([x, y], axis=-1)
    if b + 1 < len(BLOCKS):
      name = f"pool{b + 2}"
      x = _bn_relu(params[f"{name}_bn"], x)
      x = _conv(params[f"{name}_conv"]["kernel"], x)
      x = _avg_pool2(x)
  return _bn_relu(params["bn"], x)


def pooled(params: Params, x):
  """Global average pool of `feature_map`: (N, H, W, 3) -> (N, 1024) float32."""
  return feature_map(params, x).astype(jnp.float32).mean(axis=(1, 2))


def pseudo_rgb(gray):
  """(..., H, W) intensities in [0, 1] -> (..., H, W, 3): the channel
  replicated to RGB and normalised as keras' densenet.preprocess_input."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (gray[..., None] - mean) / std


def resize(gray, size: Optional[int]):
  """(N, H, W) -> (N, size, size), bilinear (antialiased when shrinking);
  unchanged when `size` is None or already H."""
  if not size or (gray.shape[1] == size and gray.shape[2] == size):
    return gray
  return jax.image.resize(gray, (gray.shape[0], size, size), "linear",
                          antialias=True)


def channel_inputs(images, image_size: Optional[int] = None):
  """(N, R, R, C) uint8 sites -> (N * C, S, S, 3) network inputs, site-major
  (row n * C + c is channel c of site n)."""
  n, r, r2, c = images.shape
  x = images.astype(jnp.float32) / 255.0
  x = jnp.moveaxis(x, -1, 1).reshape(n * c, r, r2)
  return pseudo_rgb(resize(x, image_size))


def concat_features(params: Params, images, image_size: Optional[int] = None,
                    dtype: Any = jnp.float32):
  """(N, R, R, C) uint8 -> (N, C * 1024) float32: every channel through the
  network, spatially averaged, concatenated in channel order."""
  n, c = images.shape[0], images.shape[-1]
  x = channel_inputs(images, image_size).astype(dtype)
  return pooled(params, x).reshape(n, c * FEATURE_DIM)


# ---------------------------------------------------------------------------
# Weights.


ARCH = keras_weights.Architecture("DenseNet-121", "DenseNet121", IMAGENET_URL)
# The weights machinery is shared with the ResNet-50 port
# (gandl_jax/baselines/keras_weights.py); these names are its DenseNet-121 face.
Backbone = keras_weights.Backbone
params_from_keras = keras_weights.params_from_keras
_keras = keras_weights.keras


def keras_model(weights: Optional[str] = None, seed: int = 0,
                include_top: bool = False):
  """`keras.applications.DenseNet121` without pooling (any input size >= 32);
  `weights`: None (random, seeded) or 'imagenet' (may download)."""
  return keras_weights.keras_model(ARCH, weights, seed, include_top)


def load_backbone(weights: str = WEIGHTS_IMAGENET, seed: int = 0) -> Backbone:
  """DenseNet-121 weights: 'imagenet' (Keras fetches them once, the only
  choice that may download), 'none' / 'random' (seeded Keras initialisation)
  or a weights file (.weights.h5, .keras, legacy .h5; local or gs://).

  Raises FileNotFoundError for a missing file and ValueError for a file that
  does not hold DenseNet-121 weights, each naming the file in one line.
  """
  return keras_weights.load(ARCH, weights, seed)


# ---------------------------------------------------------------------------
# Concatenated features.


def _dtype(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got "
                     f"{name!r}")
  return jnp.float32 if name == "float32" else jnp.bfloat16


def check_image_size(image_size: Optional[int], resolution: int) -> int:
  """The resolution the network sees; >= 32 (Keras' minimum)."""
  size = int(image_size or resolution)
  if size < MIN_SIZE:
    raise ValueError(f"DenseNet-121 needs images of at least {MIN_SIZE}x"
                     f"{MIN_SIZE}, got {size}x{size}"
                     + ("" if image_size else " (the shards' resolution; pass "
                        "--image_size (image_size=) to resize)"))
  return size


def input_description(size: int, resolution: int) -> str:
  how = (f"at the shards' {resolution}x{resolution}" if size == resolution
         else f"resized {resolution}x{resolution} -> {size}x{size} (bilinear, "
         f"antialiased)")
  return (f"each channel separately, {how}, x / 255 replicated to RGB, "
          f"(x - {list(IMAGENET_MEAN)}) / {list(IMAGENET_STD)} (keras "
          f"densenet.preprocess_input, torch mode)")


def densenet_concat_features(images: np.ndarray,
                             backbone: Optional[Backbone] = None, *,
                             weights: str = WEIGHTS_IMAGENET, seed: int = 0,
                             batch: int = DEFAULT_BATCH,
                             image_size: Optional[int] = None,
                             compute_dtype: str = "float32") -> np.ndarray:
  """(N, R, R, C) uint8 sites -> (N, C * 1024) float32 concatenated features,
  `batch` sites at a time on the default device (`backbone` or
  `load_backbone(weights, seed)`)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (N, R, R, C), got {images.dtype} "
                     f"{images.shape}")
  check_image_size(image_size, min(images.shape[1:3]))
  backbone = backbone or load_backbone(weights, seed)
  fn = _jitted_concat(image_size, compute_dtype)
  params = jax.device_put(backbone.params)
  n, c = len(images), images.shape[-1]
  out = np.empty((n, c * FEATURE_DIM), np.float32)
  for s in range(0, n, batch):
    chunk = images[s:s + batch]
    k = len(chunk)
    if k < batch and n > batch:  # one compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch - k,) + chunk.shape[1:],
                                              np.uint8)])
    out[s:s + k] = np.asarray(fn(params, chunk))[:k]
  return out


@functools.lru_cache(maxsize=None)
def _jitted_concat(image_size: Optional[int], compute_dtype: str):
  return jax.jit(functools.partial(concat_features, image_size=image_size,
                                   dtype=_dtype(compute_dtype)))


def sharded_concat_fn(backbone: Backbone, mesh, image_size: Optional[int],
                      compute_dtype: str = "float32"):
  """`fn(images)`: a global (B, R, R, C) uint8 array sharded on the mesh's
  data axis -> (B, C * 1024) features, same sharding; weights replicated."""
  from gandl_jax import sharding  # pylint: disable=import-outside-toplevel
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  params = jax.device_put(backbone.params, repl)
  jitted = jax.jit(functools.partial(concat_features, image_size=image_size,
                                     dtype=_dtype(compute_dtype)),
                   in_shardings=(repl, data), out_shardings=data)
  return lambda images: jitted(params, images)


def export_concat(data: str, output: str, *, weights: str = WEIGHTS_IMAGENET,
                  seed: int = 0, batch: int = DEFAULT_BATCH,
                  fmt: Optional[str] = None,
                  filter: Optional[str] = None,  # pylint: disable=redefined-builtin
                  image_size: Optional[int] = None,
                  compute_dtype: str = "float32", mesh: Any = None,
                  backbone: Optional[Backbone] = None,
                  progress_every_s: float = 30.0,
                  overwrite: bool = False) -> Dict[str, Any]:
  """Concatenated DenseNet-121 features of every site of `data` -> `output`,
  in gandl-export's layout (`gandl.layer` = densenet121_concat,
  `gandl.weights` = imagenet / the file / random). Data-parallel over `mesh`
  (default: every device) and over hosts like gandl-export. Returns a
  summary dict. An existing `output` is refused unless `overwrite`."""
  # pylint: disable=import-outside-toplevel
  from gandl_jax import embeddings, sharding
  from gandl_jax.data import pipeline
  from gandl_jax.inference import export
  fmt = embeddings.output_format(output, fmt)
  if not overwrite and gio.exists(output):
    raise FileExistsError(f"{output} already exists; pass --overwrite "
                          f"(overwrite=True) to replace it")
  _dtype(compute_dtype)
  mesh = sharding.make_mesh() if mesh is None else mesh
  sharding.check_batch(batch, int(mesh.devices.size), jax.process_count())
  info = pipeline.read_dataset_info(data)
  res = int(info["resolution"])
  size = check_image_size(image_size, res)
  backbone = backbone or load_backbone(weights, seed)
  channels = [f"w{c['index']} {c.get('stain', '')}".strip()
              for c in info.get("channels", [])] or [
                  f"channel {i}" for i in range(int(info["num_channels"]))]
  logging.info("gandl-features densenet_concat: %s, %s -> %s", backbone.label,
               input_description(size, res), output)
  file_metadata = {
      export.META_LAYER: LAYER_CONCAT,
      META_WEIGHTS: backbone.weights,
      META_IMAGE_SIZE: size,
      META_INPUT: input_description(size, res),
      META_CHANNELS: ",".join(channels),
      export.META_SOURCE: data, export.META_DATASET: info.get("dataset") or "",
      export.META_FILTER: filter or "", export.META_BATCH: batch,
      export.META_COMPUTE_DTYPE: compute_dtype,
      export.META_FEATURE_DIM: len(channels) * FEATURE_DIM,
      export.META_BATCHING: (
          f"batches of {batch} sites in shard order, the last padded; each "
          f"site's features depend on that site only"),
  }
  if backbone.is_random:
    file_metadata[META_WEIGHTS_SEED] = backbone.seed
  embed = sharded_concat_fn(backbone, mesh, None if size == res else size,
                            compute_dtype)
  written = export.write_features(
      embed, data, output, batch=batch, fmt=fmt, mesh=mesh, filter=filter,
      file_metadata=file_metadata, dataset=info.get("dataset"),
      progress_every_s=progress_every_s, name="features")
  seconds = written.seconds
  return {"output": str(output), "format": fmt, "layer": LAYER_CONCAT,
          "weights": backbone.weights, "image_size": size,
          "num_sites": written.num_sites, "feature_dim": written.feature_dim,
          "batch_size": batch, "num_batches": written.num_batches,
          "seconds": round(seconds, 2),
          "sites_per_s": round(written.num_sites / seconds, 2)
                         if seconds > 0 else 0.0}
