"""Training monitoring: JSON-lines + TensorBoard metrics, the progress line,
non-finite guard, image grids, FLOPs and device memory.

Only process 0 writes files; every process may call these functions.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from gandl_jax import io as gio
from gandl_jax import progress as progress_lib


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm became NaN/inf."""

  def __init__(self, step: int, name: str, value: float):
    self.step, self.name, self.value = step, name, value
    super().__init__(
        f"non-finite {name} = {value} at step {step}; training stopped. The "
        f"last good checkpoint is kept. Try a lower learning rate, a larger "
        f"r1_gamma, num_bf16_res=0 (float32) or conv_clamp=256 (README: NaN).")


def first_non_finite(history: Sequence[Tuple[int, Mapping[str, Any]]]
                     ) -> Optional[Tuple[int, str, float]]:
  """(step, name, value) of the first non-finite scalar in a metrics history."""
  for step, metrics in history:
    for name in sorted(metrics):
      value = float(np.asarray(metrics[name]))
      if not math.isfinite(value):
        return step, name, value
  return None


def check_finite(history: Sequence[Tuple[int, Mapping[str, Any]]]) -> None:
  """Raises NonFiniteError naming the step and quantity, if any."""
  bad = first_non_finite(history)
  if bad is not None:
    raise NonFiniteError(*bad)


def perf_metrics(progress: progress_lib.Progress, nimg: int
                 ) -> Dict[str, float]:
  """Throughput since the previous call and the ETA, as metrics."""
  progress.set(nimg)
  img_s = progress.interval_rate()
  return {"perf/img_per_sec": img_s,
          "perf/sec_per_kimg": 1000.0 / img_s if img_s > 0 else float("nan"),
          "perf/eta_sec": progress.eta_s}


def progress_line(step: int, nimg: int, total_kimg: float,
                  metrics: Mapping[str, float]) -> str:
  """The training progress line: step, kimg, losses, speed, ETA."""
  pct = 100.0 * nimg / max(total_kimg * 1000.0, 1)
  parts = [f"step {step}", f"kimg {nimg / 1000:.3f}/{total_kimg:g} "
           f"({pct:.1f}%)"]
  for key, fmt in (("G/loss", "G {:.3f}"), ("D/loss", "D {:.3f}"),
                   ("D/r1_penalty", "R1 {:.3g}"), ("G/pl_mean", "PL {:.3g}"),
                   ("AE/l2", "L2 {:.4g}"), ("AE/psnr_db", "PSNR {:.2f} dB"),
                   ("AE/perceptual", "perceptual {:.4g}"),
                   ("augment_p", "aug p {:.3f}"), ("ada_rt", "r_t {:.2f}"),
                   ("probe/control_bacc", "probe Mock/Active {:.3f}"),
                   ("probe/cell_type_bacc", "probe HRCE/VERO {:.3f}"),
                   ("perf/sec_per_kimg", "{:.1f} s/kimg"),
                   ("perf/img_per_sec", "{:.1f} img/s")):
    if key in metrics and math.isfinite(metrics[key]):
      parts.append(fmt.format(metrics[key]))
  parts.append("ETA " + progress_lib.format_duration(
      metrics.get("perf/eta_sec", math.inf)))
  return " | ".join(parts)


class MetricWriter:
  """Appends JSON lines to WORKDIR/metrics.jsonl and TensorBoard scalars to
  WORKDIR/tb/ (process 0 only). Values are plain floats; non-finite ones are
  written as null in JSON (and skipped in TensorBoard). `labels`: string
  fields of the run added to every JSON line (e.g. the weights of the
  ConvAE's perceptual term), not to TensorBoard."""

  def __init__(self, workdir: str, enabled: Optional[bool] = None,
               labels: Optional[Mapping[str, str]] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self.labels = {k: str(v) for k, v in (labels or {}).items()}
    self._tb = None
    if self.enabled:
      tf = gio.tensorflow()
      self._tf = tf
      tf.io.gfile.makedirs(workdir)
      self._tb = tf.summary.create_file_writer(gio.join(workdir, "tb"))
      self._path = gio.join(workdir, "metrics.jsonl")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else None)
                   for k, v in sorted(values.items())})
    record.update(self.labels)
    gio.append_line(self._path, json.dumps(record))
    with self._tb.as_default(step=int(step)):
      for k, v in values.items():
        if math.isfinite(v):
          self._tf.summary.scalar(k, v)
    self._tb.flush()

  def write_image(self, step: int, name: str, rgb_uint8: np.ndarray) -> None:
    """Writes WORKDIR/samples/<name>-<step>.png and a TensorBoard image."""
    if not self.enabled:
      return
    tf = self._tf
    out_dir = gio.join(self.workdir, "samples")
    tf.io.gfile.makedirs(out_dir)
    png = tf.io.encode_png(rgb_uint8).numpy()
    gio.write_bytes(gio.join(out_dir, f"{name}-{int(step):08d}.png"), png)
    with self._tb.as_default(step=int(step)):
      tf.summary.image(name, rgb_uint8[None], max_outputs=1)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def compiled_flops(compiled: Any) -> Optional[float]:
  """FLOPs of one call of a compiled (jax.stages.Compiled) function, from XLA's
  cost analysis, or None where the backend does not report it."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  flops = float(analysis["flops"])
  return flops if flops > 0 else None


def device_memory() -> Dict[str, float]:
  """Bytes in use and peak on the first local device (empty on CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  out = {}
  if "bytes_in_use" in stats:
    out["mem/bytes_in_use_gib"] = stats["bytes_in_use"] / 2**30
  if "peak_bytes_in_use" in stats:
    out["mem/peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  return out


def average(history: List[Tuple[int, Mapping[str, Any]]]) -> Dict[str, float]:
  """Mean of each metric over the steps in which it was produced."""
  sums, counts = {}, {}
  for _, metrics in history:
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
      counts[k] = counts.get(k, 0) + 1
  return {k: sums[k] / counts[k] for k in sums}


def log_info(message: str) -> None:
  """A progress message (absl INFO), from process 0 only."""
  if jax.process_index() == 0:
    logging.info("%s", message)


def log_warning(message: str) -> None:
  """A warning (absl WARNING), from process 0 only."""
  if jax.process_index() == 0:
    logging.warning("%s", message)
