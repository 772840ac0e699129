r"""Imports stylegan2-ada-pytorch networks into a gandl-jax checkpoint.

Inputs (pick one):
  --state_dicts FILE                  the SAFE path: an .npz with 'G.<name>' /
        'D.<name>' / 'G_ema.<name>' arrays (no code can run), or
        `torch.save({'G': G.state_dict(), 'D': D.state_dict(),
        'G_ema': G_ema.state_dict()}, FILE)` read with
        `torch.load(weights_only=True)`, which is only safe from torch 2.6
        (older releases could run code from a crafted file, CVE-2025-32434;
        they are refused). Architecture arguments that tensors cannot reveal
        come from flags (--mbstd_group_size, --mapping_lr_multiplier,
        --w_avg_beta, --conv_clamp). A missing G_ema is taken from G (with a
        warning).
  --pkl network-snapshot-NNNNNN.pkl --trust_pickle   a training pickle
        ({'G', 'D', 'G_ema', ...}). UNPICKLING RUNS ARBITRARY CODE FROM THE
        FILE: only for files you made or fully trust, hence the required
        --trust_pickle (`load_pickle(path, trust=True)`). Needs PyTorch and
        the user's checkout of https://github.com/NVlabs/stylegan2-ada-pytorch
        on PYTHONPATH (its `torch_utils` and `dnnlib` packages). To import a
        pickle of unknown origin, turn it into state dicts on a machine where
        running its code does no harm and use --state_dicts.

  pip install -e .[import]    # PyTorch >= 2.6, only needed by this tool
  gandl-import --state_dicts nets.npz --workdir /tmp/imported
  PYTHONPATH=/path/to/stylegan2-ada-pytorch gandl-import \
      --pkl network-snapshot-005000.pkl --trust_pickle --workdir /tmp/imported

Writes WORKDIR/checkpoints/<step>/{model,meta} (see gandl_jax/checkpoint.py),
loadable with `gandl_jax.load(WORKDIR)` and `gandl-generate`.

Resolution, image channels, z/w dims, mapping depth, channel_base and
channel_max are inferred from tensor shapes. Refused, with a message listing
the offending keys: conditional models (c_dim > 0), generators other than
the "skip" architecture, discriminators other than "resnet", and any tensor
that has no place in our networks. `resample_filter` buffers are skipped (the
[1,3,3,1] filter is a constant of our code).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from absl import logging

_PYTHONPATH_HELP = (
    "Unpickling stylegan2-ada-pytorch networks needs PyTorch "
    "(`pip install -e .[import]`) and the user's checkout of "
    "https://github.com/NVlabs/stylegan2-ada-pytorch on PYTHONPATH, e.g. "
    "`PYTHONPATH=/path/to/stylegan2-ada-pytorch python "
    "gandl-import ...`. Alternatively save plain state_dicts "
    "with torch.save and use --state_dicts.")

StateDict = Dict[str, np.ndarray]


class ImportErrorWithKeys(ValueError):
  """A network that cannot be mapped onto gandl-jax's networks."""


# ----------------------------------------------------------------------------
# Loading (torch is imported lazily, only here).


MIN_TORCH = (2, 6)   # torch.load(weights_only=True) is safe from 2.6 on


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("PyTorch is not installed") from None
  return torch


def torch_version(text: str) -> Tuple[int, int]:
  """'2.6.0+cpu' -> (2, 6)."""
  m = re.match(r"^(\d+)\.(\d+)", str(text))
  if not m:
    raise ValueError(f"cannot read the PyTorch version {text!r}")
  return int(m.group(1)), int(m.group(2))


def _safe_torch():
  """torch, if its weights_only loading is safe (>= 2.6)."""
  torch = _torch()
  have = torch_version(torch.__version__)
  if have < MIN_TORCH:
    raise ValueError(
        f"PyTorch {torch.__version__} is installed, but "
        f"torch.load(weights_only=True) is only safe from PyTorch "
        f"{MIN_TORCH[0]}.{MIN_TORCH[1]} (older releases can run code from a "
        f"crafted file, CVE-2025-32434): pip install -e .[import] (torch>="
        f"{MIN_TORCH[0]}.{MIN_TORCH[1]}), or save the tensors as .npz")
  return torch


PICKLE_WARNING = (
    "unpickling runs arbitrary code from the file (a network pickle can do "
    "anything your account can)")


def _to_numpy(sd: Mapping[str, Any]) -> StateDict:
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu().float().numpy()
    out[k] = np.asarray(v, dtype=np.float32)
  return out


def _module_hints(G: Any, D: Any) -> Dict[str, Any]:
  """Architecture arguments that only the pickled modules know."""
  hints = {}
  mapping = getattr(G, "mapping", None)
  fc0 = getattr(mapping, "fc0", None)
  if fc0 is not None and hasattr(fc0, "bias_gain"):
    hints["mapping_lr_multiplier"] = float(fc0.bias_gain)
  if mapping is not None and hasattr(mapping, "w_avg_beta"):
    beta = mapping.w_avg_beta
    hints["w_avg_beta"] = None if beta is None else float(beta)
  synthesis = getattr(G, "synthesis", None)
  b4 = getattr(synthesis, "b4", None)
  conv1 = getattr(b4, "conv1", None)
  if conv1 is not None and hasattr(conv1, "conv_clamp"):
    clamp = conv1.conv_clamp
    hints["conv_clamp"] = None if clamp is None else float(clamp)
  mbstd = getattr(getattr(D, "b4", None), "mbstd", None)
  if mbstd is not None:
    hints["mbstd_group_size"] = (None if mbstd.group_size is None
                                 else int(mbstd.group_size))
    hints["mbstd_num_channels"] = int(mbstd.num_channels)
  if getattr(G, "c_dim", 0) or getattr(D, "c_dim", 0):
    raise ImportErrorWithKeys(
        f"conditional networks are not supported (G.c_dim="
        f"{getattr(G, 'c_dim', 0)}, D.c_dim={getattr(D, 'c_dim', 0)}); "
        "GAN-DL trains without labels")
  return hints


def load_pickle(path: str, trust: bool = False
                ) -> Tuple[Dict[str, StateDict], Dict[str, Any]]:
  """({'G', 'D', 'G_ema'} numpy state dicts, architecture hints).

  Unpickling runs arbitrary code from the file, so it is refused unless
  `trust` (`--trust_pickle`): the caller vouches for the file. Files of
  unknown origin go through `load_state_dicts` (.npz, or torch.save'd state
  dicts with torch >= 2.6).
  """
  if not trust:
    raise ValueError(
        f"{path}: not unpickled: {PICKLE_WARNING}. If you made this file or "
        f"fully trust its source, pass --trust_pickle (load_pickle(path, "
        f"trust=True)); otherwise import state dicts with --state_dicts "
        f"(.npz, or torch.save'd state_dicts read with "
        f"torch.load(weights_only=True)); docs/models.md")
  logging.warning("%s: %s; unpickling it because --trust_pickle was given",
                  path, PICKLE_WARNING)
  try:
    _torch()
  except ValueError as e:
    raise ValueError(f"{path}: {e}. " + _PYTHONPATH_HELP) from None
  import pickle  # pylint: disable=import-outside-toplevel
  try:
    import torch_utils  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
    import dnnlib  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ValueError(f"cannot import the reference "
                     f"packages ({e}). " + _PYTHONPATH_HELP) from e
  with open(path, "rb") as f:
    try:
      data = pickle.load(f)
    except (ImportError, AttributeError, ModuleNotFoundError) as e:
      raise ValueError(f"cannot unpickle {path} ({e}). "
                       + _PYTHONPATH_HELP) from e
  if not isinstance(data, dict) or "G" not in data and "G_ema" not in data:
    raise ImportErrorWithKeys(
        f"{path}: expected a stylegan2-ada-pytorch network pickle holding "
        f"'G', 'D' and 'G_ema'; got {type(data).__name__}"
        + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
        + " (TensorFlow stylegan2 pickles must first be converted with the "
        "reference's legacy.py)")
  if "D" not in data:
    raise ImportErrorWithKeys(f"{path}: the pickle has no 'D' (keys "
                              f"{sorted(data)}); GAN-DL needs the "
                              "discriminator")
  sds = {k: _to_numpy(data[k].state_dict()) for k in ("G", "D", "G_ema")
         if k in data}
  if "G" not in sds:
    logging.warning("%s has no 'G': using G_ema's weights for G", path)
    sds["G"] = sds["G_ema"]
  hints = _module_hints(data.get("G_ema", data.get("G")), data["D"])
  return sds, hints


def load_state_dicts(path: str) -> Dict[str, StateDict]:
  """{'G', 'D', ['G_ema']} numpy state dicts from torch.save or .npz."""
  if path.endswith(".npz"):
    sds: Dict[str, StateDict] = {}
    try:
      with np.load(path, allow_pickle=False) as z:
        for key in z.files:
          net, _, name = key.partition(".")
          if net in ("G", "D", "G_ema") and name:
            sds.setdefault(net, {})[name] = np.asarray(z[key], np.float32)
    except ValueError as e:
      if "pickle" not in str(e):
        raise ValueError(f"{path}: not a readable .npz of numeric arrays "
                         f"({e})") from None
      raise ValueError(
          f"{path}: holds pickled (object) arrays, which --state_dicts does "
          f"not read (unpickling runs code from the file); save every tensor "
          f"as a plain numeric array named G.<param>, D.<param>, "
          f"G_ema.<param> (np.savez), or pass a torch.save'd file") from None
    except (OSError, EOFError) as e:   # not a zip, truncated
      raise ValueError(f"{path}: not a readable .npz file ({e})") from None
  else:
    try:
      torch = _safe_torch()
    except ValueError as e:
      raise ValueError(
          f"{path}: reading a torch.save'd file needs PyTorch >= "
          f"{MIN_TORCH[0]}.{MIN_TORCH[1]} ({e}); pip install -e .[import], "
          f"or save the state dicts as .npz (numeric arrays named G.<param>, "
          f"D.<param>, G_ema.<param>) and pass that with --state_dicts"
      ) from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot read {path} with "
                       f"torch.load(weights_only=True) ({e}); expected "
                       "{'G': state_dict, 'D': state_dict, 'G_ema': "
                       "state_dict}") from e
    if not isinstance(obj, Mapping):
      raise ImportErrorWithKeys(f"{path}: expected a dict of state_dicts, "
                                f"got {type(obj).__name__}")
    sds = {k: _to_numpy(v) for k, v in obj.items()
           if k in ("G", "D", "G_ema")}
  for k in ("G", "D"):
    if k not in sds:
      raise ImportErrorWithKeys(
          f"{path}: no '{k}' state_dict found (have {sorted(sds)}); expected "
          "keys 'G', 'D' and optionally 'G_ema'")
  return sds


# ----------------------------------------------------------------------------
# Architecture inference.

_RE_G_BLOCK = re.compile(r"^synthesis\.b(\d+)\.")
_RE_D_BLOCK = re.compile(r"^b(\d+)\.")


def _channels_to_base_max(channels: Mapping[int, int]) -> Tuple[int, int]:
  """(channel_base, channel_max) with min(base // res, max) == channels[res]."""
  channel_max = max(channels.values())
  lo, hi = 0, None
  for res, ch in channels.items():
    if ch < channel_max:  # not clamped: base // res == ch
      lo = max(lo, ch * res)
      hi = (ch + 1) * res if hi is None else min(hi, (ch + 1) * res)
    else:                 # clamped (or exactly at the max): base // res >= max
      lo = max(lo, channel_max * res)
  base = lo
  if (hi is not None and base >= hi) or any(
      min(base // r, channel_max) != c for r, c in channels.items()):
    raise ImportErrorWithKeys(
        f"channel counts per resolution {dict(sorted(channels.items()))} do "
        "not follow min(channel_base // res, channel_max)")
  return base, channel_max


def infer_generator(sd: StateDict) -> Dict[str, Any]:
  """Architecture of a stylegan2-ada-pytorch Generator from its state_dict."""
  embed = sorted(k for k in sd if k.startswith("mapping.embed."))
  if embed:
    raise ImportErrorWithKeys(
        f"conditional generator (label embedding {embed}) is not supported; "
        "GAN-DL trains without labels")
  fcs = sorted(int(m.group(1)) for k in sd
               for m in [re.match(r"^mapping\.fc(\d+)\.weight$", k)] if m)
  if not fcs or fcs != list(range(len(fcs))):
    raise ImportErrorWithKeys(f"generator mapping layers fc0..fcN not found "
                              f"(found {fcs}); is this a G state_dict?")
  z_dim = sd["mapping.fc0.weight"].shape[1]
  w_dim = sd[f"mapping.fc{fcs[-1]}.weight"].shape[0]
  res_list = sorted({int(m.group(1)) for k in sd
                     for m in [_RE_G_BLOCK.match(k)] if m})
  if not res_list:
    raise ImportErrorWithKeys("no synthesis blocks 'synthesis.b<res>.*' found")
  resolution = res_list[-1]
  expected = [2**i for i in range(2, int(np.log2(resolution)) + 1)]
  if res_list != expected:
    raise ImportErrorWithKeys(f"synthesis blocks {res_list}, expected "
                              f"{expected}")
  no_torgb = [r for r in res_list if f"synthesis.b{r}.torgb.weight" not in sd]
  skip_keys = sorted(k for k in sd if re.match(r"^synthesis\.b\d+\.skip\.", k))
  if skip_keys or no_torgb:
    raise ImportErrorWithKeys(
        "only the 'skip' generator architecture is supported; this one has "
        + (f"residual skips {skip_keys}" if skip_keys else
           f"no toRGB at resolutions {no_torgb} ('orig')"))
  channels = {r: sd[f"synthesis.b{r}.conv1.weight"].shape[0] for r in res_list}
  img_channels = sd[f"synthesis.b{resolution}.torgb.weight"].shape[0]
  base, cmax = _channels_to_base_max(channels)
  return dict(resolution=resolution, img_channels=img_channels, z_dim=z_dim,
              w_dim=w_dim, mapping_layers=len(fcs), channel_base=base,
              channel_max=cmax, channels=channels)


def infer_discriminator(sd: StateDict) -> Dict[str, Any]:
  """Architecture of a stylegan2-ada-pytorch Discriminator."""
  cond = sorted(k for k in sd if k.startswith("mapping."))
  if cond:
    raise ImportErrorWithKeys(
        f"conditional discriminator (label mapping {cond[:4]}...) is not "
        "supported; GAN-DL trains without labels")
  res_list = sorted({int(m.group(1)) for k in sd
                     for m in [_RE_D_BLOCK.match(k)] if m})
  if 4 not in res_list or "b4.fc.weight" not in sd:
    raise ImportErrorWithKeys("discriminator epilogue 'b4.*' not found; is "
                              "this a D state_dict?")
  resolution = res_list[-1]
  blocks = [r for r in res_list if r > 4]
  no_skip = [r for r in blocks if f"b{r}.skip.weight" not in sd]
  extra_rgb = sorted(k for k in sd if k.endswith("fromrgb.weight")
                     and not k.startswith(f"b{resolution}."))
  if no_skip or extra_rgb:
    raise ImportErrorWithKeys(
        "only the 'resnet' discriminator architecture is supported; this one "
        + (f"lacks residual skips at {no_skip}" if no_skip else
           f"has fromRGB layers {extra_rgb} ('skip')"))
  channels = {r: sd[f"b{r}.conv0.weight"].shape[0] for r in blocks}
  channels[4] = sd["b4.conv.weight"].shape[0]
  img_channels = sd[f"b{resolution}.fromrgb.weight"].shape[1]
  mbstd_num_channels = sd["b4.conv.weight"].shape[1] - channels[4]
  base, cmax = _channels_to_base_max(channels)
  return dict(resolution=resolution, img_channels=img_channels,
              channel_base=base, channel_max=cmax,
              mbstd_num_channels=int(mbstd_num_channels), channels=channels)


def infer_model_config(sds: Mapping[str, StateDict],
                       hints: Optional[Mapping[str, Any]] = None
                       ) -> Dict[str, Any]:
  """Our model config (configs/gandl_rxrx19a.py: model_config()) from tensors.

  `hints` supplies what the tensors cannot reveal: mbstd_group_size,
  mapping_lr_multiplier, w_avg_beta, conv_clamp (ADA defaults otherwise).
  """
  hints = dict(hints or {})
  g = infer_generator(sds["G"])
  d = infer_discriminator(sds["D"])
  if "G_ema" in sds:
    g_ema = infer_generator(sds["G_ema"])
    if g_ema != g:
      raise ImportErrorWithKeys(f"G and G_ema differ in architecture: {g} vs "
                                f"{g_ema}")
  for k in ("resolution", "img_channels"):
    if g[k] != d[k]:
      raise ImportErrorWithKeys(f"G and D disagree on {k}: {g[k]} vs {d[k]}")
  # One channel_base/channel_max serves both networks in our configs.
  both = dict(g["channels"])
  for r, c in d["channels"].items():
    if both.get(r, c) != c:
      raise ImportErrorWithKeys(
          f"G has {both[r]} channels at {r}x{r} but D has {c}; gandl-jax "
          "uses one channel_base/channel_max for both networks")
    both[r] = c
  base, cmax = _channels_to_base_max(both)
  w_avg_beta = hints.get("w_avg_beta", 0.995)
  if w_avg_beta is None:
    raise ImportErrorWithKeys("generator without w_avg tracking "
                              "(w_avg_beta=None) is not supported")
  group = hints.get("mbstd_group_size", 4)
  if group is None:
    raise ImportErrorWithKeys(
        "mbstd_group_size=None (whole minibatch) is not supported; pass a "
        "fixed group size")
  if "mbstd_num_channels" in hints and (
      hints["mbstd_num_channels"] != d["mbstd_num_channels"]):
    raise ImportErrorWithKeys("mbstd_num_channels of the module and of the "
                              "tensors disagree")
  return dict(
      resolution=int(g["resolution"]), img_channels=int(g["img_channels"]),
      z_dim=int(g["z_dim"]), w_dim=int(g["w_dim"]),
      mapping_layers=int(g["mapping_layers"]),
      mapping_lr_multiplier=float(hints.get("mapping_lr_multiplier", 0.01)),
      w_avg_beta=float(w_avg_beta), channel_base=int(base),
      channel_max=int(cmax), mbstd_group_size=int(group),
      mbstd_num_channels=int(d["mbstd_num_channels"]),
      conv_clamp=(None if hints.get("conv_clamp") is None
                  else float(hints["conv_clamp"])))


# ----------------------------------------------------------------------------
# Conversion: rename + layout transpose, checked against our own networks.


def torch_to_ours(name: str, value: np.ndarray) -> np.ndarray:
  """Reference (torch) layout -> gandl-jax layout for the tensor `name`."""
  leaf = name.rsplit(".", 1)[-1]
  if leaf == "const":                  # (C, H, W) -> (H, W, C)
    return np.ascontiguousarray(value.transpose(1, 2, 0))
  if leaf == "weight" and value.ndim == 4:   # OIHW -> HWIO
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if leaf == "weight" and value.ndim == 2:   # (out, in) -> (in, out)
    return np.ascontiguousarray(value.T)
  return np.array(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, path + "."))
    else:
      out[path] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    parts = path.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def convert_state_dict(sd: StateDict, abstract: Mapping[str, Any],
                       what: str) -> Dict[str, Any]:
  """Fills our variable tree `abstract` ({'params': ..., ['buffers': ...]},
  leaves with .shape) from a reference state_dict; every tensor must find
  its place and every variable must be filled."""
  targets = {}
  for coll, tree in abstract.items():
    for path, leaf in _flatten(tree).items():
      targets[path] = (coll, tuple(leaf.shape))
  converted: Dict[str, Dict[str, np.ndarray]] = {c: {} for c in abstract}
  unused, bad_shape = [], []
  for name, value in sorted(sd.items()):
    if name.endswith("resample_filter"):
      continue
    if name not in targets:
      unused.append(f"{name} {tuple(value.shape)}")
      continue
    coll, shape = targets.pop(name)
    ours = torch_to_ours(name, value)
    if ours.shape != shape:
      bad_shape.append(f"{name}: reference {tuple(value.shape)} -> "
                       f"{ours.shape}, ours {shape}")
      continue
    converted[coll][name] = ours.astype(np.float32)
  problems = []
  if unused:
    problems.append("tensors with no place in gandl-jax's networks:\n    "
                    + "\n    ".join(unused))
  if bad_shape:
    problems.append("shape mismatches:\n    " + "\n    ".join(bad_shape))
  if targets:
    problems.append("variables not provided by the reference:\n    "
                    + "\n    ".join(f"{k} {v[1]}" for k, v in
                                    sorted(targets.items())))
  if problems:
    raise ImportErrorWithKeys(f"cannot map {what}:\n  " + "\n  ".join(problems))
  return {c: _unflatten(v) for c, v in converted.items()}


def convert(sds: Mapping[str, StateDict],
            hints: Optional[Mapping[str, Any]] = None
            ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(model variables {'G', 'G_ema', 'D'}, model config) from numpy state dicts."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gandl_jax.model import networks  # pylint: disable=import-outside-toplevel

  config = infer_model_config(sds, hints)
  G, D = networks.build(config, jnp.float32)
  g_abs, d_abs = jax.eval_shape(
      lambda k: networks.init(k, G, D, batch=config["mbstd_group_size"]),
      jax.random.PRNGKey(0))
  sds = dict(sds)
  if "G_ema" not in sds:
    logging.warning("no G_ema given: using G's weights for G_ema")
    sds["G_ema"] = sds["G"]
  model = {
      "G": convert_state_dict(sds["G"], g_abs, "G"),
      "G_ema": convert_state_dict(sds["G_ema"], g_abs, "G_ema"),
      "D": convert_state_dict(sds["D"], d_abs, "D"),
  }
  return model, config


def kimg_from_filename(path: str) -> Optional[float]:
  """network-snapshot-001234.pkl -> 1234.0 (ADA's naming), else None."""
  m = re.search(r"network-snapshot-(\d+)", os.path.basename(path))
  return float(m.group(1)) if m else None


def import_to_workdir(sds: Mapping[str, StateDict], hints: Mapping[str, Any],
                      workdir: str, source_path: str, step: int = 0) -> str:
  """Converts and writes WORKDIR/checkpoints/<step>; returns that path."""
  from gandl_jax import checkpoint  # pylint: disable=import-outside-toplevel
  model, config = convert(sds, hints)
  kimg = kimg_from_filename(source_path)
  meta = {"model": config, "step": int(step),
          "kimg": 0.0 if kimg is None else kimg,
          "source": "import_stylegan2_ada",
          "source_path": os.path.abspath(source_path)}
  path = checkpoint.save_model(checkpoint.checkpoint_dir(workdir), step,
                               model, meta)
  return str(path)
