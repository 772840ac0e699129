"""Training checkpoints: periodic async Orbax saves, retention, preemption and
automatic resume.

Layout (see `gandl_jax.checkpoint`): WORKDIR/checkpoints/<step>/{model,train,meta}.
`model` holds G, G_ema and D (what `gandl_jax.load` reads), `train` holds the
optimizer states, `pl_mean`, the RNG and the step, `meta` (JSON) the model
config, images seen and the data position. Orbax writes each step to a
temporary directory and renames it when complete, so a process killed mid-save
(even with `kill -9`) leaves the previous checkpoints intact; an unreadable
latest checkpoint is skipped for the previous one with a warning.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from gandl_jax import checkpoint
from gandl_jax.train.steps import TrainState


def _split(state: TrainState) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  train = {"g_opt": state.g_opt, "d_opt": state.d_opt,
           "pl_mean": state.pl_mean, "rng": state.rng, "step": state.step}
  return state.model_variables(), train


def _join(model: Dict[str, Any], train: Dict[str, Any]) -> TrainState:
  return TrainState(
      step=train["step"], g_params=model["G"]["params"],
      g_buffers=model["G"]["buffers"], d_params=model["D"]["params"],
      ema_params=model["G_ema"]["params"],
      ema_buffers=model["G_ema"]["buffers"], g_opt=train["g_opt"],
      d_opt=train["d_opt"], pl_mean=train["pl_mean"], rng=train["rng"])


def _abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def _best_metric(metrics: Any) -> float:
  value = (metrics or {}).get(checkpoint.BEST_METRIC)
  return float(value) if value is not None else -math.inf


def _keep_best_options(options: ocp.CheckpointManagerOptions
                       ) -> ocp.CheckpointManagerOptions:
  """`options`' retention (last N, every K steps) plus the step with the
  highest `checkpoint.BEST_METRIC` (Orbax records the metrics passed to
  `save` next to each step and reads them back on resume)."""
  pp = ocp.checkpoint_managers
  policies = [pp.LatestN(n=options.max_to_keep),
              pp.BestN(get_metric_fn=_best_metric, n=1,
                       keep_checkpoints_without_metrics=False)]
  if options.keep_period:
    policies.append(pp.EveryNSteps(options.keep_period))
  return dataclasses.replace(
      options, max_to_keep=None, keep_period=None, best_fn=_best_metric,
      best_mode="max",
      preservation_policy=pp.AnyPreservationPolicy(policies))


class TrainCheckpointer:
  """Orbax `CheckpointManager` for training with a preemption-aware policy.

  Keeps the last `keep` checkpoints plus every step that is a multiple of
  `keep_period` steps. Saves are asynchronous: training continues while the
  previous checkpoint is written.
  """

  def __init__(self, workdir: str, keep: int = 3,
               keep_period: Optional[int] = None, async_save: bool = True,
               keep_best: bool = False):
    self.directory = checkpoint.checkpoint_dir(workdir)
    self.keep_best = bool(keep_best)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1),
        keep_period=int(keep_period) if keep_period else None,
        create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    if self.keep_best:
      options = _keep_best_options(options)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=(checkpoint.MODEL_ITEM, checkpoint.TRAIN_ITEM,
                    checkpoint.META_ITEM))
    self._sigterm = threading.Event()

  # ---------------------------------------------------------- preemption

  def install_sigterm_handler(self) -> None:
    """SIGTERM (e.g. a spot VM being reclaimed, `kill`) -> save and stop at
    the end of the current step instead of dying mid-step."""
    def handler(signum, frame):
      del signum, frame
      logging.warning("SIGTERM received: saving a checkpoint and stopping.")
      self._sigterm.set()
    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside some test runners)
      logging.warning("could not install the SIGTERM handler")

  def should_stop(self, step: int) -> bool:
    """True once SIGTERM arrived (single host) or at a preemption sync point
    all hosts agree on (multi-host TPU, via jax.distributed)."""
    if jax.process_count() > 1:
      try:
        return bool(self.manager.reached_preemption(step))
      except Exception:  # pylint: disable=broad-except
        return False
    return self._sigterm.is_set()

  # ---------------------------------------------------------- save/restore

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, meta: Dict[str, Any],
           force: bool = False) -> bool:
    """With `keep_best`, `meta[checkpoint.PROBE_META]['score']` (when
    present) is the step's score for retention."""
    model, train = _split(state)
    meta = checkpoint.jsonable(dict(meta))
    meta["step"] = int(step)
    metrics = None
    if self.keep_best:
      score = checkpoint.probe_score(meta)
      metrics = {} if score is None else {checkpoint.BEST_METRIC: score}
    saved = self.manager.save(int(step), force=force, metrics=metrics,
                              args=ocp.args.Composite(**{
        checkpoint.MODEL_ITEM: ocp.args.StandardSave(model),
        checkpoint.TRAIN_ITEM: ocp.args.StandardSave(train),
        checkpoint.META_ITEM: ocp.args.JsonSave(meta)}))
    return bool(saved)

  def best_score(self) -> float:
    """The highest probe score among the saved steps (-inf if none)."""
    if not self.keep_best:
      return -math.inf
    return max([_best_metric(self.manager.metrics(s))
                for s in self.manager.all_steps()], default=-math.inf)

  def restore_latest(self, like: TrainState
                     ) -> Optional[Tuple[TrainState, Dict[str, Any]]]:
    """The newest readable checkpoint as (state, meta), placed like `like`
    (same shardings); None when the workdir has no checkpoint."""
    model, train = _split(like)
    target = ocp.args.Composite(**{
        checkpoint.MODEL_ITEM: ocp.args.StandardRestore(_abstract(model)),
        checkpoint.TRAIN_ITEM: ocp.args.StandardRestore(_abstract(train)),
        checkpoint.META_ITEM: ocp.args.JsonRestore()})
    unreadable = []
    result = None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        r = self.manager.restore(step, args=target)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                        "falling back to the previous one", step,
                        self.directory, type(e).__name__, e)
        unreadable.append(step)
        continue
      result = (_join(r[checkpoint.MODEL_ITEM], r[checkpoint.TRAIN_ITEM]),
                dict(r[checkpoint.META_ITEM]))
      break
    for step in unreadable:   # training will write these steps again
      self._set_aside(step)
    return result

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step to WORKDIR/checkpoints_unreadable/ (kept for
    inspection); where directories cannot be renamed (GCS), deletes it."""
    src = self.directory / str(step)
    dst_dir = self.directory.parent / "checkpoints_unreadable"
    try:
      dst_dir.mkdir(parents=True, exist_ok=True)
      dst = dst_dir / f"{step}-{int(time.time())}"
      src.rename(dst)
      logging.warning("moved unreadable checkpoint %s to %s", src, dst)
    except Exception:  # pylint: disable=broad-except
      self.manager.delete(step)
      logging.warning("deleted unreadable checkpoint %s", src)
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
