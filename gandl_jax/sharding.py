"""Device mesh, shardings, multi-host start-up, host-local -> global arrays.

GAN-DL is data-parallel: one `jax.sharding.Mesh` over every device with a
single `data` axis. Parameters and optimizer state are replicated; batches are
split along their leading dimension. The same code runs on a TPU pod slice (many
hosts), one GPU and a laptop CPU (one device, or several simulated with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when running on several hosts.

  On Cloud TPU VMs the coordinator and process ids come from the TPU metadata,
  so no arguments are needed. Elsewhere it is skipped unless the standard
  variables (`JAX_COORDINATOR_ADDRESS`, ...) are set. Safe to call twice.
  """
  if jax.distributed.is_initialized():
    return
  on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
  if on_tpu_pod or explicit:
    logging.info("Initializing jax.distributed (multi-host).")
    jax.distributed.initialize()


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (parameters, scalars)."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) dimension over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch(batch: int, num_devices: int = 1, num_hosts: int = 1,
                group: int = 1, group_slices: int = 1,
                name: str = "batch") -> None:
  """Raises a clear ValueError unless the global `batch` splits evenly over
  devices and hosts, and each of `group_slices` contiguous slices splits into
  minibatch-stddev groups of min(group, slice) (training forms groups inside
  each device's slice; export over the whole batch, `group_slices=1`)."""
  if batch < 1:
    raise ValueError(f"{name}={batch} must be >= 1")
  if batch % group_slices:
    g_eff = max(int(group), 1)
  else:
    g_eff = min(max(int(group), 1), batch // group_slices)
  step = math.lcm(int(num_devices), int(num_hosts),
                  int(group_slices) * g_eff)
  if batch % step:
    lo = max(step, batch // step * step)
    raise ValueError(
        f"{name}={batch} must be a multiple of {step} ({num_devices} "
        f"device(s), {num_hosts} host(s), minibatch-stddev groups of "
        f"{g_eff} in each of {group_slices} slice(s)); try {lo} or "
        f"{lo + step}")


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """A batch that is split over `mesh`'s devices and the hosts."""
  check_batch(global_batch, mesh.devices.size, jax.process_count())


def host_batch_size(global_batch: int) -> int:
  """How many examples each host feeds per step."""
  return global_batch // jax.process_count()


def host_to_global(tree: Any, mesh: Mesh) -> Any:
  """Turns this host's slice of a batch (numpy) into global sharded arrays.

  Every leaf must have a leading dimension of `global_batch // process_count`.
  On one host this is a plain `device_put` with the data sharding.
  """
  sharding = data_sharded(mesh)

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(one, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree fully replicated on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))
