"""Model checkpoints: Orbax, one directory per step.

Layout (shared by training and `gandl-import`):

  WORKDIR/checkpoints/<step>/model   {'G': {'params', 'buffers'},
                                      'G_ema': {'params', 'buffers'},
                                      'D': {'params'}}      (StandardSave)
  WORKDIR/checkpoints/<step>/meta    {'model': <model config dict>,
                                      'step': int, 'kimg': float,
                                      'source': str, ...}   (JsonSave)
  WORKDIR/checkpoints/<step>/train   optimizer states etc. (training only)

A step of another model family (meta['family'], `gandl_jax.families`; the
ConvAE baseline) holds that family's model item instead of G, G_ema, D,
checked by the family's `check_model`.

`restore_model` reads only `model` and `meta`, so it works on checkpoints
written by training and by the importer alike, on any device topology (arrays
come back on the first local device).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import numpy as np
from absl import logging
import orbax.checkpoint as ocp
from etils import epath

from gandl_jax import families
from gandl_jax import io as gio

PathLike = Union[str, os.PathLike, epath.Path]

MODEL_ITEM = "model"
META_ITEM = "meta"
TRAIN_ITEM = "train"
CHECKPOINTS_SUBDIR = "checkpoints"
MODEL_KEYS = ("G", "G_ema", "D")
_READ_OPTIONS = ocp.CheckpointManagerOptions(create=False)
# Training's representation probe (gandl_jax/train/probe.py) records its
# result in a step's meta as meta[PROBE_META] = {'score', 'control_bacc',
# 'cell_type_bacc' (the selection layer's), 'layer' (that layer), 'layers':
# {layer: {'score', ...}}, 'plates': [the probe's plates]}; the retention
# policy keeps the step with the best score of each layer (Orbax metrics
# BEST_METRIC and BEST_METRIC/<layer>), and `step="best"` /
# `gandl-export --step best [--layer L]` resolve to it (`best_selection`).
PROBE_META = "probe"
BEST_METRIC = "probe/score"
BEST = "best"
StepSpec = Union[None, int, str]


def _path(p: PathLike) -> epath.Path:
  """epath.Path; local paths made absolute (Orbax refuses relative ones)."""
  return epath.Path(gio.absolute(os.fspath(p)))


def checkpoint_dir(workdir: PathLike) -> epath.Path:
  """WORKDIR/checkpoints (local path or gs://...)."""
  return _path(workdir) / CHECKPOINTS_SUBDIR


def _check_model(model: Mapping[str, Any]) -> None:
  missing = [k for k in MODEL_KEYS if k not in model]
  if missing:
    raise ValueError(f"model must hold {list(MODEL_KEYS)}; missing {missing}")
  for k in ("G", "G_ema"):
    if set(model[k]) != {"params", "buffers"}:
      raise ValueError(f"model[{k!r}] must have exactly 'params' and "
                       f"'buffers', got {sorted(model[k])}")
  if "params" not in model["D"]:
    raise ValueError(f"model['D'] must have 'params', got {sorted(model['D'])}")


def jsonable(x: Any) -> Any:
  """Plain JSON types (ConfigDicts, numpy scalars and tuples converted)."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def save_model(directory: PathLike, step: int, model: Mapping[str, Any],
               meta: Mapping[str, Any]) -> epath.Path:
  """Writes `model` and `meta` as step `step` under `directory`.

  `directory` is the checkpoints directory (see `checkpoint_dir`). Orbax
  writes to a temporary directory and renames it when complete, so an
  interrupted save never looks like a checkpoint. Returns the step directory.
  """
  _check_model(model)
  meta = jsonable(dict(meta))
  if "model" not in meta:
    raise ValueError("meta must hold the model config under 'model'")
  meta.setdefault("step", int(step))
  directory = _path(directory)
  with ocp.CheckpointManager(
      directory, item_names=(MODEL_ITEM, META_ITEM)) as mngr:
    if step in mngr.all_steps():
      raise FileExistsError(f"{directory}: step {step} already exists")
    mngr.save(int(step), args=ocp.args.Composite(**{
        MODEL_ITEM: ocp.args.StandardSave(dict(model)),
        META_ITEM: ocp.args.JsonSave(meta)}))
    mngr.wait_until_finished()
  return directory / str(int(step))


def _resolve(path: PathLike) -> Tuple[epath.Path, Optional[int]]:
  """(checkpoints directory, step or None) for a workdir / checkpoints dir /
  step dir."""
  path = _path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if path.is_dir() and (path / CHECKPOINTS_SUBDIR).is_dir():
    return path / CHECKPOINTS_SUBDIR, None
  if path.name.isdigit() and (path / MODEL_ITEM).exists():
    return path.parent, int(path.name)
  return path, None


def _reader(directory: epath.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=_READ_OPTIONS,
      # `train` is registered (never restored here) so that Orbax does not
      # warn about an item it has no handler for.
      item_handlers={MODEL_ITEM: ocp.StandardCheckpointHandler(),
                     META_ITEM: ocp.JsonCheckpointHandler(),
                     TRAIN_ITEM: ocp.StandardCheckpointHandler()})


def _restore_step(mngr: ocp.CheckpointManager, step: int
                  ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  item_meta = mngr.item_metadata(step)[MODEL_ITEM]
  if item_meta is None:
    raise FileNotFoundError(f"step {step} has no '{MODEL_ITEM}' item")
  device = jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                     sharding=sharding),
      item_meta)
  restored = mngr.restore(step, args=ocp.args.Composite(**{
      MODEL_ITEM: ocp.args.StandardRestore(target),
      META_ITEM: ocp.args.JsonRestore()}))
  model, meta = restored[MODEL_ITEM], restored[META_ITEM]
  plugin = families.plugin(meta)
  (_check_model if plugin is None else plugin.check_model)(model)
  return model, dict(meta)


DEFAULT_PROBE_LAYER = "fc"


def probe_layer(meta: Mapping[str, Any]) -> str:
  """The layer a step's probe score was computed on (its selection layer;
  'fc' for a record without one)."""
  return str((meta.get(PROBE_META) or {}).get("layer") or DEFAULT_PROBE_LAYER)


def probe_layers(meta: Mapping[str, Any]) -> Tuple[str, ...]:
  """The layers with a probe record in a step's meta."""
  return tuple((meta.get(PROBE_META) or {}).get("layers") or ())


def probe_score(meta: Mapping[str, Any], layer: Optional[str] = None
                ) -> Optional[float]:
  """The probe score recorded in a step's meta for `layer` (None: the
  selection layer's), or None."""
  record = meta.get(PROBE_META) or {}
  if layer is None or (layer == probe_layer(meta)
                       and layer not in (record.get("layers") or {})):
    value = record.get("score")
  else:
    value = ((record.get("layers") or {}).get(layer) or {}).get("score")
  return None if value is None else float(value)


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
  return dict(mngr.restore(step, args=ocp.args.Composite(**{
      META_ITEM: ocp.args.JsonRestore()}))[META_ITEM])


def best_selection(path: PathLike, layer: Optional[str] = None
                   ) -> Dict[str, Any]:
  """The step with the highest recorded probe score of `layer` (None: each
  step's selection layer, config.probe_layer) under a workdir or checkpoints
  directory (the latest of equal scores, as the retention policy keeps it):
  {'step', 'layer', 'score', 'plates'} ('plates': the plates the probe drew
  its sites from, [] for a record without them). Raises FileNotFoundError
  when no step has a score for that layer."""
  directory, _ = _resolve(path)
  best: Optional[Tuple[float, int, Dict[str, Any]]] = None
  with _reader(directory) as mngr:
    steps = sorted(mngr.all_steps())
    for s in steps:
      try:
        meta = _read_meta(mngr, s)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("step %d in %s: meta unreadable (%s); skipped", s,
                        directory, e)
        continue
      score = probe_score(meta, layer)
      if score is not None and (best is None or score >= best[0]):
        best = (score, s, meta)
  if best is None:
    raise FileNotFoundError(
        f"no checkpoint in {directory} has a probe score"
        + (f" for layer {layer!r}" if layer else "") + f" (steps {steps}); "
        f"the representation probe records one every "
        f"config.probe_every_kimg (0 turns it off) for the layers of "
        f"config.probe_layers")
  score, step, meta = best
  selection = {"step": step, "layer": layer or probe_layer(meta),
               "score": score,
               "plates": list((meta.get(PROBE_META) or {}).get("plates")
                              or [])}
  logging.info("best probe score %.4f (layer %s) at step %d", score,
               selection["layer"], step)
  return selection


def best_step(path: PathLike, layer: Optional[str] = None) -> int:
  """The step of `best_selection`."""
  return best_selection(path, layer)["step"]


def resolve_step(path: PathLike, step: StepSpec) -> Optional[int]:
  """`step` as an int: None (latest) and ints pass through, 'best' (or
  its digits as a string) is resolved."""
  if step is None or isinstance(step, (int, np.integer)):
    return None if step is None else int(step)
  text = str(step).strip().lower()
  if text == BEST:
    return best_step(path)
  if text.isdigit():
    return int(text)
  raise ValueError(f"step must be a number or {BEST!r}, got {step!r}")


def list_steps(path: PathLike) -> Tuple[int, ...]:
  """Steps available under a workdir or checkpoints directory."""
  directory, step = _resolve(path)
  if step is not None:
    return (step,)
  with _reader(directory) as mngr:
    return tuple(sorted(mngr.all_steps()))


class UnreadableCheckpointError(ValueError):
  """The checkpoint asked for (the latest one by default) cannot be read."""


def restore_model(path: PathLike, step: StepSpec = None,
                  allow_fallback: bool = False
                  ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Restores (model variables, meta) from a workdir, its checkpoints/ dir or
  a step dir.

  The latest step is used unless `step` is given (or `path` is a step dir);
  `step="best"`: the step with the best training probe score (`best_step`).
  If the latest step cannot be read (e.g. a partially copied checkpoint),
  `UnreadableCheckpointError` names it, the error and the older steps, unless
  `allow_fallback`: then the newest readable older step is used, with a
  warning, and the returned meta holds `fallback` = {'latest_step': ...,
  'unreadable': [...]} so that callers can say which step they used and why.
  An explicit step never falls back.
  """
  directory, dir_step = _resolve(path)
  step = resolve_step(path, step)
  if step is not None and dir_step is not None and step != dir_step:
    raise ValueError(f"{path} is the directory of step {dir_step} but "
                     f"step={step} was requested")
  explicit = step if step is not None else dir_step
  with _reader(directory) as mngr:
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(
          f"no checkpoints found in {directory} (expected step directories "
          f"'<step>/{MODEL_ITEM}' written by gandl-train or "
          f"gandl-import)")
    if explicit is not None:
      if explicit not in steps:
        raise FileNotFoundError(f"step {explicit} not found in {directory}; "
                                f"available: {sorted(steps)}")
      return _restore_step(mngr, explicit)
    errors = []
    for s in steps:
      try:
        model, meta = _restore_step(mngr, s)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {s}: {type(e).__name__}: {e}")
        if not allow_fallback:
          older = steps[1:]
          raise UnreadableCheckpointError(
              f"the latest checkpoint in {directory}, step {s}, is "
              f"unreadable ({type(e).__name__}: {e}); "
              + (f"older steps: {older}; choose one explicitly (--step N) "
                 f"or allow falling back to the newest readable one "
                 f"(--allow_fallback)" if older else
                 "there is no older step")) from e
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                        "trying the previous one", s, directory,
                        type(e).__name__, e)
        continue
      if errors:
        meta["fallback"] = {"latest_step": steps[0], "unreadable": errors}
        logging.warning("using checkpoint step %d of %s, not the latest "
                        "(%d), which is unreadable", s, directory, steps[0])
      return model, meta
    raise UnreadableCheckpointError(
        f"no readable checkpoint in {directory}:\n  " + "\n  ".join(errors))
