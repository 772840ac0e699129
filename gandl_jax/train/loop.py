"""GAN-DL training: `train(config, workdir)`.

The same loop trains another model family when `config.family` names one
(`gandl_jax.families`; the ConvAE baseline, configs/convae_rxrx19a.py): the
family's trainer and grid (`train_parts`) instead of the GAN's phases and
samples, no probe (it reads D's features), and the family recorded in the
checkpoint meta.

Reads TFRecord shards with tf.data (split per host), runs the jitted
StyleGAN2 phases of `gandl_jax.train.steps` on a mesh of all devices, and keeps
WORKDIR up to date:

  WORKDIR/checkpoints/<step>/   Orbax: G, G_ema, D, optimizers, pl_mean, RNG,
                                step, images seen, data position
  WORKDIR/metrics.jsonl         one JSON object per log interval
  WORKDIR/tb/                   TensorBoard scalars and sample grids
  WORKDIR/samples/*.png         G_ema samples as RGB composites
  WORKDIR/config.json           the config of the (latest) run
  WORKDIR/probe_sites.csv       the representation probe's sites (probe.py)

Running the same command again resumes from the latest checkpoint. Before
anything is restored or written, the config is compared with the one the
checkpoint was saved with: a difference stops with the diff unless the
changed keys are allowed (`allow_config_change`, gandl-train's
`--allow_config_change`); keys that change parameter shapes never can. An
allowed change of `batch_size` keeps the images seen (`nimg`) and moves the
data position to the same image, so the run still stops at the first
iteration with nimg >= total_kimg * 1000, as in stylegan2-ada-pytorch.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from gandl_jax import config as config_lib
from gandl_jax import families
from gandl_jax.data import pipeline
from gandl_jax import images as image_lib
from gandl_jax import io as gio
from gandl_jax import progress as progress_lib
from gandl_jax import sharding
from gandl_jax.train.checkpointer import TrainCheckpointer
from gandl_jax.train import monitor
from gandl_jax.train import probe as probe_lib
from gandl_jax.train.steps import Trainer


# JAX's persistent compilation cache (gandl-train --compilation_cache_dir):
# a second run of the same configuration on the same machine loads the
# compiled phases instead of compiling them again.
DEFAULT_COMPILATION_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "gandl_jax", "jax")


def use_compilation_cache(cache_dir: Optional[str]) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `cache_dir` and returns
  the directory in use; '' or None leaves it off (returns None). A directory
  already set (JAX_COMPILATION_CACHE_DIR, jax.config) is kept."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not cache_dir:
    return None
  cache_dir = os.path.expanduser(cache_dir)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  return cache_dir


# On several hosts, the SIGTERM flags are all-reduced every this many
# iterations (a tiny blocking all-gather; every host checks the same steps).
STOP_SYNC_EVERY = 4


def _steps(kimg: float, batch: int) -> int:
  """Iterations between events every `kimg` thousand images (at least 1)."""
  return max(1, int(round(kimg * 1000.0 / batch)))


def steps_to_reach(images: float, batch: int) -> int:
  """Iterations of `batch` images until at least `images` more are shown:
  the reference's stop rule, the first iteration with nimg >= total (ceil;
  a float error below 1e-6 images is not an extra iteration)."""
  if images <= 0:
    return 0
  return int(math.ceil(images / batch - 1e-6 / batch))


def _resume_position(meta: Dict[str, Any], batch: int) -> Dict[str, int]:
  """step, nimg and data position (in batches of `batch`) of a checkpoint.

  With an (allowed) batch size change the data position is remapped to the
  same image of this host's stream; where it falls inside a batch it is
  rounded up, skipping fewer than `batch` images."""
  step = int(meta["step"])
  stored = (meta.get("config") or {}).get("batch_size", batch)
  old_batch = int(stored)
  nimg = int(meta.get("nimg", step * old_batch))
  position = int(meta.get("data_position", step))
  if old_batch != batch:
    images = position * old_batch
    position = -(-images // batch)
    if images % batch:
      monitor.log_info(f"batch size {old_batch} -> {batch}: the data stream "
                       f"resumes at image {position * batch} instead of "
                       f"{images} (whole batches)")
  return {"step": step, "nimg": nimg, "data_position": position}


def _check_resume(config, allow: Sequence[str], directory):
  """check_meta for `TrainCheckpointer.restore_latest`: refuses a config
  that differs from the checkpoint's unless the changes are allowed."""
  def check(meta: Dict[str, Any]) -> None:
    where = f"checkpoint {directory}/{meta.get('step')}"
    stored = meta.get("config")
    if stored is None:    # older checkpoints: only the model config
      stored, new = {"model": meta.get("model", {})}, {"model": config.model}
    else:
      new = config
    for key, old, cur in config_lib.check_resume(stored, new, allow, where):
      monitor.log_info(f"config change on resume (allowed): {key}: "
                       f"{old!r} -> {cur!r}")
  return check


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _state_is_finite(state) -> bool:
  """One jitted program (cached per state structure, not rebuilt per call)."""
  leaves = [x for x in jax.tree_util.tree_leaves(state)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jax.device_get(_all_finite(leaves)))


def _check_finite(history, state) -> None:
  """Stops on non-finite parameters or optimizer state; a non-finite loss
  whose gradients were sanitized (steps.sanitize_grads) left the state
  finite, as in the reference, and only warns."""
  bad = monitor.first_non_finite(history)
  if bad is None:
    return
  if not _state_is_finite(state):
    raise monitor.NonFiniteError(*bad)
  monitor.log_warning(f"non-finite {bad[1]} = {bad[2]} at step {bad[0]}; its "
                      f"gradients were sanitized and the parameters are "
                      f"finite: training goes on")


def _sample_fn(trainer: Trainer):
  G = trainer.G

  @jax.jit
  def sample(params, buffers, z):
    return G.apply({"params": params, "buffers": buffers}, z,
                   noise_mode="const")
  return sample


def _write_grid(writer, trainer, sample, state, z, step, cols, channels):
  images = image_lib.to_uint8(jax.device_get(
      sample(state.ema_params, state.ema_buffers, z)))
  writer.write_image(step, "fakes", image_lib.grid(
      image_lib.preview_rgb(images, channels), cols=cols))


def _gan_grid(config, trainer: Trainer, mesh: Mesh, channels):
  """grid(writer, state, step): G_ema samples of fixed latents ('fakes')."""
  sample = _sample_fn(trainer)
  grid_n = int(config.image_grid_size)
  grid_z = sharding.replicate(jnp.asarray(image_lib.seeds_to_z(
      range(grid_n * grid_n), trainer.G.z_dim)), mesh)
  return lambda writer, state, step: _write_grid(
      writer, trainer, sample, state, grid_z, step, grid_n, channels)


class _NoProbe:
  """The representation probe reads D's features; other families have
  none."""
  enabled = False
  best = -math.inf

  def new_best(self, metrics) -> bool:
    del metrics
    return False


def _parts(config, workdir: str, mesh: Mesh, every_kimg_steps, info):
  """(trainer, probe tracker, grid writer) of the config's model family;
  grids coloured by the shards' channels (`info`: dataset_info.json)."""
  channels = image_lib.dataset_channels(info.get("channels") or [])
  plugin = families.plugin(config)
  if plugin is not None:
    trainer, grid = plugin.train_parts(config, mesh, channels)
    return trainer, _NoProbe(), grid
  trainer = Trainer(config, mesh)
  tracker = probe_lib.Tracker(config, workdir, mesh, trainer.D,
                              every_kimg_steps(config.probe_every_kimg))
  return trainer, tracker, _gan_grid(config, trainer, mesh, channels)


def train(config: ml_collections.ConfigDict, workdir: str,
          mesh: Optional[Mesh] = None,
          max_steps: Optional[int] = None,
          allow_config_change: Sequence[str] = (),
          compilation_cache_dir: Optional[str] = None) -> Dict[str, Any]:
  """Trains until `config.total_kimg` (or `max_steps` more iterations).

  `allow_config_change`: config keys (or sections, e.g. 'optim') allowed to
  differ from the resumed checkpoint's config (see the module docstring).
  `compilation_cache_dir`: JAX's persistent compilation cache (None: off;
  gandl-train defaults to `DEFAULT_COMPILATION_CACHE_DIR`).
  Returns a summary dict (final step, kimg, last metrics, stop reason:
  'finished' or 'preempted').
  """
  sharding.maybe_initialize_distributed()
  cache = use_compilation_cache(compilation_cache_dir)
  if cache:
    monitor.log_info(f"JAX compilation cache: {cache}")
  mesh = mesh or sharding.make_mesh()
  config_lib.validate(config, mesh.devices.size, jax.process_count())
  if not config.data.path:
    raise ValueError("config.data.path is empty: pass --config.data.path "
                     "'DIR/*.tfrecord' (shards written by gandl-convert) or a "
                     "TFDS dataset directory (tfds build, docs/data.md)")
  info = pipeline.read_dataset_info(config.data.path)
  pipeline.check_dataset(info, config.data.path, config.model.resolution,
                         config.model.img_channels,
                         against="config.model")

  batch = int(config.batch_size)
  trainer, tracker, write_grid = _parts(config, workdir, mesh,
                                        lambda kimg: _steps(kimg, batch), info)
  total_img = float(config.total_kimg) * 1000.0
  ckpt_every = _steps(config.checkpoint_every_kimg, batch)
  log_every = _steps(config.log_every_kimg, batch)
  grid_every = _steps(config.image_grid_every_kimg, batch)
  keep_period = _steps(config.keep_checkpoint_every_kimg, batch)
  keep_period = int(math.ceil(keep_period / ckpt_every)) * ckpt_every

  ckpt = TrainCheckpointer(workdir, keep=config.keep_checkpoints,
                           keep_period=keep_period,
                           keep_best=tracker.enabled)
  state = trainer.init_state(config.seed)
  step, nimg, data_position = 0, 0, 0
  try:
    restored = ckpt.restore_latest(
        state, check_meta=_check_resume(config, allow_config_change,
                                        ckpt.directory))
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state, meta = restored
    pos = _resume_position(meta, batch)
    step, nimg, data_position = (pos["step"], pos["nimg"],
                                 pos["data_position"])
    monitor.log_info(f"Resumed from {ckpt.directory}/{step} "
                     f"(kimg {nimg / 1000:.3f}).")
  else:
    monitor.log_info(f"Starting a new run in {workdir}.")
  # A family's trainer may label every metrics line and add to the meta.
  writer = monitor.MetricWriter(
      workdir, labels=getattr(trainer, "metric_labels", None))
  trainer_meta = dict(getattr(trainer, "checkpoint_meta", None) or {})
  tracker.best = ckpt.best_score()
  if jax.process_index() == 0:
    gio.write_json(gio.join(workdir, "config.json"), config.to_dict())

  data = pipeline.train_batches(
      config.data, global_batch=batch, mesh=mesh, seed=config.seed,
      resolution=config.model.resolution, channels=config.model.img_channels,
      start_batch=data_position)
  progress = progress_lib.Progress(config.total_kimg * 1000.0, done=nimg,
                                   unit="img")
  family = families.name(config)

  def meta() -> Dict[str, Any]:
    out = {"model": config.model.to_dict(), "step": step, "nimg": nimg,
           "kimg": nimg / 1000.0, "data_position": data_position,
           "source": "gandl-train",
           "dataset": {k: info.get(k) for k in ("dataset", "resolution",
                                                "channels", "num_channels")},
           "config": config.to_dict()}
    # The precision key of the family's config (the GAN's num_bf16_res).
    out.update({k: config[k] for k in ("num_bf16_res", "compute_dtype")
                if k in config})
    if family != families.GAN:
      out["family"] = family
    out.update(trainer_meta)
    return out

  total_steps = step + steps_to_reach(total_img - nimg, batch)
  end_step = total_steps if max_steps is None else min(total_steps,
                                                       step + max_steps)
  history, last, reason = [], {}, "finished"
  flops_per_iter = None
  ckpt.install_sigterm_handler()   # put back in `finally`
  monitor.log_info(
      f"{mesh.devices.size} device(s) on {jax.process_count()} host(s), "
      f"batch {batch}, {total_steps} iterations ({config.total_kimg} kimg); "
      f"checkpoint every {ckpt_every}, log every {log_every}.")
  try:
    while step < end_step:
      real = next(data)["image"]
      if not trainer.precompiled:
        ready = trainer.precompile(state, real)
        monitor.log_info("compiled the training phases in "
                         f"{max(ready.values()):.1f} s (" + ", ".join(
                             f"{k} {v:.1f} s" for k, v in ready.items()) + ")")
        progress.restart()   # the ETA leaves compilation and start-up out
      state, metrics = trainer.train_step(state, real, step, nimg)
      history.append((step, metrics))
      step, nimg, data_position = step + 1, nimg + batch, data_position + 1
      stop = ckpt.should_stop(step, STOP_SYNC_EVERY)
      probed = ({} if stop or not tracker.enabled else
                tracker.maybe_run(state.d_params, step))
      save = (step % ckpt_every == 0 or step == end_step or stop
              or tracker.new_best(probed))
      if flops_per_iter is None and step == 1:
        flops_per_iter = trainer.flops_per_iteration(state, real) or 0.0
      if step % log_every == 0 or save or probed:
        host = jax.device_get(history)
        _check_finite(host, state)   # before anything is saved
        last = monitor.average(host)
        last.update(monitor.perf_metrics(progress, nimg))
        last.update(monitor.device_memory())
        last["progress/kimg"] = nimg / 1000.0
        last.update(probed)
        if flops_per_iter:
          it_s = last["perf/img_per_sec"] / batch
          last["perf/tflops_per_device"] = (
              flops_per_iter * it_s / mesh.devices.size / 1e12)
        writer.write(step, last)
        monitor.log_info(monitor.progress_line(step, nimg, config.total_kimg,
                                               last))
        history = []
      if step % grid_every == 0 or step == end_step:
        write_grid(writer, state, step)
      if save:
        ckpt.save(step, state, dict(meta(), **probe_lib.checkpoint_record(
            probed, tracker)), force=True)
      if stop:
        reason = "preempted"
        monitor.log_info(f"Stopped at step {step} after a termination "
                         "signal; the checkpoint is saved. Re-run the same "
                         "command to resume.")
        break
  finally:
    ckpt.restore_sigterm_handler()
    ckpt.close()
    writer.close()
  return {"step": step, "kimg": nimg / 1000.0, "reason": reason,
          "metrics": last, "workdir": workdir}
