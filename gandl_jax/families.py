"""Model families: the one interface through which a model other than the GAN
plugs into the core (config, checkpoints, training, loading, export).

A config names its family in `config.family` and a checkpoint in
`meta['family']`; absent means GAN, the built-in family, which the core
implements directly. Every other family is a `Family` record registered here
(the ConvAE baseline: gandl_jax/baselines/convae/), and the core reaches it
only through `get(name)`:

  base_config()                    every config key with its default
  validate(config, devices, hosts) the value errors of a config (strings)
  shape_keys                       config keys that fix parameter shapes
  check_model(model)               checks a checkpoint's `model` item
  train_parts(config, mesh, channels)  (trainer, grid writer) for
                                   `gandl_jax.train.loop.train`
  load(variables, meta, compute_dtype=..., batch_size=...)  the inference
                                   model (`gandl_jax.load`)
  embedding(model, layer, batch, num_hosts)  the `inference.export.Embedding`
                                   the one export path writes (gandl-export)

The trainer offers what the loop calls on the GAN's `train.steps.Trainer`
(`init_state`, `precompile`, `precompiled`, `train_step`,
`flops_per_iteration`; optionally `metric_labels` for metrics.jsonl and
`checkpoint_meta` for the meta); its state has `model_variables()`,
`train_items()` and `from_items()` (train/checkpointer.py).

Registration: a family named N is the package `gandl_jax.baselines.N`, which
registers itself when imported. The core never imports the baselines
(imports run one way, tests/test_import_direction.py): a name that is not registered
yet makes `get` import that package by name (importlib) and look again, so
`gandl_jax.load(workdir)` on a ConvAE checkpoint and `gandl-train` on a
ConvAE config work without importing the baselines first, and nothing
imports a family that no config or checkpoint names.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, List, Sequence, Tuple

GAN = "gan"
# Family N is the package PLUGIN_PACKAGE.N (imported by `get` on first use).
PLUGIN_PACKAGE = "gandl_jax.baselines"


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family other than the GAN (see the module docstring)."""
  name: str
  base_config: Callable[[], Any]
  validate: Callable[[Any, int, int], List[str]]
  shape_keys: Sequence[str]
  check_model: Callable[[Any], None]
  train_parts: Callable[[Any, Any, Any], Tuple[Any, Any]]
  load: Callable[..., Any]
  embedding: Callable[[Any, Any, int, int], Any]


_REGISTRY: Dict[str, Family] = {}


def register(family: Family) -> Family:
  """Adds `family` (a second registration under the same name replaces the
  first, so reloading a module is harmless)."""
  if family.name == GAN:
    raise ValueError(f"{GAN!r} is the built-in family")
  _REGISTRY[family.name] = family
  return family


def name(config_or_meta: Any) -> str:
  """The family of a config or checkpoint meta (ConfigDict or dict)."""
  return str(config_or_meta.get("family") or GAN)


def get(family_name: str) -> Family:
  """The registered family `family_name` (not GAN: the core handles it)."""
  if family_name not in _REGISTRY and family_name.isidentifier():
    module = f"{PLUGIN_PACKAGE}.{family_name}"
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:    # the package exists but lacks a dependency
        raise
  if family_name not in _REGISTRY:
    raise ValueError(f"unknown model family {family_name!r} (config.family "
                     f"or the checkpoint's meta['family']); known: "
                     f"{[GAN] + sorted(_REGISTRY)}")
  return _REGISTRY[family_name]


def plugin(config_or_meta: Any):
  """The `Family` of a config or meta, or None for the built-in GAN."""
  family_name = name(config_or_meta)
  return None if family_name == GAN else get(family_name)
