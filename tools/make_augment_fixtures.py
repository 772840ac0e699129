r"""Builds tests/fixtures/augment_reference.npz from stylegan2-ada-pytorch.

Runs the reference's `training.augment.AugmentPipe` (PyTorch, CPU) on small
random NHWC images and records every random draw it makes (its `torch.rand`
/ `torch.randn` calls, in order), so that tests/model/test_augment.py can feed the
same draws to `gandl_jax.model.augment.params_from_draws` and compare
`apply` with the reference's output. None of the reference's code is part of
this repository: it is imported from a checkout given on the command line.

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy scipy
  git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2ada
  /tmp/torchenv/bin/python tools/make_augment_fixtures.py \
      --reference_dir /tmp/sg2ada --out tests/fixtures/augment_reference.npz

Cases (each an `AugmentPipe` configuration and p):
  blit       xflip, rotate90, xint                    p = 0.7
  geom       scale, rotate, aniso, xfrac              p = 0.8
  bg         all of blit and geom                     p = 1.0
  bg_strong  bg with scale_std 1, aniso_std 0.6 (margins reach their clamp
             at the image size)                       p = 1.0
  color      brightness, contrast                     p = 0.9
  scale_margin  scale only, forced draws: one image zoomed out 2.2x, the
             others near identity (the reference's unclamped margin matters
             at the zoomed image's border)                p = 1.0
The color case runs the reference on every channel as its own 1-channel
image (the reference's color group takes 1 or 3 channels), so its draws are
per (image, channel) as ours.

What is stored (float32; images NHWC):
  images                      (B, H, W, C) input, uniform in [-1, 1]
  <case>.p                    p
  <case>.kwargs               AugmentPipe keyword arguments (JSON string)
  <case>.draw.<name>.value    the value draw of transform <name>
  <case>.draw.<name>.gate     its gate draw (compared with multiplier * p)
  <case>.output               the reference's output
Names follow `gandl_jax.model.augment.draw`: xflip, rotate90, xint, scale,
rotate_pre, aniso, rotate_post, xfrac, brightness, contrast.
"""
import argparse
import json
import os
import sys

import numpy as np

CASES = (
    ("blit", dict(xflip=1, rotate90=1, xint=1), 0.7),
    ("geom", dict(scale=1, rotate=1, aniso=1, xfrac=1), 0.8),
    ("bg", dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1,
                xfrac=1), 1.0),
    ("bg_strong", dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1,
                       aniso=1, xfrac=1, scale_std=1.0, aniso_std=0.6), 1.0),
    ("color", dict(brightness=1, contrast=1), 0.9),
    # Forced draws (value, gate): one image zoomed out by 2.2 (s = 2^(-5.76
    # * 0.2)), the rest near identity, so the batch margin is not clamped and
    # the zoomed image's outer samples reach the zero band the reference's
    # upsampling leaves at the edge of its padding.
    ("scale_margin", dict(scale=1), 1.0,
     ([-5.76, 0.1, -0.2, 0.3], [0.0, 0.0, 0.0, 0.0])),
)
# The reference's draw order (two calls each: value, gate).
ORDER = (("xflip", "xflip"), ("rotate90", "rotate90"), ("xint", "xint"),
         ("scale", "scale"), ("rotate_pre", "rotate"), ("aniso", "aniso"),
         ("rotate_post", "rotate"), ("xfrac", "xfrac"),
         ("brightness", "brightness"), ("contrast", "contrast"))


def _import_reference(ref_dir):
  if not os.path.isdir(os.path.join(ref_dir, "training")):
    raise SystemExit(f"make_augment_fixtures: {ref_dir!r} is not a checkout "
                     "of stylegan2-ada-pytorch (no training/ directory)")
  sys.path.insert(0, os.path.abspath(ref_dir))
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from training import augment  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"make_augment_fixtures: cannot import the reference "
                     f"({e}); needs PyTorch, scipy and numpy") from e
  return torch, augment


def _run_recorded(torch, pipe, x, forced=None):
  """pipe(x) with every torch.rand / torch.randn result recorded; the i-th
  result replaced by forced[i] where `forced` is given."""
  calls = []
  originals = torch.rand, torch.randn

  def recorder(fn):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      if forced is not None:
        out = torch.as_tensor(np.asarray(forced[len(calls)], np.float32)
                              ).reshape(out.shape)
      calls.append(out.detach().clone().numpy())
      return out
    return wrapped

  torch.rand, torch.randn = recorder(originals[0]), recorder(originals[1])
  try:
    with torch.no_grad():
      y = pipe(x)
  finally:
    torch.rand, torch.randn = originals
  return y.numpy(), calls


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference_dir", required=True)
  parser.add_argument("--out", default="tests/fixtures/augment_reference.npz")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--channels", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  torch, augment = _import_reference(args.reference_dir)
  torch.manual_seed(args.seed)
  b, r, c = args.batch, args.resolution, args.channels
  rng = np.random.default_rng(args.seed)
  images = rng.uniform(-1, 1, (b, r, r, c)).astype(np.float32)
  out = {"images": images}
  for name, kwargs, p, *forced in CASES:
    pipe = augment.AugmentPipe(**kwargs).train().requires_grad_(False)
    pipe.p.copy_(torch.as_tensor(p))
    if name == "color":
      x = torch.from_numpy(images.transpose(0, 3, 1, 2).reshape(b * c, 1, r, r)
                           .copy())
    else:
      x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y, calls = _run_recorded(torch, pipe, x, forced[0] if forced else None)
    if name == "color":
      y = y.reshape(b, c, r, r)
    out[f"{name}.output"] = y.transpose(0, 2, 3, 1).astype(np.float32)
    out[f"{name}.p"] = np.float32(p)
    out[f"{name}.kwargs"] = np.asarray(json.dumps(kwargs))
    enabled = [ours for ours, theirs in ORDER if kwargs.get(theirs, 0) > 0]
    if len(calls) != 2 * len(enabled):
      raise SystemExit(f"make_augment_fixtures: case {name}: the reference "
                       f"made {len(calls)} random draws, expected "
                       f"{2 * len(enabled)} ({enabled}); its draw order "
                       "changed")
    for i, ours in enumerate(enabled):
      value, gate = calls[2 * i], calls[2 * i + 1]
      if name == "color":
        value, gate = value.reshape(b, c), gate.reshape(b, c)
      out[f"{name}.draw.{ours}.value"] = value.astype(np.float32)
      out[f"{name}.draw.{ours}.gate"] = gate.astype(np.float32)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out}: {sorted(out)}")


if __name__ == "__main__":
  main()
