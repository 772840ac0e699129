"""Test-wide set-up: 8 simulated CPU devices, TF kept off accelerators."""
import os
import tempfile

# Must happen before jax is imported anywhere: lets tests build meshes of 1, 2,
# 4 or 8 devices on a CPU-only machine, as on a TPU pod slice.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Identical programs compiled by several tests (and their subprocesses) are
# compiled once: XLA's persistent cache, shared by the whole test session.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"gandl-jax-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
