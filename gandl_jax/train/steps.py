"""The training state and the four jitted StyleGAN2 phases, sharded on a mesh.

One iteration runs, in stylegan2-ada-pytorch's order:
  G main  (every step)          non-saturating loss, style mixing
  G reg   (every pl_interval)   path-length penalty on batch / pl_batch_shrink
  D main  (every step)          logistic loss on fakes and reals; G EMA update
  D reg   (every r1_interval)   R1 on reals
Each phase is one `jax.jit` with explicit shardings (state replicated, batch
split on the mesh's `data` axis) and the state donated, compiled once. The
real batch arrives as uint8 (a quarter of float32's bytes to copy to the
device) and is mapped to [-1, 1] inside the phases that read it
(`images.to_float`; float batches in [-1, 1] pass through). Lazy
regularization uses one Adam per network with lr * c and beta ** c,
c = interval / (interval + 1), shared by its main and reg phases; as in the
reference the correction depends only on the interval, so it stays when the
regularizer's weight is 0 (the reg phase then never runs).

As in stylegan2-ada-pytorch's training loop, every phase replaces non-finite
gradient entries before the optimizer step (`sanitize_grads`: NaN -> 0,
+-inf -> +-1e5), so one bad batch cannot poison the parameters or Adam state.
Style mixing draws its cutoff per slice of the batch (`mixing_cutoffs`), as
the reference draws it per `run_G` call, i.e. per per-GPU batch.

Two options change what D sees and learns (the section "Augmentation and the
contrastive discriminator" below; both off by default):
- `config.augment` ('fixed' or 'ada'): ADA's pipeline (model/augment.py) on
  every image D sees -- fakes and reals in D main, the reals of the R1 pass
  (R1's gradient is taken with respect to the un-augmented reals, through the
  pipeline) and the fakes of G main (G's gradient flows through it), as the
  reference's `training/loss.py`. The draws come from each phase's key. The
  sum of sign(D(real)) and its count over every D pass accumulate in
  `TrainState.ada`; a fifth phase, `ada`, runs at the start of every
  `ada_interval`-th iteration (the reference adjusts after that many
  iterations), turns them into r_t and, in 'ada' mode, moves p
  (`augment.adjust_p`).
- `config.contrastive`: ContraD (model/contrastive.py). D main trains D's
  representation (the `fc` features) with SimCLR's loss on two views of each
  real and the fakes' supervised-contrastive loss, through two projection
  heads (`TrainState.heads`, their own Adam state `heads_opt`); the
  real/fake head (D's `out` layer) reads the representation with its
  gradient stopped. G's loss goes through D as usual, on a view of its
  fakes.

One module (~690 lines) because the four phases share the state, the
optimizers and the phase table; ADA and ContraD are branches of those
phases' losses, not phases of their own.
"""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent import futures
from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gandl_jax import config as config_lib
from gandl_jax import images as image_lib
from gandl_jax.model import augment, contrastive, layers, losses, networks
from gandl_jax import sharding
from gandl_jax.train import monitor

Array = jax.Array
Metrics = Dict[str, Array]


@flax.struct.dataclass
class TrainState:
  step: Array            # completed iterations
  g_params: Any
  g_buffers: Any         # mapping.w_avg, noise_const
  d_params: Any
  ema_params: Any        # G_ema
  ema_buffers: Any
  g_opt: Any
  d_opt: Any
  pl_mean: Array         # running mean of path lengths
  rng: Array
  # ADA (config.augment != 'none'): {'p', 'sign_sum', 'count', 'rt'} float32
  # scalars: the probability, sign(D(real)) summed over the D passes since
  # the last `ada` phase and how many logits, the last r_t. None when off.
  ada: Any = None
  # ContraD (config.contrastive): the projection heads' parameters and Adam
  # state. None when off.
  heads: Any = None
  heads_opt: Any = None

  def model_variables(self) -> Dict[str, Any]:
    """{'G', 'G_ema', 'D'} in the checkpoint/`gandl_jax.load` layout."""
    return {"G": {"params": self.g_params, "buffers": self.g_buffers},
            "G_ema": {"params": self.ema_params, "buffers": self.ema_buffers},
            "D": {"params": self.d_params}}


@dataclasses.dataclass(frozen=True)
class Phase:
  """One jitted phase of an iteration (see the module docstring)."""
  name: str
  fn: Callable[..., Tuple[TrainState, Metrics]]
  every: int           # runs at iterations 0, every, 2*every, ...; 0: never
  takes_real: bool     # fn(state, real, ...)
  takes_beta: bool     # fn(..., ema_beta)
  first: int = 0       # the first iteration it runs at

  def runs_at(self, step: int) -> bool:
    return (self.every > 0 and step >= self.first and
            step % self.every == 0)


def make_optimizer(lr: float, beta1: float, beta2: float, eps: float,
                   reg_interval: int) -> optax.GradientTransformation:
  """Adam with the lazy-regularization correction for `reg_interval`."""
  lr, (b1, b2) = losses.lazy_regularization(lr, (beta1, beta2), reg_interval)
  return optax.adam(lr, b1=b1, b2=b2, eps=eps)


# stylegan2-ada-pytorch's training_loop: nan_to_num(grad, nan=0, posinf=1e5,
# neginf=-1e5) on every parameter's gradient before each optimizer step.
GRAD_POSINF, GRAD_NEGINF = 1e5, -1e5


def _nan_to_num(x):
  return jnp.nan_to_num(x, nan=0.0, posinf=GRAD_POSINF, neginf=GRAD_NEGINF)


def sanitize_grads(grads):
  """Gradients with NaN -> 0, +inf -> 1e5, -inf -> -1e5 (the reference's
  clean-up before every optimizer step), the number of entries replaced, and
  the global L2 norm of the cleaned gradients (float32 scalars).

  The two sums run over all leaves raveled into one vector: on CPU that is a
  handful of kernels, where a sum per leaf was about four per leaf (58 leaves
  in the demo's G): a fifth of each phase's kernels, about a tenth of its
  compilation (docs/performance.md, "Compilation time"). The cleaned
  gradients, and so the optimizer step, are per leaf as before; the norm
  equals `optax.global_norm(clean)` up to the order of the float32 sum.
  """
  leaves = jax.tree_util.tree_leaves(grads)
  if not leaves:
    zero = jnp.zeros((), jnp.float32)
    return grads, zero, zero
  clean = jax.tree_util.tree_map(_nan_to_num, grads)
  flat = jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in leaves])
  bad = jnp.sum(jnp.where(jnp.isfinite(flat), 0.0, 1.0))
  flat = _nan_to_num(flat)
  return clean, bad, jnp.sqrt(jnp.sum(flat * flat))


# XLA:CPU options for the training phases (docs/performance.md,
# "Compilation time"): each phase is a few hundred small fused loops, and LLVM's
# optimization and code generation of them is most of a cold start. LLVM -O2
# instead of XLA's default -O3 compiles the demo's phases in about a quarter
# less CPU time (-O1 saves no more) and runs the iteration as fast (A/B:
# python -m tools.bench.phases --baseline_compiler_options '{}'). Results differ
# from -O3's in the last bits, within every parity bound. Other platforms
# get none.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def default_compiler_options(mesh: Mesh) -> Dict[str, Any]:
  """`CPU_COMPILER_OPTIONS` on a mesh of CPU devices, else none."""
  if {d.platform for d in mesh.devices.flat} == {"cpu"}:
    return dict(CPU_COMPILER_OPTIONS)
  return {}


def mixing_cutoffs(key: Array, batch: int, slices: int, num_ws: int,
                   prob: float) -> Array:
  """Per-sample style-mixing cutoffs, shape (batch,): the batch is cut into
  `slices` contiguous equal slices; each slice mixes with probability `prob`
  at a cutoff drawn uniformly from [1, num_ws), else gets `num_ws` (no mixing).

  The reference draws one cutoff and one Bernoulli per `run_G` call, i.e. per
  per-GPU batch; a slice here is the per-device batch (`Trainer.mbstd_shards`
  slices), so results do not depend on how many devices run them.
  """
  if batch % slices:
    raise ValueError(f"batch {batch} does not split into {slices} slices")
  k_cut, k_prob = jax.random.split(key)
  cutoff = jax.random.randint(k_cut, (slices,), 1, num_ws)
  cutoff = jnp.where(jax.random.uniform(k_prob, (slices,)) < prob, cutoff,
                     num_ws)
  return jnp.repeat(cutoff, batch // slices)


# Salts folded into a phase's key for the augmentation draws (so the other
# draws of the phase stay as they are with augmentation off).
_FAKE, _REAL, _VIEW, _HEADS = 11, 12, 13, 14


def _end_of_d_main(state: TrainState, g_buffers, ema_beta: Array,
                   rng: Array) -> TrainState:
  """G EMA (G does not change in the D phases, so this equals updating at the
  end of the iteration): p_ema <- p + beta * (p_ema - p); buffers copied; the
  iteration counted."""
  ema = jax.tree_util.tree_map(lambda p, e: p + ema_beta * (e - p),
                               state.g_params, state.ema_params)
  return state.replace(g_buffers=g_buffers, ema_params=ema,
                       ema_buffers=g_buffers, step=state.step + 1, rng=rng)


class Trainer:
  """Holds G, D, the optimizers and the compiled phases for one config/mesh.

  `mbstd_shards` is the number of contiguous batch slices in which
  minibatch-stddev groups are formed; it defaults to the mesh size so groups
  never cross devices. Fixing it makes results independent of device count.
  """

  def __init__(self, config, mesh: Mesh, mbstd_shards: int = None,
               compiler_options: Dict[str, Any] = None):
    self.config = config
    self.mesh = mesh
    # XLA options of every phase (None: `default_compiler_options`).
    self.compiler_options = (default_compiler_options(mesh)
                             if compiler_options is None
                             else dict(compiler_options))
    self.G, self.D = networks.build(config.model, config.num_bf16_res,
                                    config.get("remat", "none"))
    self.batch = int(config.batch_size)
    self.mbstd_shards = int(mbstd_shards or config.mbstd_shards
                            or mesh.devices.size)
    optim, loss = config.optim, config.loss
    # Lazy regularization: a phase that runs every `interval` iterations
    # (0: never, when its weight is 0). The Adam correction depends on the
    # configured interval alone, as in the reference (where a zero weight
    # leaves the reg phase scheduled but without gradients).
    self.pl_interval = (int(loss.pl_interval)
                        if config_lib.pl_enabled(config) else 0)
    self.r1_interval = (int(loss.r1_interval)
                        if config_lib.r1_enabled(config) else 0)
    self.g_tx = make_optimizer(optim.g_lr, optim.beta1, optim.beta2, optim.eps,
                               int(loss.pl_interval))
    self.d_tx = make_optimizer(optim.d_lr, optim.beta1, optim.beta2, optim.eps,
                               int(loss.r1_interval))
    self.pl_batch = max(self.batch // int(loss.pl_batch_shrink), 1)
    self._repl = sharding.replicated(mesh)
    self._data = sharding.data_sharded(mesh)
    # The phases of one iteration, in order: (name, function, every how many
    # iterations it runs (0: never), whether it takes the real batch, whether
    # it takes the EMA beta). Built once; `compiled` jits each on first use.
    self._init_augment_and_contrastive(config)
    self.phases: Tuple[Phase, ...] = (
        Phase("ada", self.ada_update, self.ada_every, False, False,
              first=self.ada_every),
        Phase("g_main", self.g_main, 1, False, False),
        Phase("g_reg", self.g_reg, self.pl_interval, False, False),
        Phase("d_main", self.d_main, 1, True, True),
        Phase("d_reg", self.d_reg, self.r1_interval, True, False),
    )
    self._compiled = {}
    self._executables = {}   # precompile's AOT executables
    self._lowered = {}       # precompile's lowerings (for their FLOPs)
    # precompile's seconds per phase: lowering (tracing + StableHLO) and
    # XLA compilation (in its thread, beside the others).
    self.compile_stats: Dict[str, Dict[str, float]] = {}

  # ------------------------------------------------------------ state

  def init_state(self, seed: int) -> TrainState:
    """A fresh, replicated state (same values on any mesh)."""
    return sharding.replicate(self._fresh_state(seed), self.mesh)

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes with its shardings
    (`jax.ShapeDtypeStruct`s), for lowering the phases without values, e.g.
    ahead-of-time for devices this host does not have (tools/plan_tpu.py)."""
    shapes = jax.eval_shape(self._fresh_state, 0)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._repl),
        shapes)

  def _fresh_state(self, seed: int) -> TrainState:
    rng = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(rng)
    g_vars, d_vars = networks.init(init_key, self.G, self.D)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_vars["params"], g_buffers=g_vars["buffers"],
        d_params=d_vars["params"],
        ema_params=jax.tree_util.tree_map(jnp.copy, g_vars["params"]),
        ema_buffers=jax.tree_util.tree_map(jnp.copy, g_vars["buffers"]),
        g_opt=self.g_tx.init(g_vars["params"]),
        d_opt=self.d_tx.init(d_vars["params"]),
        pl_mean=jnp.zeros((), jnp.float32),
        rng=state_key)
    return self._fresh_augment_and_contrastive(state, init_key)

  def state_sharding(self, state: TrainState):
    return jax.tree_util.tree_map(lambda _: self._repl, state)

  # ------------------------------------------------------------ pieces

  def _generate(self, g_params, g_buffers, batch: int, key: Array,
                synthesize: bool = True) -> Tuple[Array, Array, Any]:
    """Fakes with style mixing and w_avg tracking: (images, ws, buffers);
    images None without `synthesize` (the path-length phase, which
    synthesizes from the ws itself: not tracing an unused pass saves
    compile time, and the other draws are the same)."""
    G = self.G
    k_z, k_mix, k_cut, k_noise = jax.random.split(key, 4)
    z = jax.lax.with_sharding_constraint(
        jax.random.normal(k_z, (batch, G.z_dim)), self._data)
    ws, upd = G.apply({"params": g_params, "buffers": g_buffers}, z,
                      update_emas=True, method=G.map, mutable=["buffers"])
    buffers = upd["buffers"]
    prob = float(self.config.loss.style_mixing_prob)
    if prob > 0:
      z2 = jax.lax.with_sharding_constraint(
          jax.random.normal(k_mix, (batch, G.z_dim)), self._data)
      ws2 = G.apply({"params": g_params, "buffers": buffers}, z2, method=G.map)
      cutoff = mixing_cutoffs(k_cut, batch, self.mixing_slices(batch),
                              G.num_ws, prob)
      mix = jnp.arange(G.num_ws)[None, :, None] >= cutoff[:, None, None]
      ws = jnp.where(mix, ws2, ws)
    img = (self._synthesize(g_params, buffers, ws, k_noise) if synthesize
           else None)
    return img, ws, buffers

  def mixing_slices(self, batch: int) -> int:
    """Slices of a `batch` that draw their own style-mixing cutoff: one per
    per-device batch (`mbstd_shards`), fewer if `batch` does not split."""
    return math.gcd(int(batch), self.mbstd_shards)

  def _synthesize(self, g_params, buffers, ws, noise_key):
    return self.G.apply({"params": g_params, "buffers": buffers}, ws,
                        "random", method=self.G.synthesize,
                        rngs={"noise": noise_key})

  def _d(self, d_params, img, return_features=False):
    return self.D.apply({"params": d_params}, img,
                        return_features=return_features,
                        mbstd_shards=self.mbstd_shards)

  # ------------------------------------------------------------ phases

  def g_main(self, state: TrainState) -> Tuple[TrainState, Metrics]:
    rng, key = jax.random.split(state.rng)

    def loss_fn(g_params):
      img, _, buffers = self._generate(g_params, state.g_buffers, self.batch,
                                       key)
      img = self._seen(img, key, _FAKE, state.ada)
      logits = self._d(state.d_params, img)
      return losses.g_nonsaturating_loss(logits), (buffers, logits)

    (loss, (buffers, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.g_params)
    grads, bad, norm = sanitize_grads(grads)
    updates, g_opt = self.g_tx.update(grads, state.g_opt, state.g_params)
    state = state.replace(g_params=optax.apply_updates(state.g_params, updates),
                          g_buffers=buffers, g_opt=g_opt, rng=rng)
    return state, {"G/loss": loss, "G/grad_norm": norm,
                   "G/grad_nonfinite": bad,
                   "scores/fake": jnp.mean(logits.astype(jnp.float32))}

  def g_reg(self, state: TrainState) -> Tuple[TrainState, Metrics]:
    loss_cfg = self.config.loss
    rng, key, k_pl = jax.random.split(state.rng, 3)

    def loss_fn(g_params):
      _, ws, buffers = self._generate(g_params, state.g_buffers,
                                      self.pl_batch, key, synthesize=False)
      k_noise, k_dir = jax.random.split(k_pl)
      synth = lambda w: self._synthesize(g_params, buffers, w, k_noise)
      lengths, _ = losses.path_lengths(synth, ws, k_dir)
      penalty, new_mean = losses.path_length_penalty(lengths, state.pl_mean,
                                                     loss_cfg.pl_decay)
      loss = jnp.mean(penalty * loss_cfg.pl_weight) * loss_cfg.pl_interval
      return loss, (buffers, new_mean, lengths, penalty)

    (loss, (buffers, new_mean, lengths, penalty)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.g_params)
    grads, bad, norm = sanitize_grads(grads)
    updates, g_opt = self.g_tx.update(grads, state.g_opt, state.g_params)
    state = state.replace(g_params=optax.apply_updates(state.g_params, updates),
                          g_buffers=buffers, g_opt=g_opt,
                          pl_mean=jax.lax.stop_gradient(new_mean), rng=rng)
    return state, {"G/pl_penalty": jnp.mean(penalty),
                   "G/pl_length": jnp.mean(lengths), "G/pl_mean": new_mean,
                   "G/reg_grad_norm": norm,
                   "G/reg_grad_nonfinite": bad}

  def d_main(self, state: TrainState, real: Array, ema_beta: Array
             ) -> Tuple[TrainState, Metrics]:
    rng, key = jax.random.split(state.rng)
    real = image_lib.to_float(real)   # uint8 -> [-1, 1], on the device
    fake, _, g_buffers = self._generate(state.g_params, state.g_buffers,
                                        self.batch, key)
    fake = jax.lax.stop_gradient(fake)
    if self.contrastive:
      return self._contrad_d_main(state, real, fake, key, rng, g_buffers,
                                  ema_beta)
    fake = self._seen(fake, key, _FAKE, state.ada)
    real = self._seen(real, key, _REAL, state.ada)

    def loss_fn(d_params):
      fake_logits = self._d(d_params, fake)
      real_logits = self._d(d_params, real)
      return losses.d_logistic_loss(real_logits, fake_logits), (
          fake_logits, real_logits)

    (loss, (fake_logits, real_logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.d_params)
    grads, bad, norm = sanitize_grads(grads)
    updates, d_opt = self.d_tx.update(grads, state.d_opt, state.d_params)
    state = state.replace(
        d_params=optax.apply_updates(state.d_params, updates), d_opt=d_opt)
    state = _end_of_d_main(state, g_buffers, ema_beta, rng)
    state = self._count_real_signs(state, real_logits)
    return state, {"D/loss": loss, "D/grad_norm": norm,
                   "D/grad_nonfinite": bad,
                   "scores/real": jnp.mean(real_logits.astype(jnp.float32)),
                   "scores/fake_d": jnp.mean(fake_logits.astype(jnp.float32)),
                   **self._augment_metrics(state)}

  def d_reg(self, state: TrainState, real: Array) -> Tuple[TrainState, Metrics]:
    loss_cfg = self.config.loss
    real = image_lib.to_float(real)   # uint8 -> [-1, 1], on the device
    state, seen = self._reg_augmentation(state)

    def loss_fn(d_params):
      penalty, logits = losses.r1_penalty(
          lambda x: self._d(d_params, seen(x)), real)
      return (jnp.mean(penalty * (loss_cfg.r1_gamma / 2)) *
              loss_cfg.r1_interval, (penalty, logits))

    (loss, (penalty, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.d_params)
    grads, bad, norm = sanitize_grads(grads)
    updates, d_opt = self.d_tx.update(grads, state.d_opt, state.d_params)
    state = state.replace(d_params=optax.apply_updates(state.d_params, updates),
                          d_opt=d_opt)
    state = self._count_real_signs(state, logits)
    return state, {"D/r1_penalty": jnp.mean(penalty),
                   "D/reg_grad_norm": norm,
                   "D/reg_grad_nonfinite": bad}

  # ------------------------------------------------------------ augmentation
  # and the contrastive discriminator (see the module docstring).

  def _init_augment_and_contrastive(self, config) -> None:
    self.augment_mode = config.get("augment", "none")
    self.augment_config = (augment.pipeline(config.augment_pipe)
                           if self.augment_mode != "none" else None)
    # The `ada` phase: every ada_interval iterations with augmentation on.
    self.ada_every = (int(config.ada_interval)
                      if self.augment_config is not None else 0)
    self.contrastive = bool(config.get("contrastive", False))
    self.heads = (contrastive.ProjectionHeads(int(config.contrastive_proj_dim))
                  if self.contrastive else None)

  def representation_dim(self) -> int:
    """Width of D's representation (`fc`, the embedding)."""
    m = config_lib.full_model_config(self.config.model)
    return networks.channels_at(4, m["channel_base"], m["channel_max"])

  def _fresh_augment_and_contrastive(self, state: TrainState,
                                     init_key: Array) -> TrainState:
    """`state` with the ADA statistics and the projection heads (when on);
    no key of the other parts changes."""
    if self.augment_config is not None:
      zero = lambda: jnp.zeros((), jnp.float32)  # distinct (donated) buffers
      state = state.replace(ada={
          "p": jnp.asarray(self.config.augment_p, jnp.float32),
          "sign_sum": zero(), "count": zero(), "rt": zero()})
    if self.contrastive:
      h = jnp.zeros((1, self.representation_dim()), jnp.float32)
      heads = self.heads.init(jax.random.fold_in(init_key, _HEADS),
                              h)["params"]
      state = state.replace(heads=heads, heads_opt=self.d_tx.init(heads))
    return state

  def _ada(self, images: Array, key: Array, ada: Any) -> Array:
    """ADA's pipeline at probability ada['p'] (identity when off)."""
    if self.augment_config is None:
      return images
    return augment.augment(key, image_lib.to_float(images), ada["p"],
                           self.augment_config)

  def _seen(self, images: Array, key: Array, salt: int, ada: Any) -> Array:
    """What D sees of fakes (or reals, without ContraD) in a main phase: a
    ContraD view of the fakes, then ADA; draws from `key` folded with
    `salt` (the phase's other draws are untouched)."""
    key = jax.random.fold_in(key, salt)
    if self.contrastive and salt == _FAKE:
      images = contrastive.view(jax.random.fold_in(key, _VIEW), images)
    return self._ada(images, key, ada)

  def _reg_augmentation(self, state: TrainState
                        ) -> Tuple[TrainState, Callable[[Array], Array]]:
    """(state, fn): the R1 pass's ADA as a function of the reals; with ADA
    on, the state's RNG advances for its draws."""
    if self.augment_config is None:
      return state, lambda x: x
    rng, key = jax.random.split(state.rng)
    ada = state.ada
    return state.replace(rng=rng), lambda x: self._ada(x, key, ada)

  def _count_real_signs(self, state: TrainState, real_logits: Array
                        ) -> TrainState:
    """Adds sign(D(real)) of one D pass to the ADA statistics (global sums:
    the logits are the whole batch, whatever the mesh)."""
    if state.ada is None:
      return state
    logits = real_logits.astype(jnp.float32)
    ada = dict(state.ada)
    ada["sign_sum"] = ada["sign_sum"] + jnp.sum(jnp.sign(logits))
    ada["count"] = ada["count"] + jnp.float32(logits.size)
    return state.replace(ada=ada)

  @staticmethod
  def _augment_metrics(state: TrainState) -> Metrics:
    """`augment_p`: the probability this iteration used."""
    return {} if state.ada is None else {"augment_p": state.ada["p"]}

  def ada_update(self, state: TrainState) -> Tuple[TrainState, Metrics]:
    """The `ada` phase: r_t = mean sign(D(real)) since the last one; in
    'ada' mode p moves (`augment.adjust_p`, the reference's rule); the
    statistics restart."""
    ada, c = state.ada, self.config
    count = ada["count"]
    rt = jnp.where(count > 0, ada["sign_sum"] / jnp.maximum(count, 1.0),
                   ada["rt"])
    p = ada["p"]
    if self.augment_mode == "ada":
      p = augment.adjust_p(p, ada["sign_sum"], count, self.batch,
                           int(c.ada_interval), float(c.ada_kimg),
                           float(c.ada_target))
    zero = jnp.zeros((), jnp.float32)
    state = state.replace(ada={"p": p, "sign_sum": zero, "count": zero,
                               "rt": rt})
    return state, {"ada_rt": rt}

  def real_fake_head(self, d_params, features: Array) -> Array:
    """D's real/fake head (`b4/out`) on `fc` features: D's logit."""
    return layers.Dense(1).apply({"params": d_params["b4"]["out"]}, features)

  def _contrad_d_main(self, state: TrainState, real: Array, fake: Array,
                      key: Array, rng: Array, g_buffers, ema_beta: Array
                      ) -> Tuple[TrainState, Metrics]:
    """D main under ContraD: L_con^+ + lambda L_con^- on D's `fc`
    representation through the heads, plus the logistic loss of the
    real/fake head on the representation with its gradient stopped."""
    c = self.config
    k_real = jax.random.fold_in(key, _REAL)
    v1, v2 = contrastive.views(jax.random.fold_in(k_real, _VIEW),
                               image_lib.to_float(real))
    v1 = self._ada(v1, jax.random.fold_in(k_real, 1), state.ada)
    v2 = self._ada(v2, jax.random.fold_in(k_real, 2), state.ada)
    fake = self._seen(fake, key, _FAKE, state.ada)

    def loss_fn(params):
      d_params, heads = params
      rep = lambda x: self._d(d_params, x, return_features=True)[1]["fc"]
      h1, h2, hf = rep(v1), rep(v2), rep(fake)
      real_logits = self.real_fake_head(d_params, jax.lax.stop_gradient(h1))
      fake_logits = self.real_fake_head(d_params, jax.lax.stop_gradient(hf))
      z1, f1 = self.heads.apply({"params": heads}, h1)
      z2, f2 = self.heads.apply({"params": heads}, h2)
      _, ff = self.heads.apply({"params": heads}, hf)
      con = contrastive.contrad_loss(
          z1, z2, f1, f2, ff, float(c.contrastive_temperature),
          float(c.contrastive_fake_weight))
      dis = losses.d_logistic_loss(real_logits, fake_logits)
      return dis + con, (dis, con, real_logits, fake_logits)

    (_, (dis, con, real_logits, fake_logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)((state.d_params, state.heads))
    grads, bad, norm = sanitize_grads(grads)
    d_grads, h_grads = grads
    d_updates, d_opt = self.d_tx.update(d_grads, state.d_opt, state.d_params)
    h_updates, h_opt = self.d_tx.update(h_grads, state.heads_opt, state.heads)
    state = state.replace(
        d_params=optax.apply_updates(state.d_params, d_updates), d_opt=d_opt,
        heads=optax.apply_updates(state.heads, h_updates), heads_opt=h_opt)
    state = _end_of_d_main(state, g_buffers, ema_beta, rng)
    state = self._count_real_signs(state, real_logits)
    return state, {"D/loss": dis, "D/contrastive_loss": con,
                   "D/grad_norm": norm, "D/grad_nonfinite": bad,
                   "scores/real": jnp.mean(real_logits.astype(jnp.float32)),
                   "scores/fake_d": jnp.mean(fake_logits.astype(jnp.float32)),
                   **self._augment_metrics(state)}

  # ------------------------------------------------------------ compiled

  def _phase(self, name: str) -> "Phase":
    for phase in self.phases:
      if phase.name == name:
        return phase
    raise KeyError(f"no phase {name!r}; phases are "
                   f"{[p.name for p in self.phases]}")

  def compiled(self, name: str, state: TrainState):
    """The jitted phase `name` (compiled on first use, then cached)."""
    if name not in self._compiled:
      phase = self._phase(name)
      st = self.state_sharding(state)
      extra = (((self._data,) if phase.takes_real else ()) +
               ((self._repl,) if phase.takes_beta else ()))
      self._compiled[name] = jax.jit(
          phase.fn, in_shardings=(st,) + extra,
          out_shardings=(st, self._repl), donate_argnums=(0,),
          compiler_options=self.compiler_options or None)
    return self._compiled[name]

  def precompile(self, state: TrainState, real: Array) -> Dict[str, float]:
    """Compiles every scheduled phase now: each phase is handed to a thread
    pool (one thread per phase) as soon as it is lowered, so XLA (which
    compiles in C++ without the GIL) works on the first phases while Python
    traces the next ones; `train_step` then runs these executables. Returns
    the seconds from the start until each phase was ready; `compile_stats`
    keeps each phase's lowering and XLA seconds."""
    beta = jax.device_put(jnp.float32(0.5), self._repl)
    t0 = time.time()

    def compile_one(lowered):
      t = time.time()
      exe = lowered.compile()
      return exe, time.time() - t, time.time() - t0

    scheduled = [p for p in self.phases if p.every]
    pending = {}
    with futures.ThreadPoolExecutor(max(len(scheduled), 1)) as pool:
      for p in scheduled:
        t = time.time()
        lowered = self.compiled(p.name, state).lower(
            *self._args(p, state, real, beta))
        self._lowered[p.name] = lowered
        self.compile_stats[p.name] = {"lower_s": time.time() - t}
        pending[p.name] = pool.submit(compile_one, lowered)
      ready = {}
      for name, future in pending.items():
        exe, xla_s, ready[name] = future.result()
        self._executables[name] = exe
        self.compile_stats[name]["xla_s"] = xla_s
    return ready

  @property
  def precompiled(self) -> bool:
    return bool(self._executables)

  @staticmethod
  def _args(phase: "Phase", state, real, beta) -> tuple:
    return ((state,) + ((real,) if phase.takes_real else ()) +
            ((beta,) if phase.takes_beta else ()))

  def flops_per_iteration(self, state: TrainState, real: Array):
    """Amortized FLOPs of one iteration from XLA's cost analysis of each
    phase (regularizers weighted by 1/interval), or None where the backend
    does not report them. Compiles nothing; lowers only the phases that
    `precompile` did not (it keeps its lowerings, so no phase is traced
    twice)."""
    beta = jax.device_put(jnp.float32(0.5), self._repl)
    total = 0.0
    for phase in self.phases:
      if not phase.every:
        continue
      try:
        lowered = self._lowered.get(phase.name) or self.compiled(
            phase.name, state).lower(*self._args(phase, state, real, beta))
        flops = monitor.compiled_flops(lowered)
      except Exception:  # pylint: disable=broad-except
        flops = None
      if flops is None:
        return None
      total += flops / phase.every
    return total

  def phases_for_step(self, step: int) -> Tuple[str, ...]:
    """Which phases run at iteration `step` (regularizers at step 0, k*interval)."""
    return tuple(p.name for p in self.phases if p.runs_at(step))

  def train_step(self, state: TrainState, real: Array, step: int, nimg: float
                 ) -> Tuple[TrainState, Metrics]:
    """One full iteration (all scheduled phases). `real` is a global,
    data-sharded batch: uint8 (as `pipeline.train_batches` delivers it) or
    float in [-1, 1]."""
    e = self.config.ema
    beta = losses.ema_beta(self.batch, nimg, e.half_life_kimg, e.rampup)
    beta = jax.device_put(jnp.float32(beta), self._repl)
    metrics = {}
    for phase in self.phases:
      if phase.runs_at(step):
        fn = (self._executables.get(phase.name) or
              self.compiled(phase.name, state))
        state, m = fn(*self._args(phase, state, real, beta))
        metrics.update(m)
    return state, metrics
