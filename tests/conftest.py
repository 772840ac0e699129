"""Test-wide set-up: the platform, full float32 precision, TF off accelerators.

GANDL_TEST_PLATFORM picks where JAX runs the tests: `cpu` (the default, and
what CI runs: 8 simulated devices, so meshes of 1-8 devices build as on a pod
slice), `cuda` or `tpu` (the real devices: for the numerical tests of
tests/model/, which need one device). On every platform float32 matmuls and convolutions run at full
precision: GPUs default to TF32 and TPUs to bf16 passes, which alone would fail
comparisons at 1e-4..1e-5.
"""
import os
import sys
import tempfile

import pytest

PLATFORM = os.environ.get("GANDL_TEST_PLATFORM", "cpu").lower()
if PLATFORM not in ("cpu", "cuda", "gpu", "tpu"):
  raise SystemExit(f"GANDL_TEST_PLATFORM={PLATFORM!r}: expected cpu, cuda "
                   "or tpu")
# Must happen before jax is imported anywhere.
if PLATFORM == "cpu":
  os.environ.setdefault("XLA_FLAGS",
                        "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["JAX_PLATFORMS"] = "cuda" if PLATFORM == "gpu" else PLATFORM
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Helpers shared by test files (tiny.py) import from every test folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Identical programs compiled by several tests (and their subprocesses) are
# compiled once: XLA's persistent cache, shared by the whole test session.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"gandl-jax-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
  """tiny.make_shards' default set (64 sites at 8x8, 2 shards), made once
  per test process; read-only for the tests."""
  import tiny  # pylint: disable=import-outside-toplevel
  return tiny.make_shards(str(tmp_path_factory.mktemp("tiny_shards")))
