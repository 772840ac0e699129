"""Training checkpoints: periodic async Orbax saves, retention, preemption and
automatic resume.

Layout (see `gandl_jax.checkpoint`): WORKDIR/checkpoints/<step>/{model,train,meta}.
`model` holds G, G_ema and D (what `gandl_jax.load` reads), `train` holds the
optimizer states, `pl_mean`, the RNG and the step (and, when on, ADA's p and
statistics and ContraD's projection heads), `meta` (JSON) the model
config, images seen and the data position (another model family's state,
`gandl_jax.families`, says what its items hold: `model_variables()` and
`train_items()`). Orbax writes each step to a
temporary directory and renames it when complete, so a process killed mid-save
(even with `kill -9`) leaves the previous checkpoints intact.

Resume reads the newest step's `meta` first and lets the caller check it (the
config comparison of `gandl_jax.train.loop`) before any array is restored or
any file is touched. A step counts as unreadable only on clear corruption
(`is_corruption`: missing item files, undecodable JSON, truncated or missing
array chunks); it is then skipped for the previous one and moved to
WORKDIR/checkpoints_unreadable/. Any other error (a transient storage error,
out of memory, a shape mismatch) propagates and nothing is moved. A
checkpoint is never deleted: where a step cannot be moved aside (object
stores without directory renames) resume stops with a message instead.

SIGTERM: `install_sigterm_handler` sets a local flag (and returns the handler
it replaced, which `restore_sigterm_handler` puts back). On several hosts the
flag is all-reduced every `sync_every` steps (`should_stop`), so every host
stops at the same step even when only one of them got the signal: Python's
handler replaces the notifier `jax.distributed` installs in C++, which
therefore never fires, and cannot be chained to from Python.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gandl_jax import checkpoint
from gandl_jax.train.steps import TrainState


# TrainState fields saved in the `train` item when not None: the ADA
# probability and statistics, ContraD's projection heads and their Adam state.
_OPTIONAL_TRAIN = ("ada", "heads", "heads_opt")


def _split(state: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(model item, train item) of a training state: the GAN's `TrainState`,
  or another family's state with `model_variables()`, `train_items()` and
  `from_items()` (`gandl_jax.families`)."""
  if not isinstance(state, TrainState):
    return state.model_variables(), state.train_items()
  train = {"g_opt": state.g_opt, "d_opt": state.d_opt,
           "pl_mean": state.pl_mean, "rng": state.rng, "step": state.step}
  # Only with augmentation / ContraD on (config keys that cannot change on
  # resume), so checkpoints without them restore as before.
  for name in _OPTIONAL_TRAIN:
    if getattr(state, name) is not None:
      train[name] = getattr(state, name)
  return state.model_variables(), train


def _join(model: Dict[str, Any], train: Dict[str, Any], like: Any) -> Any:
  """The state of `like`'s type from restored items (inverse of `_split`)."""
  if not isinstance(like, TrainState):
    return type(like).from_items(model, train)
  return TrainState(
      step=train["step"], g_params=model["G"]["params"],
      g_buffers=model["G"]["buffers"], d_params=model["D"]["params"],
      ema_params=model["G_ema"]["params"],
      ema_buffers=model["G_ema"]["buffers"], g_opt=train["g_opt"],
      d_opt=train["d_opt"], pl_mean=train["pl_mean"], rng=train["rng"],
      **{name: train.get(name) for name in _OPTIONAL_TRAIN})


# Status codes in storage (tensorstore) errors that mean the files themselves
# are damaged or missing; anything else (UNAVAILABLE, DEADLINE_EXCEEDED,
# RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...) may pass and must not cost a
# checkpoint.
_CORRUPTION_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
# Files every complete step has (Orbax's layout): item -> required file.
_REQUIRED_FILES = {checkpoint.MODEL_ITEM: "_METADATA",
                   checkpoint.TRAIN_ITEM: "_METADATA",
                   checkpoint.META_ITEM: "metadata"}


def is_corruption(error: BaseException) -> bool:
  """Whether a restore error shows damaged or missing checkpoint files (as
  opposed to a transient or configuration error, which must propagate)."""
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError,
                        UnicodeDecodeError)):
    return True
  text = str(error)
  if isinstance(error, KeyError) and "was not found in the checkpoint" in text:
    return True
  return isinstance(error, ValueError) and any(
      text.startswith(code + ":") or f" {code}: " in text
      for code in _CORRUPTION_CODES)


class CorruptCheckpoint(Exception):
  """A step whose files are missing or damaged."""


def _move(src, dst) -> None:
  src.rename(dst)


def _abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def _best_metric(metrics: Any) -> float:
  value = (metrics or {}).get(checkpoint.BEST_METRIC)
  return float(value) if value is not None else -math.inf


class _BestPerLayer(ocp.checkpoint_managers.PreservationPolicy):
  """Keeps, for every per-layer probe score `checkpoint.BEST_METRIC/<layer>`
  among the steps' metrics, the step with the highest (the latest of
  equal), so `--step best --layer L` finds each layer's best."""

  def should_preserve(self, checkpoints, *, context=None):
    del context
    keep = [False] * len(checkpoints)
    best: Dict[str, Tuple[float, int]] = {}
    prefix = checkpoint.BEST_METRIC + "/"
    for i, info in enumerate(checkpoints):
      for key, value in (info.metrics or {}).items():
        if key.startswith(prefix) and value is not None and (
            key not in best or float(value) >= best[key][0]):
          best[key] = (float(value), i)
    for _, i in best.values():
      keep[i] = True
    return keep


def _keep_best_options(options: ocp.CheckpointManagerOptions
                       ) -> ocp.CheckpointManagerOptions:
  """`options`' retention (last N, every K steps) plus the step with the
  highest `checkpoint.BEST_METRIC` and that of each probed layer (Orbax
  records the metrics passed to `save` next to each step and reads them back
  on resume)."""
  pp = ocp.checkpoint_managers
  policies = [pp.LatestN(n=options.max_to_keep),
              pp.BestN(get_metric_fn=_best_metric, n=1,
                       keep_checkpoints_without_metrics=False),
              _BestPerLayer()]
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
    self._previous_handler = None
    self._installed = False

  # ---------------------------------------------------------- preemption

  def install_sigterm_handler(self) -> None:
    """SIGTERM (e.g. a spot VM being reclaimed, `kill`) -> save and stop at
    the end of the current step instead of dying mid-step. The replaced
    handler is kept for `restore_sigterm_handler`."""
    def handler(signum, frame):
      del signum, frame
      logging.warning("SIGTERM received: saving a checkpoint and stopping.")
      self._sigterm.set()
    try:
      self._previous_handler = signal.signal(signal.SIGTERM, handler)
      self._installed = True
    except ValueError:  # not the main thread (e.g. inside some test runners)
      logging.warning("could not install the SIGTERM handler")

  def restore_sigterm_handler(self) -> None:
    """Puts back the SIGTERM handler `install_sigterm_handler` replaced."""
    if self._installed:
      previous = self._previous_handler
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if previous is None else previous)
      self._installed = False

  def request_stop(self) -> None:
    """What SIGTERM does: stop (after saving) at the next agreed step."""
    self._sigterm.set()

  def should_stop(self, step: int, sync_every: int = 1) -> bool:
    """True once SIGTERM arrived on this host (one host), or on any host
    (several hosts: the flags are all-reduced at every step that is a
    multiple of `sync_every`, the same steps on every host, so all stop
    together)."""
    if jax.process_count() == 1:
      return self._sigterm.is_set()
    if step % max(int(sync_every), 1):
      return False
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(
        np.asarray(int(self._sigterm.is_set()), np.int32))
    return bool(np.max(flags))

  # ---------------------------------------------------------- save/restore

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: Dict[str, Any],
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
      for layer in checkpoint.probe_layers(meta):
        value = checkpoint.probe_score(meta, layer)
        if value is not None:
          metrics[f"{checkpoint.BEST_METRIC}/{layer}"] = value
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

  def _check_files(self, step: int) -> None:
    step_dir = self.directory / str(step)
    if (not (step_dir / checkpoint.TRAIN_ITEM).exists() and
        (step_dir / checkpoint.MODEL_ITEM / "_METADATA").exists()):
      # Written by checkpoint.save_model (gandl-import), not by training:
      # not corrupt, and never to be moved aside.
      raise ValueError(
          f"{step_dir}: a model-only checkpoint (as gandl-import writes), not "
          f"a training checkpoint: it holds no optimizer state to resume. "
          f"Use it with gandl-export / gandl-generate --checkpoint "
          f"{self.directory.parent}; train in a new, empty --workdir "
          f"(training from imported weights is not supported)")
    for item, name in _REQUIRED_FILES.items():
      if not (step_dir / item / name).exists():
        raise CorruptCheckpoint(f"{step_dir / item / name} is missing")

  def read_meta(self, step: int) -> Dict[str, Any]:
    """Step `step`'s metadata (JSON) alone; CorruptCheckpoint if its files
    are damaged."""
    self._check_files(step)
    try:
      r = self.manager.restore(step, args=ocp.args.Composite(**{
          checkpoint.META_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      if is_corruption(e):
        raise CorruptCheckpoint(f"{type(e).__name__}: {e}") from e
      raise
    return dict(r[checkpoint.META_ITEM])

  def restore_latest(self, like: Any,
                     check_meta: Optional[Callable[[Dict[str, Any]], None]]
                     = None) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """The newest readable checkpoint as (state, meta), placed like `like`
    (same shardings); None when the workdir has no checkpoint.

    `check_meta(meta)` runs on the chosen step's metadata before its arrays
    are read; whatever it raises propagates with nothing changed on disk.
    Steps found corrupt (see the module docstring) are skipped and, once a
    readable one is found, moved aside.
    """
    model, train = _split(like)
    target = ocp.args.Composite(**{
        checkpoint.MODEL_ITEM: ocp.args.StandardRestore(_abstract(model)),
        checkpoint.TRAIN_ITEM: ocp.args.StandardRestore(_abstract(train)),
        checkpoint.META_ITEM: ocp.args.JsonRestore()})
    unreadable = []
    result = None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
        if check_meta is not None:
          check_meta(meta)
        try:
          r = self.manager.restore(step, args=target)
        except Exception as e:  # pylint: disable=broad-except
          if is_corruption(e):
            raise CorruptCheckpoint(f"{type(e).__name__}: {e}") from e
          raise
      except CorruptCheckpoint as e:
        logging.warning("checkpoint step %d in %s is corrupt (%s); falling "
                        "back to the previous one", step, self.directory, e)
        unreadable.append(step)
        continue
      result = (_join(r[checkpoint.MODEL_ITEM], r[checkpoint.TRAIN_ITEM],
                      like),
                dict(r[checkpoint.META_ITEM]))
      break
    for step in unreadable:   # training will write these steps again
      self._set_aside(step)
    return result

  def _set_aside(self, step: int) -> None:
    """Moves a corrupt step to WORKDIR/checkpoints_unreadable/ (kept for
    inspection). Never deletes: where the move fails (e.g. object stores that
    cannot rename directories), raises a ValueError asking the user to move
    it, since training would otherwise write that step again over it."""
    src = self.directory / str(step)
    dst_dir = self.directory.parent / "checkpoints_unreadable"
    dst = dst_dir / f"{step}-{int(time.time())}"
    error = None
    if jax.process_index() == 0:
      try:
        dst_dir.mkdir(parents=True, exist_ok=True)
        _move(src, dst)
        logging.warning("moved corrupt checkpoint %s to %s", src, dst)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    if jax.process_count() > 1:   # every host learns whether the move worked
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      failed = multihost_utils.process_allgather(
          np.asarray(int(error is not None), np.int32))
      if np.max(failed) and error is None:
        error = RuntimeError("the move failed on process 0")
    if error is not None:
      raise ValueError(
          f"checkpoint {src} is corrupt and could not be moved aside to "
          f"{dst_dir} ({type(error).__name__}: {error}); nothing was deleted. "
          f"Move or copy it away by hand (e.g. `gcloud storage mv`), then "
          f"rerun to resume from the previous checkpoint") from error
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
