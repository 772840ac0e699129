"""GAN-DL training: `train(config, workdir)`.

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

Running the same command again resumes from the latest checkpoint.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from gandl_jax import config as config_lib
from gandl_jax.data import pipeline
from gandl_jax import images as image_lib
from gandl_jax import io as gio
from gandl_jax import progress as progress_lib
from gandl_jax import sharding
from gandl_jax.train.checkpointer import TrainCheckpointer
from gandl_jax.train import monitor
from gandl_jax.train import probe as probe_lib
from gandl_jax.train.steps import Trainer


def _steps(kimg: float, batch: int) -> int:
  """Iterations that show `kimg` thousand images (at least 1)."""
  return max(1, int(round(kimg * 1000.0 / batch)))


def _sample_fn(trainer: Trainer):
  G = trainer.G

  @jax.jit
  def sample(params, buffers, z):
    return G.apply({"params": params, "buffers": buffers}, z,
                   noise_mode="const")
  return sample


def _write_grid(writer, trainer, sample, state, z, step, cols):
  images = image_lib.to_uint8(jax.device_get(
      sample(state.ema_params, state.ema_buffers, z)))
  writer.write_image(step, "fakes", image_lib.grid(image_lib.to_rgb(images),
                                                   cols=cols))


def train(config: ml_collections.ConfigDict, workdir: str,
          mesh: Optional[Mesh] = None,
          max_steps: Optional[int] = None) -> Dict[str, Any]:
  """Trains until `config.total_kimg` (or `max_steps` more iterations).

  Returns a summary dict (final step, kimg, last metrics, stop reason).
  """
  sharding.maybe_initialize_distributed()
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

  trainer = Trainer(config, mesh)
  batch = trainer.batch
  total_steps = _steps(config.total_kimg, batch)
  ckpt_every = _steps(config.checkpoint_every_kimg, batch)
  log_every = _steps(config.log_every_kimg, batch)
  grid_every = _steps(config.image_grid_every_kimg, batch)
  keep_period = _steps(config.keep_checkpoint_every_kimg, batch)
  keep_period = int(math.ceil(keep_period / ckpt_every)) * ckpt_every

  tracker = probe_lib.Tracker(config, workdir, mesh, trainer.D,
                              _steps(config.probe_every_kimg, batch))
  ckpt = TrainCheckpointer(workdir, keep=config.keep_checkpoints,
                           keep_period=keep_period,
                           keep_best=tracker.enabled)
  writer = monitor.MetricWriter(workdir)
  state = trainer.init_state(config.seed)
  step, nimg, data_position = 0, 0, 0
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    step = int(meta["step"])
    nimg = int(meta.get("nimg", step * batch))
    data_position = int(meta.get("data_position", step))
    monitor.log_info(f"Resumed from {ckpt.directory}/{step} "
                     f"(kimg {nimg / 1000:.3f}).")
  else:
    monitor.log_info(f"Starting a new run in {workdir}.")
  tracker.best = ckpt.best_score()
  if jax.process_index() == 0:
    gio.write_json(gio.join(workdir, "config.json"), config.to_dict())

  data = pipeline.train_batches(
      config.data, global_batch=batch, mesh=mesh, seed=config.seed,
      resolution=config.model.resolution, channels=config.model.img_channels,
      start_batch=data_position)
  ckpt.install_sigterm_handler()
  progress = progress_lib.Progress(config.total_kimg * 1000.0, done=nimg,
                                   unit="img")
  sample = _sample_fn(trainer)
  grid_n = int(config.image_grid_size)
  grid_z = sharding.replicate(jnp.asarray(image_lib.seeds_to_z(
      range(grid_n * grid_n), trainer.G.z_dim)), mesh)

  def meta() -> Dict[str, Any]:
    return {"model": config.model.to_dict(), "step": step, "nimg": nimg,
            "kimg": nimg / 1000.0, "data_position": data_position,
            "source": "gandl-train", "compute_dtype": config.compute_dtype,
            "dataset": {k: info.get(k) for k in ("dataset", "resolution",
                                                 "channels", "num_channels")},
            "config": config.to_dict()}

  end_step = total_steps if max_steps is None else min(total_steps,
                                                       step + max_steps)
  history, last, reason = [], {}, "finished"
  flops_per_iter = None
  monitor.log_info(
      f"{mesh.devices.size} device(s) on {jax.process_count()} host(s), "
      f"batch {batch}, {total_steps} iterations ({config.total_kimg} kimg); "
      f"checkpoint every {ckpt_every}, log every {log_every}.")
  try:
    while step < end_step:
      real = next(data)["image"]
      state, metrics = trainer.train_step(state, real, step, nimg)
      history.append((step, metrics))
      step, nimg, data_position = step + 1, nimg + batch, data_position + 1
      stop = ckpt.should_stop(step)
      probed = {} if stop else tracker.maybe_run(state.d_params, step)
      save = (step % ckpt_every == 0 or step == end_step or stop
              or tracker.new_best(probed))
      if flops_per_iter is None and step == 1:
        flops_per_iter = trainer.flops_per_iteration(state, real) or 0.0
      if step % log_every == 0 or save or probed:
        host = jax.device_get(history)
        monitor.check_finite(host)   # before anything is saved
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
        _write_grid(writer, trainer, sample, state, grid_z, step, grid_n)
      if save:
        ckpt.save(step, state, dict(meta(), **probe_lib.checkpoint_record(
            probed)), force=True)
      if stop:
        reason = "preempted"
        monitor.log_info(f"Stopped at step {step} after a termination "
                         "signal; the checkpoint is saved. Re-run the same "
                         "command to resume.")
        break
  finally:
    ckpt.close()
    writer.close()
  return {"step": step, "kimg": nimg / 1000.0, "reason": reason,
          "metrics": last, "workdir": workdir}


def train_and_evaluate(*args, **kwargs) -> Dict[str, Any]:
  """Deprecated name of `train` (it evaluates nothing; use gandl-export and
  gandl-evaluate on the checkpoints)."""
  warnings.warn("train_and_evaluate is deprecated; use "
                "gandl_jax.train.loop.train", DeprecationWarning, stacklevel=2)
  return train(*args, **kwargs)
