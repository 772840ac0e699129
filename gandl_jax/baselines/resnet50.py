"""ImageNet ResNet-50 in JAX, and the perceptual loss built on it.

The network is `tf.keras.applications.ResNet50` (He et al. 2016, the
Caffe-style v1: stride 2 on the first 1x1 convolution of a block, conv
biases, batch norm with eps 1.001e-5) without its classifier, re-implemented
as pure JAX functions on the Keras weights, converted by layer name through
`gandl_jax.baselines.keras_weights` (the same machinery as the DenseNet-121
baseline: `imagenet`, a weights file, or `none` = seeded random). The tests
check the stage outputs against Keras' own model.

Perceptual loss (`perceptual_loss`), the feature reconstruction loss of
Johnson, Alahi & Fei-Fei, "Perceptual Losses for Real-Time Style Transfer
and Super-Resolution" (ECCV 2016, eq. 2): for each layer j with C_j x H_j x
W_j activations phi_j, ||phi_j(x) - phi_j(y)||^2 / (C_j H_j W_j), here
averaged over the layers of `PERCEPTUAL_LAYERS` (and over images and
channels). Layers: the outputs of the last block of stages conv2, conv3 and
conv4 (strides 4, 8, 16; 256, 512, 1024 channels). Johnson et al. found
early and middle layers to preserve the image's content and spatial
structure while the deepest ones keep mainly class information; the usual
practice with several layers (e.g. LPIPS, Zhang et al., CVPR 2018, five
stages of a classifier) is a sum over stages from low to middle depth. conv1
is left out (a 7x7 filter bank, close to the pixel L2 the loss is added to),
conv5 too (stride 32: one value per 32x32 patch, ImageNet-class features).

Input handling: a microscopy image has five stains, ImageNet networks three
colours. Each channel goes through the network separately as a grey image:
pixels in [-1, 1] (the networks' convention, `gandl_jax.images`) mapped to
[0, 255], replicated to three planes and preprocessed as
`keras.applications.resnet50.preprocess_input` does (its "caffe" mode: RGB
-> BGR, minus the ImageNet BGR mean (103.939, 116.779, 123.68), no scaling).
At the input's own resolution (any size >= 32; Keras' minimum).

With random weights this is a distance between random convolutional
features, not a perceptual loss; `Backbone.is_random` says which.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from gandl_jax.baselines import keras_weights

BLOCKS: Tuple[int, ...] = (3, 4, 6, 3)       # blocks of stages conv2..conv5
# (filters 64, 128, 256, 512; a block outputs 4 x filters: the kernels'
# shapes carry the widths)
MIN_SIZE = 32                                # smallest input Keras accepts
# keras.applications.resnet50.preprocess_input ("caffe" mode): RGB -> BGR,
# minus this mean per BGR plane, on [0, 255] pixels.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
                "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
ARCH = keras_weights.Architecture("ResNet-50", "ResNet50", IMAGENET_URL)

# Stage outputs by Keras layer name: conv{s}_block{n}_out.
STAGES: Tuple[str, ...] = tuple(f"conv{s + 2}_block{n}_out"
                                for s, n in enumerate(BLOCKS))
PERCEPTUAL_LAYERS: Tuple[str, ...] = STAGES[:3]

_DN = ("NHWC", "HWIO", "NHWC")

Params = keras_weights.Params
Backbone = keras_weights.Backbone


def load(weights: str = keras_weights.WEIGHTS_IMAGENET,
         seed: int = 0) -> Backbone:
  """ResNet-50 weights: 'imagenet' (may download, the only choice that
  does), 'none' / 'random' (seeded Keras initialisation) or a weights file;
  see `keras_weights.load`."""
  return keras_weights.load(ARCH, weights, seed)


def keras_model(weights: Optional[str] = None, seed: int = 0):
  """`keras.applications.ResNet50(include_top=False)`, any input size."""
  return keras_weights.keras_model(ARCH, weights, seed)


# ---------------------------------------------------------------------------
# The network (pure functions on a {keras layer name: arrays} dict).


def _conv(p, x, stride: int = 1, padding: str = "VALID"):
  kernel = p["kernel"].astype(x.dtype)
  if kernel.shape[:2] == (1, 1):   # a matmul on the strided pixels
    y = jnp.einsum("nhwc,co->nhwo", x[:, ::stride, ::stride], kernel[0, 0])
  else:
    y = lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                 dimension_numbers=_DN)
  return y + p["bias"].astype(x.dtype)


def _bn(p, x):
  """Inference-mode BatchNormalization folded to x * scale + shift."""
  return x * p["scale"].astype(x.dtype) + p["shift"].astype(x.dtype)


def _block(params: Params, name: str, x, stride: int, projection: bool):
  """Keras' resnet `block1`: 1x1 (stride) -> 3x3 -> 1x1 (4 x filters), batch
  norm after each, plus the shortcut (a 1x1 projection in a stage's first
  block), then ReLU (layer `{name}_out`)."""
  if projection:
    shortcut = _bn(params[f"{name}_0_bn"],
                   _conv(params[f"{name}_0_conv"], x, stride))
  else:
    shortcut = x
  y = jax.nn.relu(_bn(params[f"{name}_1_bn"],
                      _conv(params[f"{name}_1_conv"], x, stride)))
  y = jax.nn.relu(_bn(params[f"{name}_2_bn"],
                      _conv(params[f"{name}_2_conv"], y, padding="SAME")))
  y = _bn(params[f"{name}_3_bn"], _conv(params[f"{name}_3_conv"], y))
  return jax.nn.relu(shortcut + y)


def stages(params: Params, x,
           layers: Sequence[str] = STAGES) -> Dict[str, jax.Array]:
  """(N, H, W, 3) preprocessed images -> {layer: (N, h, w, c)} for the
  requested stage outputs (`STAGES` names, Keras' layer names); the network
  runs only as deep as the deepest one."""
  unknown = [l for l in layers if l not in STAGES]
  if unknown:
    raise ValueError(f"unknown ResNet-50 stage outputs {unknown}; known: "
                     f"{list(STAGES)}")
  depth = max(STAGES.index(l) for l in layers) + 1
  x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  x = jax.nn.relu(_bn(params["conv1_bn"], _conv(params["conv1_conv"], x, 2)))
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, after the ReLU
  x = lax.reduce_window(x, -jnp.inf, lax.max,
                        (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
  out = {}
  for s in range(depth):
    for n in range(BLOCKS[s]):
      x = _block(params, f"conv{s + 2}_block{n + 1}", x,
                 stride=2 if (n == 0 and s > 0) else 1, projection=n == 0)
    if STAGES[s] in layers:
      out[STAGES[s]] = x
  return out


# ---------------------------------------------------------------------------
# Input handling and the perceptual loss.


def caffe_inputs(gray):
  """(..., H, W) intensities in [0, 1] -> (..., H, W, 3): the channel as a
  grey image, preprocessed as keras' resnet50.preprocess_input (caffe)."""
  mean = jnp.asarray(CAFFE_MEAN_BGR, gray.dtype)
  return gray[..., None] * 255.0 - mean


def channel_inputs(images):
  """(N, H, W, C) pixels in [-1, 1] -> (N * C, H, W, 3) network inputs,
  image-major (row n * C + c is channel c of image n)."""
  n, h, w, c = images.shape
  images = images.astype(jnp.promote_types(images.dtype, jnp.float32))
  gray = (jnp.moveaxis(images, -1, 1).reshape(n * c, h, w) + 1.0) * 0.5
  return caffe_inputs(gray)


def check_size(height: int, width: int) -> None:
  if min(height, width) < MIN_SIZE:
    raise ValueError(f"the ResNet-50 perceptual loss needs images of at least "
                     f"{MIN_SIZE}x{MIN_SIZE}, got {height}x{width}")


def perceptual_features(params: Params, images,
                        layers: Sequence[str] = PERCEPTUAL_LAYERS,
                        dtype: Optional[Any] = None) -> Dict[str, jax.Array]:
  """(N, H, W, C) pixels in [-1, 1] -> {layer: (N * C, h, w, d)}: every
  channel through ResNet-50 as a grey ImageNet image, computed in `dtype`
  (default: float32, or float64 for float64 images)."""
  check_size(images.shape[1], images.shape[2])
  x = channel_inputs(images)
  return stages(params, x if dtype is None else x.astype(dtype), layers)


def perceptual_loss(params: Params, x, y,
                    layers: Sequence[str] = PERCEPTUAL_LAYERS,
                    dtype: Optional[Any] = None):
  """Feature reconstruction loss (Johnson et al. 2016, eq. 2) between two
  batches of (N, H, W, C) images in [-1, 1]: the mean over `layers` of the
  mean squared difference of their activations (over images, channels,
  positions and features). The network runs in `dtype` (e.g. bfloat16 on a
  TPU; default float32), the differences and the mean in float32 (at
  least). A scalar; pure, so it jits and differentiates (in x and y)."""
  if x.shape != y.shape:
    raise ValueError(f"perceptual_loss: shapes differ, {x.shape} vs {y.shape}")
  # Two calls, not one on [x; y]: the gradient in x then runs backward
  # through x's passes only (XLA's count: 1.5x the loss' FLOPs, not 2x).
  fx = perceptual_features(params, x, layers, dtype)
  fy = perceptual_features(params, y, layers, dtype)
  per_layer = []
  for layer in layers:
    acc = jnp.promote_types(fx[layer].dtype, jnp.float32)
    per_layer.append(jnp.mean(jnp.square(fx[layer].astype(acc) -
                                         fy[layer].astype(acc))))
  return jnp.mean(jnp.stack(per_layer))
