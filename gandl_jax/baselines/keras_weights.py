"""Keras application weights for the JAX ports (DenseNet-121, ResNet-50).

One home for what every port of a `keras.applications` network needs:

* Keras imported lazily, with TensorFlow kept off accelerators (JAX owns
  them);
* the weights choice: `imagenet` (Keras downloads the ImageNet file into
  ~/.keras/models on first use: the only choice that touches the network),
  a local or gs:// weights file (`.weights.h5` / `.keras`, Keras 3, or a
  legacy `.h5`, with or without the ImageNet classifier), or `none` (alias
  `random`): Keras' own initialisation, seeded, recorded as `random`;
* one-line errors naming the file for a missing file or a file that does not
  hold the architecture's weights (every variable must come from the file);
* the conversion to a {Keras layer name: arrays} dict, batch norm folded to
  a scale and shift;
* Keras' seeding (`keras.utils.set_random_seed` sets the process-wide Python,
  NumPy and TF seeds) undone after building a model: a global TF seed breaks
  later tf.data pipelines whose op seeds are tensors.

The ports themselves (`gandl_jax.baselines.densenet`,
`gandl_jax.baselines.resnet50`) are pure functions of that dict.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import warnings
from typing import Any, Dict, Optional

import numpy as np
from absl import logging

from gandl_jax import io as gio

WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_RANDOM = "random"
RANDOM_ALIASES = ("none", "random")
WEIGHT_SUFFIXES = (".weights.h5", ".keras", ".h5", ".hdf5")

Params = Dict[str, Dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A `keras.applications` network a port runs.

  name: as messages print it ("DenseNet-121"); keras_name: the
  `keras.applications` constructor ("DenseNet121"); imagenet_url: where Keras
  fetches the no-top ImageNet file (logged before a download).
  """
  name: str
  keras_name: str
  imagenet_url: str


@dataclasses.dataclass(frozen=True)
class Backbone:
  """Converted weights and where they came from.

  weights: `imagenet`, `random` or the weights file's path (as recorded in
  output files); seed: the initialisation seed (random weights only);
  keras_name: the architecture (for `label`).
  """
  params: Params
  weights: str
  seed: Optional[int] = None
  keras_name: str = "DenseNet121"

  @property
  def is_random(self) -> bool:
    return self.weights == WEIGHTS_RANDOM

  @property
  def label(self) -> str:
    if self.is_random:
      return f"random initialisation (seed {self.seed}), not ImageNet"
    if self.weights == WEIGHTS_IMAGENET:
      return f"ImageNet (Keras {self.keras_name})"
    return f"weights file {self.weights}"


def keras():
  """Keras with TensorFlow kept off accelerators (JAX owns them)."""
  gio.tensorflow()
  import keras as k  # pylint: disable=import-outside-toplevel
  return k


def keras_model(arch: Architecture, weights: Optional[str] = None,
                seed: int = 0, include_top: bool = False):
  """`keras.applications.<arch>` without pooling (any input size >= 32) or,
  with `include_top`, the 224x224 classifier; `weights`: None (random,
  seeded) or 'imagenet' (may download). The process-wide seeds are left as
  they were."""
  k = keras()
  import random  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  build = getattr(k.applications, arch.keras_name)
  py_state, np_state = random.getstate(), np.random.get_state()
  k.utils.set_random_seed(seed)
  try:
    if include_top:
      return build(include_top=True, weights=weights)
    return build(include_top=False, weights=weights,
                 input_shape=(None, None, 3))
  finally:
    tf.random.set_seed(None)
    random.setstate(py_state)
    np.random.set_state(np_state)


@functools.lru_cache(maxsize=None)
def _file_target(arch: Architecture):
  """One no-top Keras model per architecture and process that weights files
  load into (`_load_file_into` overwrites every variable or fails)."""
  return keras_model(arch, None, 0)


def params_from_keras(model) -> Params:
  """{layer name: arrays} of every Conv2D (kernel, and bias when it has one)
  and BatchNormalization layer, BN folded to scale = gamma / sqrt(var + eps),
  shift = beta - mean * scale."""
  out: Params = {}
  for layer in model.layers:
    kind = type(layer).__name__
    if kind == "Conv2D":
      out[layer.name] = {"kernel": np.asarray(layer.kernel.numpy(), np.float32)}
      if layer.use_bias:
        out[layer.name]["bias"] = np.asarray(layer.bias.numpy(), np.float32)
    elif kind == "BatchNormalization":
      gamma, beta, mean, var = (np.asarray(w.numpy(), np.float64) for w in (
          layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance))
      scale = gamma / np.sqrt(var + layer.epsilon)
      out[layer.name] = {"scale": scale.astype(np.float32),
                         "shift": (beta - mean * scale).astype(np.float32)}
  return out


def _check_exists(arch: Architecture, path: str) -> None:
  if not gio.exists(path) or (not gio.is_remote(path) and
                              not os.path.isfile(path)):
    raise FileNotFoundError(
        f"{path}: {arch.name} weights file not found (give 'imagenet', "
        f"'none' or a {'/'.join(WEIGHT_SUFFIXES)} file)")


def _load_file_into(arch: Architecture, model, path: str, shown: str) -> None:
  """model.load_weights(path), refusing partial loads: every variable starts
  as NaN and must be overwritten by the file."""
  for v in model.weights:
    v.assign(np.full(v.shape, np.nan, np.float32))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Keras warns per skipped layer
    try:
      model.load_weights(path)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"{shown}: not {arch.name} weights ({first[:200]})"
                       ) from None
  missing = [v.path for v in model.weights if np.isnan(v.numpy()).any()]
  if missing:
    raise ValueError(f"{shown}: not {arch.name} weights ({len(missing)} of "
                     f"{len(model.weights)} tensors missing, e.g. "
                     f"{missing[0]})")


def load(arch: Architecture, weights: str = WEIGHTS_IMAGENET,
         seed: int = 0) -> Backbone:
  """`arch`'s weights: 'imagenet' (Keras fetches them once, the only choice
  that may download), 'none' / 'random' (seeded Keras initialisation) or a
  weights file (.weights.h5, .keras, legacy .h5; local or gs://).

  Raises FileNotFoundError for a missing file and ValueError for a file that
  does not hold `arch`'s weights, each naming the file in one line.
  """
  spec = str(weights or "").strip()
  if not spec:
    raise ValueError(f"no {arch.name} weights given (use 'imagenet', 'none' "
                     f"or a weights file)")
  if spec.lower() in RANDOM_ALIASES:
    return Backbone(params_from_keras(keras_model(arch, None, seed)),
                    WEIGHTS_RANDOM, seed, arch.keras_name)
  if spec.lower() == WEIGHTS_IMAGENET:
    logging.info("%s: ImageNet weights (Keras downloads %s into "
                 "~/.keras/models unless already there)", arch.name,
                 arch.imagenet_url)
    try:
      model = keras_model(arch, WEIGHTS_IMAGENET)
    except Exception as e:  # pylint: disable=broad-except
      # Keras reports a failed download as a bare Exception.
      if not isinstance(e, OSError) and "URL fetch failure" not in str(e):
        raise
      name = os.path.basename(arch.imagenet_url)
      reason = str(e).rsplit(" -- ", 1)[-1].strip()[:200]
      raise ValueError(
          f"{arch.name}: cannot download the ImageNet weights "
          f"{arch.imagenet_url} ({reason}); download that file where there "
          f"is network access and pass it with --weights /path/to/{name}"
      ) from None
    return Backbone(params_from_keras(model), WEIGHTS_IMAGENET, None,
                    arch.keras_name)
  _check_exists(arch, spec)
  shown = spec if "://" in spec else os.path.abspath(spec)
  with tempfile.TemporaryDirectory() as tmp:
    local = spec
    if "://" in spec:   # Keras reads local files only
      local = os.path.join(tmp, os.path.basename(spec))
      with open(local, "wb") as f:
        f.write(gio.read_bytes(spec))
    model = _file_target(arch)
    try:
      _load_file_into(arch, model, local, shown)
    except ValueError as first:
      if not local.endswith((".h5", ".hdf5")) or local.endswith(".weights.h5"):
        raise
      # A legacy .h5 of the full classifier loads only into a model with top.
      model = keras_model(arch, None, seed, include_top=True)
      try:
        _load_file_into(arch, model, local, shown)
      except ValueError:
        raise first from None
  return Backbone(params_from_keras(model), shown, None, arch.keras_name)
