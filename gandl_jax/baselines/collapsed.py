"""The paper's "ImageNet-collapsed" DenseNet-121: a per-task classifier.

A trainable 1x1 convolution maps a site's C channels to one (g = sum_c w_c x_c
+ b on intensities x in [0, 1]; initialised to the channel mean), the result
is replicated to pseudo-RGB and normalised as the ImageNet model expects
(`densenet.pseudo_rgb`), the frozen DenseNet-121 (inference-mode BN) and a
global average pool give 1024 features, and a linear head on the
standardized features gives class logits (mean and std per feature fitted on
the fitting rows at initialisation, then fixed: the SVM protocol's
StandardScaler, which conditions the head). The 1x1 convolution and the head are trained together, end to end
through the frozen backbone, on the task's *training part only*:

* rows, labels and the train/test split are the SVM protocol's own
  (`tasks.classification_rows`, `classify.split_rows`), so both methods are
  scored on the same test sites;
* a validation part (`val_fraction`, stratified, seeded) is carved from the
  training part; Adam (lr 1e-3) on class-weighted cross-entropy (weights
  n / (k n_c) of the fitting rows, as the SVM's class_weight='balanced');
  after every epoch the validation loss decides early stopping (`patience`
  epochs without improvement) and the best epoch's parameters are kept;
* the test part is predicted once, with those parameters.

Unlike every embedding set, this method sees labels; reports say so.

Images are cached once per run (uint8 at the shards' resolution: 327 KB per
RxRx19a site at 256x256) and every step runs the backbone forward and
backward; its cost is measured in docs/baselines.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from sklearn.model_selection import train_test_split

from gandl_jax.baselines import densenet

NAME = "densenet_collapsed"


@dataclasses.dataclass(frozen=True)
class CollapsedConfig:
  """Settings of the collapsed DenseNet; `data`: the shards holding the
  images of the evaluated RxRx19a sites (`rxrx1_data`: of the RxRx1 sites)."""
  data: str = ""
  rxrx1_data: str = ""
  weights: str = densenet.WEIGHTS_IMAGENET
  seed: int = 0                    # init of the head, shuffling, val split
  image_size: Optional[int] = None
  batch: int = 32
  max_epochs: int = 5
  patience: int = 1
  learning_rate: float = 1e-3
  val_fraction: float = 0.2
  compute_dtype: str = "float32"


# ---------------------------------------------------------------------------
# The model (pure functions).


def init_trainable(num_channels: int, num_classes: int, seed: int
                   ) -> Dict[str, Any]:
  """1x1 conv = channel mean, bias 0; head ~ N(0, 0.01), bias 0."""
  rng = np.random.default_rng(seed)
  return {
      "mix_w": np.full((num_channels,), 1.0 / num_channels, np.float32),
      "mix_b": np.zeros((), np.float32),
      "head_w": (0.01 * rng.standard_normal(
          (densenet.FEATURE_DIM, num_classes))).astype(np.float32),
      "head_b": np.zeros((num_classes,), np.float32),
  }


def collapse(trainable, images):
  """(N, R, R, C) uint8 -> (N, R, R) intensities: the 1x1 convolution."""
  x = images.astype(jnp.float32) / 255.0
  return x @ trainable["mix_w"] + trainable["mix_b"]


def features_fn(trainable, params, images, image_size=None,
                dtype=jnp.float32):
  """1x1 conv, pseudo-RGB, frozen DenseNet-121, GAP: (N, 1024)."""
  g = densenet.resize(collapse(trainable, images), image_size)
  return densenet.pooled(params, densenet.pseudo_rgb(g).astype(dtype))


def logits_fn(trainable, params, scaler, images, image_size=None,
              dtype=jnp.float32):
  """The linear head on standardized features: `scaler` (mean, 1 / std per
  feature) is fitted on the fitting rows at initialisation and then fixed,
  as the SVM protocol's StandardScaler (it only conditions the head)."""
  f = features_fn(trainable, params, images, image_size, dtype)
  f = (f - scaler["mean"]) * scaler["inv_std"]
  return f @ trainable["head_w"] + trainable["head_b"]


def fit_scaler(features: np.ndarray) -> Dict[str, np.ndarray]:
  mean = features.mean(axis=0)
  std = features.std(axis=0)
  inv = np.where(std > 1e-12, 1.0 / np.maximum(std, 1e-12), 1.0)
  return {"mean": mean.astype(np.float32), "inv_std": inv.astype(np.float32)}


def weighted_ce(logits, labels, weights):
  """sum_i w_i CE_i / sum_i w_i (padding rows carry weight 0)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def balanced_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-class weight n / (k * n_c) (scikit-learn's 'balanced')."""
  counts = np.bincount(y, minlength=num_classes).astype(np.float64)
  w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0)
  return w.astype(np.float32)


# ---------------------------------------------------------------------------
# Training.


class Runner:
  """Jitted train / eval steps, data-parallel over the local devices (one
  per evaluation run: jitted once, reused by every task and split)."""

  def __init__(self, backbone: densenet.Backbone, cfg: CollapsedConfig):
    from gandl_jax import sharding  # pylint: disable=import-outside-toplevel
    self.mesh = sharding.make_mesh(jax.local_devices())
    n_dev = int(self.mesh.devices.size)
    self.batch = int(math.ceil(cfg.batch / n_dev) * n_dev)
    self.repl = sharding.replicated(self.mesh)
    self.data = sharding.data_sharded(self.mesh)
    self.params = jax.device_put(backbone.params, self.repl)
    self.tx = optax.adam(cfg.learning_rate)
    kw = dict(image_size=cfg.image_size,
              dtype=densenet._dtype(cfg.compute_dtype))  # pylint: disable=protected-access
    fwd = functools.partial(logits_fn, **kw)

    def loss(trainable, params, scaler, images, labels, weights):
      return weighted_ce(fwd(trainable, params, scaler, images), labels,
                         weights)

    def train_step(trainable, opt_state, params, scaler, images, labels,
                   weights):
      value, grads = jax.value_and_grad(loss)(trainable, params, scaler,
                                              images, labels, weights)
      updates, opt_state = self.tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, value

    r, d = self.repl, self.data
    self._train = jax.jit(train_step, in_shardings=(r, r, r, r, d, d, d),
                          out_shardings=(r, r, r), donate_argnums=(0, 1))
    self._logits = jax.jit(fwd, in_shardings=(r, r, r, d), out_shardings=d)
    self._features = jax.jit(functools.partial(features_fn, **kw),
                             in_shardings=(r, r, d), out_shardings=d)

  def batches(self, n: int, order: np.ndarray):
    for s in range(0, n, self.batch):
      idx = order[s:s + self.batch]
      yield idx, self.batch - len(idx)

  def _put(self, x: np.ndarray, pad: int):
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return jax.device_put(x, self.data)

  def train_epoch(self, trainable, opt_state, scaler, images, labels, weights,
                  rng):
    order = rng.permutation(len(labels))
    for idx, pad in self.batches(len(labels), order):
      trainable, opt_state, _ = self._train(
          trainable, opt_state, self.params, scaler,
          self._put(images[idx], pad), self._put(labels[idx], pad),
          self._put(weights[idx], pad))
    return trainable, opt_state

  def _map(self, fn, images) -> np.ndarray:
    out = []
    for idx, pad in self.batches(len(images), np.arange(len(images))):
      z = np.asarray(fn(self._put(images[idx], pad)))
      out.append(z[:len(idx)])
    return np.concatenate(out)

  def logits(self, trainable, scaler, images) -> np.ndarray:
    return self._map(lambda x: self._logits(trainable, self.params, scaler, x),
                     images)

  def features(self, trainable, images) -> np.ndarray:
    return self._map(lambda x: self._features(trainable, self.params, x),
                     images)


def _val_loss(logits: np.ndarray, labels: np.ndarray, w: np.ndarray) -> float:
  return float(weighted_ce(jnp.asarray(logits), jnp.asarray(labels),
                           jnp.asarray(w)))


def fit_predict(images: np.ndarray, y: np.ndarray, classes: Sequence[str],
                train: np.ndarray, test: np.ndarray,
                backbone: densenet.Backbone, cfg: CollapsedConfig,
                runner: Optional[Runner] = None
                ) -> Tuple[np.ndarray, np.ndarray, Dict]:
  """Trains on rows `train` of (images, y), predicts rows `test`.

  Returns (predicted labels, scores, training facts); scores are the
  classify.classification_metrics convention: for two classes the logit
  difference classes[1] - classes[0], else (n, k) logits. Only rows in
  `train` are read while fitting (the test rows are touched once, after).
  """
  classes = list(classes)
  k = len(classes)
  lab = np.searchsorted(classes, y).astype(np.int32)
  if not np.array_equal(np.asarray(classes)[lab], y):
    raise ValueError(f"labels outside {classes}")
  fit, val = train_test_split(train, test_size=cfg.val_fraction,
                              stratify=lab[train], random_state=cfg.seed)
  fit, val = np.sort(fit), np.sort(val)
  cw = balanced_weights(lab[fit], k)
  densenet.check_image_size(cfg.image_size, int(images.shape[1]))
  runner = runner or Runner(backbone, cfg)
  trainable = jax.device_put(init_trainable(images.shape[-1], k, cfg.seed),
                             runner.repl)
  opt_state = jax.device_put(runner.tx.init(trainable), runner.repl)
  rng = np.random.default_rng(cfg.seed)
  fit_images, fit_lab = images[fit], lab[fit]
  val_images, val_lab = images[val], lab[val]
  val_w = cw[val_lab]

  def host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)

  t0 = time.time()
  scaler = jax.device_put(
      fit_scaler(runner.features(trainable, fit_images)), runner.repl)
  best = host(trainable)
  losses = [_val_loss(runner.logits(trainable, scaler, val_images), val_lab,
                      val_w)]
  best_epoch = 0
  for epoch in range(1, cfg.max_epochs + 1):
    trainable, opt_state = runner.train_epoch(
        trainable, opt_state, scaler, fit_images, fit_lab, cw[fit_lab], rng)
    losses.append(_val_loss(runner.logits(trainable, scaler, val_images),
                            val_lab, val_w))
    logging.info("%s: epoch %d, validation loss %.4f (%.0f s)", NAME, epoch,
                 losses[-1], time.time() - t0)
    if losses[-1] < losses[best_epoch]:
      best, best_epoch = host(trainable), epoch
    elif epoch - best_epoch >= cfg.patience:
      break
  train_s = time.time() - t0
  z = runner.logits(jax.device_put(best, runner.repl), scaler, images[test])
  pred = np.asarray(classes)[np.argmax(z, axis=1)]
  scores = z[:, 1] - z[:, 0] if k == 2 else z
  facts = {
      "n_fit": int(len(fit)), "n_val": int(len(val)),
      "epochs_run": len(losses) - 1, "best_epoch": best_epoch,
      "val_loss_by_epoch": [round(v, 5) for v in losses],
      "train_seconds": round(train_s, 2),
      "training_site_passes": (len(losses) - 1) * len(fit),
      "forward_site_passes": len(fit) + len(losses) * len(val),
      "mix_weights": [round(float(v), 5) for v in best["mix_w"]],
      "mix_bias": round(float(best["mix_b"]), 5),
  }
  return pred, scores, facts


def run_task(images: np.ndarray, rows, cfg_protocol, cfg: CollapsedConfig,
             backbone: densenet.Backbone, task: str,
             splits: Sequence[str] = ("random", "plate"),
             runner: Optional[Runner] = None) -> Dict:
  """The collapsed DenseNet on one task (rows: a `tasks.TaskRows`, images
  aligned with its rows), on each split of the SVM protocol."""
  # pylint: disable=import-outside-toplevel
  from gandl_jax.evaluate import classify
  y = rows.y
  classes = sorted(rows.classes)
  out: Dict = {"n_rows": int(len(y)),
               "class_counts": {c: int((y == c).sum()) for c in rows.classes},
               "rows": rows.rows}
  densenet.check_image_size(cfg.image_size, int(images.shape[1]))
  runner = runner or Runner(backbone, cfg)
  for split in splits:
    try:
      tr, te = classify.split_rows(y, cfg_protocol, split, rows.groups, task)
    except classify.TaskError as e:
      out[split] = {"status": "failed", "reason": str(e)}
      continue
    pred, scores, facts = fit_predict(images, y, classes, tr, te, backbone,
                                      cfg, runner)
    m = classify.classification_metrics(y[te], pred, scores, classes,
                                        rows.positive)
    m.update({
        "split": split, "n_train": int(len(tr)), "n_test": int(len(te)),
        "train_class_counts": {c: int((y[tr] == c).sum()) for c in classes},
        "test_class_counts": {c: int((y[te] == c).sum()) for c in classes},
        "training": facts,
    })
    if split == "plate":
      m["n_test_plates"] = int(len(np.unique(rows.groups[te])))
      m["n_train_plates"] = int(len(np.unique(rows.groups[tr])))
    out[split] = {"status": "ok", **m}
  return out


# ---------------------------------------------------------------------------
# Images of the evaluated sites.


def load_images(data: str, site_ids: Sequence[str], batch: int = 256
                ) -> np.ndarray:
  """uint8 (len(site_ids), R, R, C) images of `site_ids`, in that order, read
  once from the shards (only the wanted records are kept). ValueError naming
  the shards when a site is not in them."""
  # pylint: disable=import-outside-toplevel
  from gandl_jax.data import pipeline
  site_ids = [str(s) for s in site_ids]
  wanted = sorted(set(site_ids))
  known = set(pipeline.read_sites_index(data)["site_id"].astype(str))
  missing = [s for s in wanted if s not in known]
  if missing:
    raise ValueError(f"{data}: {len(missing)} of the {len(wanted)} evaluated "
                     f"sites are not in these shards (e.g. {missing[:3]}); "
                     f"give the shards the embeddings were computed from")
  it, _ = pipeline.eval_host_batches(data, host_batch=batch,
                                     filter={"site_id": wanted})
  pos = {s: i for i, s in enumerate(wanted)}
  store: Optional[np.ndarray] = None
  seen = 0
  for b in it:
    valid = np.asarray(b["valid"], bool)
    if store is None:
      store = np.zeros((len(wanted),) + b["image"].shape[1:], np.uint8)
    for sid, img in zip(np.asarray(b["site_id"])[valid], b["image"][valid]):
      store[pos[str(sid)]] = img
      seen += 1
  if store is None or seen != len(wanted):
    raise ValueError(f"{data}: read {seen} of the {len(wanted)} wanted sites")
  return store[[pos[s] for s in site_ids]]


class ImageCache:
  """Images of sites by site_id, read from `data` once per set of ids."""

  def __init__(self, data: str):
    self.data = data
    self._ids: List[str] = []
    self._images: Optional[np.ndarray] = None
    self._pos: Dict[str, int] = {}

  def get(self, site_ids: Sequence[str]) -> np.ndarray:
    site_ids = [str(s) for s in site_ids]
    if not all(s in self._pos for s in site_ids):
      t = time.time()
      ids = sorted(set(site_ids) | set(self._ids))
      self._images = load_images(self.data, ids)
      self._ids, self._pos = ids, {s: i for i, s in enumerate(ids)}
      logging.info("%s: cached %d sites' images from %s (%.0f MB, %.0f s)",
                   NAME, len(ids), self.data, self._images.nbytes / 2**20,
                   time.time() - t)
    return self._images[[self._pos[s] for s in site_ids]]


# ---------------------------------------------------------------------------
# gandl-evaluate's per-task method (`evaluate.pipeline.Options.per_task`).

_ONLY_CLASSIFICATION = (
    "the collapsed DenseNet is a per-task classifier, not an embedding; the "
    "paper evaluates it on the classification tasks only")


class CollapsedMethod:
  """The collapsed DenseNet-121 as a gandl-evaluate per-task method: on the
  rows and splits of the first embeddings set, each classification task
  (control, cell_model; rxrx1 with `rxrx1_data`) trained on its training
  part; dose-response and truth skipped."""

  name = NAME

  def __init__(self, config: CollapsedConfig):
    self.config = config
    self.backbone: Optional[densenet.Backbone] = None

  def prepare(self, log) -> None:
    """Checks the shards and loads the weights (before any task runs, so a
    bad weights file or shard path fails fast)."""
    from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    cfg = self.config
    if not cfg.data:
      raise ValueError("the collapsed DenseNet needs the RxRx19a shards "
                       "(--collapsed_data)")
    for path in (cfg.data, cfg.rxrx1_data):
      if path:
        pipeline.read_dataset_info(path)
    t = time.time()
    self.backbone = densenet.load_backbone(cfg.weights, cfg.seed)
    log(f"{NAME}: DenseNet-121 weights {self.backbone.label} "
        f"({time.time() - t:.1f}s)")

  def evaluate(self, primary: Dict, wanted: Sequence[str], opts, log,
               run_task_fn) -> Dict:
    """`primary`: the first set's extras ('meta', 'rxrx1_meta': its rows);
    `run_task_fn(results, task, fn, log, timing)` records a task's result
    or failure as gandl-evaluate does for every set."""
    # pylint: disable=import-outside-toplevel
    from gandl_jax.evaluate import tasks as task_lib
    if self.backbone is None:
      self.prepare(log)
    cfg, backbone = self.config, self.backbone
    timing: Dict = {}
    T: Dict = {}
    t0 = time.time()
    meta = primary.get("meta")
    res = {"tasks": T, "timing_s": timing, "input": {
        "source": f"images of the evaluated sites from {cfg.data}",
        "rows": None if meta is None else int(len(meta)),
        "dim": densenet.FEATURE_DIM, "issues": [],
        "file_metadata": {"gandl.layer": "densenet121_collapsed",
                          densenet.META_WEIGHTS: backbone.weights}},
        "postprocessing": {"summary": (
            "none: a 1x1 conv (C -> 1, to pseudo-RGB) + frozen DenseNet-121 "
            "+ linear head, trained on each task's training part (sees "
            "labels)")},
        "weights": backbone.label,
        "config": dataclasses.asdict(cfg)}
    runner = Runner(backbone, cfg)
    caches = {task_lib.RXRX1: ImageCache(cfg.rxrx1_data)
              if cfg.rxrx1_data else None}
    caches[task_lib.CONTROL] = caches[task_lib.CELL_MODEL] = \
        ImageCache(cfg.data)
    for task in (task_lib.CONTROL, task_lib.CELL_MODEL, task_lib.RXRX1):
      if task not in wanted:
        continue
      task_meta = primary.get("rxrx1_meta") if task == task_lib.RXRX1 else meta
      if opts.aggregate != "site":
        T[task] = {"status": "skipped", "reason": "the collapsed DenseNet "
                   "classifies sites; it runs with --aggregate site only"}
      elif caches[task] is None or task_meta is None:
        T[task] = {"status": "skipped", "reason": (
            "needs RxRx1 shards (--collapsed_rxrx1_data) and RxRx1 "
            "embeddings (--rxrx1_embeddings, for the rows and split)"
            if task == task_lib.RXRX1 else "no embeddings rows")}
      else:
        def fn(task=task, task_meta=task_meta):
          rows = task_lib.classification_rows(task_meta, task, opts.protocol)
          ids = task_meta["site_id"].astype(str).to_numpy()[rows.mask]
          images = caches[task].get(ids)
          return run_task(images, rows, opts.protocol, cfg, backbone, task,
                          runner=runner)
        run_task_fn(T, task, fn, log, timing)
    for task in wanted:   # dose-response, truth, retrieval, ...
      if task not in T and task not in (task_lib.CONTROL, task_lib.CELL_MODEL,
                                         task_lib.RXRX1):
        T[task] = {"status": "skipped", "reason": _ONLY_CLASSIFICATION}
    timing["total"] = round(time.time() - t0, 2)
    return res

  def note(self, r: Dict) -> str:
    """The report's paragraph: what it is, that it sees labels, weights."""
    c = r.get("config", {})
    return (
        f"**{NAME}** is not an embedding set and, unlike the others, sees "
        f"labels: the paper's ImageNet-collapsed DenseNet-121, a trainable "
        f"1x1 convolution (5 channels -> 1, replicated to pseudo-RGB) in "
        f"front of the frozen DenseNet-121 (weights: {r.get('weights', '?')}) "
        f"with a linear head on standardized features, trained for each task "
        f"and split on the training part only (Adam, lr "
        f"{c.get('learning_rate')}, at most {c.get('max_epochs')} epochs, "
        f"early stopping with patience {c.get('patience')} on a validation "
        f"part of {c.get('val_fraction', 0):.0%} of the training part, "
        f"class-weighted cross-entropy), then scored on the same test sites "
        f"as the SVMs (rows and splits of "
        f"**{r.get('rows_from', 'the first set')}**).\n")
