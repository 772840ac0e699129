"""GAN-DL training: `train_and_evaluate(config, workdir)`.

Reads TFRecord shards with tf.data (split per host), runs the jitted
StyleGAN2 phases of `gandl_jax.trainer` on a mesh of all devices, and keeps
WORKDIR up to date:

  WORKDIR/checkpoints/<step>/   Orbax: G, G_ema, D, optimizers, pl_mean, RNG,
                                step, images seen, data position
  WORKDIR/metrics.jsonl         one JSON object per log interval
  WORKDIR/tb/                   TensorBoard scalars and sample grids
  WORKDIR/samples/*.png         G_ema samples as RGB composites
  WORKDIR/config.json           the config of the (latest) run

Running the same command again resumes from the latest checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from gandl_jax import api, composite, defaults, monitor, parallel
from gandl_jax.data import pipeline
from gandl_jax.resume import TrainCheckpointer
from gandl_jax.trainer import Trainer


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
  images = api.to_uint8(jax.device_get(
      sample(state.ema_params, state.ema_buffers, z)))
  writer.write_image(step, "fakes", composite.grid(composite.to_rgb(images),
                                                   cols=cols))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Optional[Mesh] = None,
                       max_steps: Optional[int] = None) -> Dict[str, Any]:
  """Trains until `config.total_kimg` (or `max_steps` more iterations).

  Returns a summary dict (final step, kimg, last metrics, stop reason).
  """
  parallel.maybe_initialize_distributed()
  mesh = mesh or parallel.make_mesh()
  defaults.validate(config, mesh.devices.size, jax.process_count())
  if not config.data.path:
    raise ValueError("config.data.path is empty: pass --config.data.path "
                     "'DIR/*.tfrecord' (shards written by gandl-convert)")
  info = pipeline.read_dataset_info(config.data.path)
  defaults.check_dataset(config, info, config.data.path)

  trainer = Trainer(config, mesh)
  batch = trainer.batch
  total_steps = _steps(config.total_kimg, batch)
  ckpt_every = _steps(config.checkpoint_every_kimg, batch)
  log_every = _steps(config.log_every_kimg, batch)
  grid_every = _steps(config.image_grid_every_kimg, batch)
  keep_period = _steps(config.keep_checkpoint_every_kimg, batch)
  keep_period = int(math.ceil(keep_period / ckpt_every)) * ckpt_every

  ckpt = TrainCheckpointer(workdir, keep=config.keep_checkpoints,
                           keep_period=keep_period)
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
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())

  data = pipeline.train_batches(
      config.data, global_batch=batch, mesh=mesh, seed=config.seed,
      resolution=config.model.resolution, channels=config.model.img_channels,
      start_batch=data_position)
  ckpt.install_sigterm_handler()
  progress = monitor.Progress(config.total_kimg, nimg)
  sample = _sample_fn(trainer)
  grid_n = int(config.image_grid_size)
  grid_z = parallel.replicate(jnp.asarray(api.seeds_to_z(
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
      save = step % ckpt_every == 0 or step == end_step or stop
      if flops_per_iter is None and step == 1:
        flops_per_iter = trainer.flops_per_iteration(state, real) or 0.0
      if step % log_every == 0 or save:
        host = jax.device_get(history)
        monitor.check_finite(host)   # before anything is saved
        last = monitor.average(host)
        last.update(progress.update(nimg))
        last.update(monitor.device_memory())
        last["progress/kimg"] = nimg / 1000.0
        if flops_per_iter:
          it_s = last["perf/img_per_sec"] / batch
          last["perf/tflops_per_device"] = (
              flops_per_iter * it_s / mesh.devices.size / 1e12)
        writer.write(step, last)
        monitor.log_info(progress.line(step, nimg, last))
        history = []
      if step % grid_every == 0 or step == end_step:
        _write_grid(writer, trainer, sample, state, grid_z, step, grid_n)
      if save:
        ckpt.save(step, state, meta(), force=True)
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


def _write_json(path: str, obj: Any) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
