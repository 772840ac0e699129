"""Every training phase and the export function lower and compile for a TPU
v3-8 and a v5e-8 without a TPU (libtpu's deviceless topologies, as
tools/plan_tpu.py compiles them), and fit the chip's memory per core.

Needs libtpu (`pip install -e '.[tpu]'`); skipped without it. The
tiny model runs by default (1.5-2 minutes per topology on 2 cores); the paper config (256x256,
batch 64) takes 16-60 minutes per topology on a 2-core host and runs only
when asked:

  pytest -p no:xdist -q -m tpu_compile tests/tools/test_tpu_compile.py

With GANDL_TPU_COMPILE_OUT=DIR each paper-config plan is written there as
JSON (the figures of docs/benchmarks.md).
"""
import importlib.util
import json
import os

import pytest

from tiny import REPO, load_tool, tiny_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): "
    "the TPU topologies cannot be described without it")

TARGETS = ("tpu_v3", "tpu_v5e")
HBM_GIB = {"tpu_v3": 16.0, "tpu_v5e": 16.0}    # per core / per chip


@pytest.fixture(scope="module")
def plan_tpu():
  # Compile-only: libtpu loads even where another process holds its lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return load_tool("plan_tpu")


def _check(plan_tpu, p, target):
  trainer_phases = {"g_main", "g_reg", "d_main", "d_reg"}
  assert set(p["phases"]) == trainer_phases, "a phase did not compile"
  assert p["hbm_gib"] == HBM_GIB[target]
  for name, r in list(p["phases"].items()) + [("export", p["export"])]:
    total = r["memory"]["total"]
    assert 0 < total, name
    assert r["fits"] is True, (
        f"{name} needs {total / plan_tpu.GIB:.2f} GiB per core on "
        f"{p['target']}, more than its {HBM_GIB[target]} GiB")
    assert r["flops"] > 0, name
  # D main runs G and D forward and backward; the export only D forward.
  assert p["export"]["flops_per_image"] < p["phases"]["d_main"][
      "flops_per_image"]


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_model_compiles_for_tpu(plan_tpu, target):
  p = plan_tpu.plan(tiny_config(batch_size=16), target, 8, "none", 0.2,
                    export_batch=16)
  assert p["devices"] == 8 and p["target"] == plan_tpu.TARGETS[target][
      "name"]
  _check(plan_tpu, p, target)


def _paper_config():
  spec = importlib.util.spec_from_file_location(
      "gandl_rxrx19a", os.path.join(REPO, "configs", "gandl_rxrx19a.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("256")


@pytest.mark.tpu_compile
@pytest.mark.parametrize("target", TARGETS)
def test_paper_config_compiles_and_fits(plan_tpu, target):
  config = _paper_config()
  assert config.batch_size == 64 and config.model.resolution == 256
  p = plan_tpu.plan(config, target, 8, config.get("remat", "none"), 0.2,
                    export_batch=64)
  out = os.environ.get("GANDL_TPU_COMPILE_OUT")
  if out:
    import jax  # pylint: disable=import-outside-toplevel
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{target}.json"), "w",
              encoding="utf-8") as f:
      json.dump({"jax": jax.__version__,
                 "libtpu": plan_tpu._libtpu_version(),  # pylint: disable=protected-access
                 "plans": [p]}, f)
  _check(plan_tpu, p, target)
