"""The ConvAE baseline's training: its state, its jitted step on a mesh, the
reconstruction grid, and `train(config, workdir)`.

`gandl_jax.train.loop.train` runs it when `config.family == 'convae'`
(configs/convae_rxrx19a.py; the family record `train_parts` in
baselines/convae/__init__.py), with everything else of a GAN run: the input
pipeline, Orbax checkpoints and resume, metrics.jsonl / TensorBoard, the
progress line, SIGTERM and the non-finite guard. One iteration is one jitted
step with explicit shardings (state replicated, batch split on the mesh's
`data` axis, the state donated):

  loss = mean((decoder(encoder(x)) - x)^2)                       pixel L2
         + loss.perceptual_weight * perceptual(p, recon, x)      optional

with x the real batch in [-1, 1] (augmented as for the GAN), then Adam
(`config.optim`). Non-finite gradient entries are replaced as in the GAN's
phases (`steps.sanitize_grads`). The perceptual term comes from
`model.perceptual_loss` (the ImageNet ResNet-50 of
baselines/resnet50.py): its frozen parameters are loaded once and are a
replicated argument of the step, not part of the state, the optimizer or
the checkpoints; `perceptual_record` (which weights) goes to every
metrics.jsonl line (`metric_labels`) and to the checkpoint meta
(`checkpoint_meta`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from gandl_jax import families
from gandl_jax import images as image_lib
from gandl_jax import sharding
from gandl_jax.baselines.convae import config as convae_config
from gandl_jax.baselines.convae import model as convae
from gandl_jax.data import pipeline
from gandl_jax.train import loop
from gandl_jax.train import monitor
from gandl_jax.train.steps import sanitize_grads

Array = jax.Array
Metrics = Dict[str, Array]


@flax.struct.dataclass
class ConvAEState:
  step: Array          # completed iterations
  params: Any          # {'encoder': ..., 'decoder': ...}
  opt: Any

  def model_variables(self) -> Dict[str, Any]:
    """The checkpoint's `model` item ({'convae': {'params'}})."""
    return {convae_config.MODEL_KEY: {"params": self.params}}

  def train_items(self) -> Dict[str, Any]:
    """The checkpoint's `train` item."""
    return {"opt": self.opt, "step": self.step}

  @classmethod
  def from_items(cls, model: Dict[str, Any], train: Dict[str, Any]
                 ) -> "ConvAEState":
    return cls(step=train["step"],
               params=model[convae_config.MODEL_KEY]["params"],
               opt=train["opt"])


class ConvAETrainer:
  """The ConvAE, its optimizer and the compiled step for one config/mesh
  (the interface `train.loop` uses: `batch`, `init_state`, `precompile`,
  `precompiled`, `train_step`, `flops_per_iteration`, `metric_labels`,
  `checkpoint_meta`; and `reconstruct` for the grid)."""

  def __init__(self, config, mesh: Mesh):
    self.config = config
    self.mesh = mesh
    self.ae = convae.build(config.model, config.compute_dtype)
    self.batch = int(config.batch_size)
    o = config.optim
    self.tx = optax.adam(float(o.lr), b1=float(o.beta1), b2=float(o.beta2),
                         eps=float(o.eps))
    self.perceptual_weight = float(config.loss.perceptual_weight)
    self.perceptual: Optional[convae.PerceptualFn] = None
    perceptual_params: Any = {}
    # What the perceptual term uses (metrics.jsonl, checkpoint meta).
    self.perceptual_record = convae.perceptual_off_record(
        self.perceptual_weight, str(config.loss.perceptual_weights))
    if self.perceptual_weight > 0:
      term = convae.perceptual_loss(
          str(config.loss.perceptual_weights), int(config.model.img_channels),
          resolution=int(config.model.resolution), seed=int(config.seed),
          compute_dtype=str(config.compute_dtype))
      if term is None:
        raise ValueError(
            f"config.loss.perceptual_weight={self.perceptual_weight} needs a "
            f"perceptual network: set config.loss.perceptual_weights "
            f"(got {config.loss.perceptual_weights!r})")
      self.perceptual, perceptual_params = term.fn, term.params
      self.perceptual_record = term.record
      logging.info("ConvAE perceptual term: %s x %s, %s",
                   self.perceptual_weight, term.record["label"],
                   term.record["network"])
    self._repl = sharding.replicated(mesh)
    self._data = sharding.data_sharded(mesh)
    self._perceptual_params = sharding.replicate(perceptual_params, mesh)
    self._compiled = None
    self._executable = None   # precompile's AOT executable
    self._recon = None

  # ------------------------------------------------------------ state

  def init_state(self, seed: int) -> ConvAEState:
    """A fresh, replicated state (same values on any mesh)."""
    variables = convae.init(jax.random.PRNGKey(seed), self.ae)
    params = variables["params"]
    state = ConvAEState(step=jnp.zeros((), jnp.int32), params=params,
                        opt=self.tx.init(params))
    return sharding.replicate(state, self.mesh)

  # ------------------------------------------------------------ step

  def loss(self, params, real: Array, perceptual_params: Any
           ) -> Tuple[Array, Metrics]:
    """(total loss, metrics) of one batch of real images in [-1, 1]."""
    recon, _ = self.ae.apply({"params": params}, real)
    l2 = convae.pixel_l2(recon, real)
    total, metrics = l2, {"AE/l2": l2, "AE/psnr_db": convae.psnr_db(l2)}
    if self.perceptual is not None:
      p = self.perceptual(perceptual_params, recon, real).astype(jnp.float32)
      total = total + self.perceptual_weight * p
      metrics["AE/perceptual"] = p
    metrics["AE/loss"] = total
    return total, metrics

  def step_fn(self, state: ConvAEState, real: Array, perceptual_params: Any
              ) -> Tuple[ConvAEState, Metrics]:
    real = image_lib.to_float(real)   # uint8 batches -> [-1, 1], on device
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params, real, perceptual_params)
    grads, bad, norm = sanitize_grads(grads)
    updates, opt = self.tx.update(grads, state.opt, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates),
                          opt=opt, step=state.step + 1)
    metrics["AE/grad_norm"] = norm
    metrics["AE/grad_nonfinite"] = bad
    return state, metrics

  def compiled(self, state: ConvAEState):
    if self._compiled is None:
      st = jax.tree_util.tree_map(lambda _: self._repl, state)
      pp = jax.tree_util.tree_map(lambda _: self._repl,
                                  self._perceptual_params)
      self._compiled = jax.jit(
          self.step_fn, in_shardings=(st, self._data, pp),
          out_shardings=(st, self._repl), donate_argnums=(0,))
    return self._compiled

  def precompile(self, state: ConvAEState, real: Array) -> Dict[str, float]:
    """Compiles the one training step now (as `Trainer.precompile` does the
    GAN's phases); returns {'AE': seconds until it was ready}."""
    t0 = time.time()
    self._executable = self.compiled(state).lower(
        state, real, self._perceptual_params).compile()
    return {"AE": time.time() - t0}

  @property
  def metric_labels(self) -> Dict[str, Any]:
    """Constant labels of every metrics.jsonl line."""
    return {"AE/perceptual_weights": self.perceptual_record["weights"]}

  @property
  def checkpoint_meta(self) -> Dict[str, Any]:
    """Added to every checkpoint's meta."""
    return {"perceptual": self.perceptual_record}

  @property
  def precompiled(self) -> bool:
    return self._executable is not None

  def train_step(self, state: ConvAEState, real: Array, step: int,
                 nimg: float) -> Tuple[ConvAEState, Metrics]:
    """One iteration on a global batch `real` (float, data-sharded)."""
    del step, nimg
    fn = self._executable or self.compiled(state)
    return fn(state, real, self._perceptual_params)

  def flops_per_iteration(self, state: ConvAEState, real: Array
                          ) -> Optional[float]:
    """FLOPs of one step from XLA's cost analysis (None if not reported)."""
    try:
      return monitor.compiled_flops(self.compiled(state).lower(
          state, real, self._perceptual_params))
    except Exception:  # pylint: disable=broad-except
      return None

  # ------------------------------------------------------------ monitoring

  def reconstruct(self, state: ConvAEState, images: Array) -> np.ndarray:
    """Reconstructions (float32, [-1, 1] range) of replicated float images."""
    if self._recon is None:
      self._recon = jax.jit(
          lambda params, x: self.ae.apply({"params": params}, x)[0])
    return np.asarray(jax.device_get(self._recon(state.params, images)))


# ------------------------------------------------------------------ the run


def grid_images(config) -> np.ndarray:
  """The grid's real sites: the first image_grid_size *
  max(image_grid_size // 2, 1) sites of the shards (uint8, every host the
  same)."""
  cols = int(config.image_grid_size)
  n = cols * max(cols // 2, 1)
  it, _ = pipeline.eval_host_batches(config.data.path, host_batch=n,
                                     filter=config.data.filter or None)
  b = next(iter(it))
  return b["image"][np.asarray(b["valid"], bool)]


def _grid(config, trainer: ConvAETrainer, mesh: Mesh, channels
          ) -> Callable[[Any, ConvAEState, int], None]:
  """grid(writer, state, step): rows of real sites, each followed by the row
  of their reconstructions ('reconstructions')."""
  cols = int(config.image_grid_size)
  real = grid_images(config)
  x = sharding.replicate(jnp.asarray(image_lib.to_float(real)), mesh)

  def grid(writer, state, step):
    recon = image_lib.to_uint8(trainer.reconstruct(state, x))
    rows = []
    for i in range(0, len(real), cols):
      rows += [real[i:i + cols], recon[i:i + cols]]
    images = np.concatenate(rows)
    writer.write_image(step, "reconstructions", image_lib.grid(
        image_lib.preview_rgb(images, channels), cols=min(cols, len(real))))
  return grid


def train_parts(config, mesh: Mesh, channels):
  """(trainer, grid writer) of a ConvAE config: the family record's
  `train_parts` (`gandl_jax.families`)."""
  trainer = ConvAETrainer(config, mesh)
  return trainer, _grid(config, trainer, mesh, channels)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          total_kimg: Optional[float] = None, mesh: Optional[Any] = None,
          max_steps: Optional[int] = None,
          allow_config_change: Sequence[str] = ()) -> Dict[str, Any]:
  """Trains (or resumes) a ConvAE in `workdir` until `total_kimg` thousand
  images (default `config.total_kimg`); returns `loop.train`'s summary
  ({'step', 'kimg', 'reason', 'metrics', 'workdir'}). The same as
  `gandl-train --config configs/convae_rxrx19a.py`."""
  if families.name(config) != convae_config.FAMILY:
    raise ValueError(f"not a ConvAE config (config.family is "
                     f"{families.name(config)!r}); start from "
                     f"convae.config.demo_config() or "
                     f"configs/convae_rxrx19a.py")
  if total_kimg is not None:
    config = config.copy_and_resolve_references()
    config.total_kimg = float(total_kimg)
  return loop.train(config, workdir, mesh=mesh, max_steps=max_steps,
                    allow_config_change=allow_config_change)
