"""Feature embeddings for every site of a set of shards (gandl-features).

  from gandl_jax.baselines import run
  run.compute_embeddings("classical", "shards/rxrx19a-64", "classical.parquet")

Sites come from `pipeline.eval_host_batches`: every (filtered) site exactly
once, in shard order, no augmentation; padding rows are dropped by `valid`.
The features of each batch are computed in worker processes (`workers`;
order kept, at most 2 batches per worker in flight) and streamed to the
embeddings writer (`gandl_jax.embeddings.Writer`): `site_id`, the metadata
columns, `f0000...`, and Parquet file metadata `gandl.layer` = the method
name, `gandl.feature_names` (JSON list), the source shards and filter; CSV
is Recursion's layout (`site_id` + features), as gandl-export writes it.
The output does not depend on `workers` or `batch`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Any, Dict, Optional

import numpy as np
from absl import logging

from gandl_jax import embeddings
from gandl_jax import io as gio
from gandl_jax import progress as progress_lib
from gandl_jax.baselines import method as get_method

DEFAULT_BATCH = 64
META_FEATURE_NAMES = "gandl.feature_names"
META_METHOD = "gandl.method"


@dataclasses.dataclass
class Summary:
  output: str
  method: str
  num_sites: int
  feature_dim: int
  workers: int
  seconds: float

  def as_dict(self) -> Dict[str, Any]:
    rate = self.num_sites / self.seconds if self.seconds > 0 else 0.0
    return dict(dataclasses.asdict(self), sites_per_s=round(rate, 2))


def default_workers() -> int:
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else (os.cpu_count() or 1))


def compute_embeddings(method_name: str, data: str, output: str, *,
                       filter: Optional[str] = None,  # pylint: disable=redefined-builtin
                       batch: int = DEFAULT_BATCH, fmt: Optional[str] = None,
                       workers: Optional[int] = None,
                       progress_every_s: float = 30.0,
                       overwrite: bool = False) -> Summary:
  """Writes `method_name`'s features of every site of `data` to `output`.

  An existing `output` is refused unless `overwrite`."""
  from gandl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if not overwrite and gio.exists(output):
    raise FileExistsError(f"{output} already exists; pass --overwrite "
                          f"(overwrite=True) to replace it")
  meth = get_method(method_name)
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  info = pipeline.read_dataset_info(data)
  channels = int(info["num_channels"])
  names = meth.names(channels) if meth.names else None
  total = len(pipeline.host_sites(data, filter or None, 0, 1))
  if total == 0:
    raise ValueError(f"{data}: no sites to embed"
                     + (f" (filter {filter!r})" if filter else ""))
  workers = default_workers() if workers is None else max(1, int(workers))
  if not meth.parallel or total <= batch:
    workers = 1
  batches, _ = pipeline.eval_host_batches(data, host_batch=batch,
                                          filter=filter or None)
  file_metadata = {
      embeddings.META_KEY_LAYER: method_name, META_METHOD: method_name,
      "gandl.source_shards": data, "gandl.dataset": info.get("dataset") or "",
      "gandl.filter": filter or "", "gandl.num_sites": total,
      "gandl.resolution": info.get("resolution", ""),
  }
  if names is not None:
    file_metadata[META_FEATURE_NAMES] = json.dumps(names)
    file_metadata["gandl.feature_dim"] = len(names)
  progress = progress_lib.Progress(total, name=f"features[{method_name}]",
                                   every_s=progress_every_s)
  start = time.monotonic()
  csv = embeddings.output_format(output, fmt) == "csv"
  pool = None
  if workers > 1:
    # spawn: safe although TensorFlow (tf.data) runs in this process.
    pool = multiprocessing.get_context("spawn").Pool(workers)
  try:
    with embeddings.Writer(output, fmt, file_metadata,
                           dataset=info.get("dataset")) as writer:
      pending = collections.deque()

      def drain(limit: int) -> None:
        while len(pending) > limit:
          meta, result = pending.popleft()
          x = result.get() if pool is not None else result
          if names is not None and x.shape[1] != len(names):
            raise ValueError(f"method {method_name!r} returned {x.shape[1]} "
                             f"features for {len(names)} names")
          writer.write(meta, x)
          progress.update(len(x))

      for b in batches:
        valid = np.asarray(b["valid"], bool)
        if not valid.any():
          continue
        # CSV: Recursion's layout (site_id + features), as gandl-export.
        meta = {k: np.asarray(v)[valid] for k, v in b.items()
                if k not in pipeline.NON_METADATA_KEYS and
                (k == "site_id" or not csv)}
        images = np.ascontiguousarray(b["image"][valid])
        if pool is not None:
          pending.append((meta, pool.apply_async(meth.features, (images,))))
        else:
          pending.append((meta, np.asarray(meth.features(images), np.float32)))
        drain(2 * workers if pool is not None else 0)
      drain(0)
      dim, rows = writer.dim, writer.rows
      if rows != total:   # raised inside the block: nothing is published
        raise ValueError(f"{data}: embedded {rows} sites, sites.csv lists "
                         f"{total}")
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  progress.update(0, force=True)
  seconds = time.monotonic() - start
  logging.info("features[%s]: %d sites x %d features -> %s (%.1f s)",
               method_name, rows, dim, output, seconds)
  return Summary(output=str(output), method=method_name, num_sites=rows,
                 feature_dim=dim, workers=workers, seconds=seconds)
