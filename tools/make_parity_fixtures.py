r"""Builds the StyleGAN2 parity fixtures from NVlabs' stylegan2-ada-pytorch.

This script documents exactly how `tests/fixtures/parity_*.npz` were made. It
needs PyTorch and a checkout of https://github.com/NVlabs/stylegan2-ada-pytorch
on PYTHONPATH (its `training.networks` and `torch_utils` packages); none of the
reference code is part of this repository. On CPU the reference's custom CUDA
ops fall back to their plain PyTorch implementations.

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
  git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2ada
  PYTHONPATH=/tmp/sg2ada /tmp/torchvenv/bin/python tools/make_parity_fixtures.py \
      --out tests/fixtures/parity_32.npz

What is stored (float32 unless noted; images in NHWC, the layout gandl-jax uses;
`G.*` / `D.*` are the reference state_dict entries in torch layout):
  config_json           architecture arguments (JSON string)
  G.<name>, D.<name>    every parameter and buffer of G and D (resample_filter
                        buffers included; the importer must skip them)
  z                     (8, z_dim) latents
  g_img_psi1            G(z, psi=1, noise_mode='const')  (N, H, W, C)
  g_img_psi07           G(z, psi=0.7, noise_mode='const')
  ws_psi1               mapping(z, psi=1)                (N, num_ws, w_dim)
  d_img                 (8, H, W, C) fixed images in [-1, 1]
  d_logits              D(d_img)                         (N, 1)
  d_fc                  output of D.b4.fc                (N, C4)
  r1_gamma, r1_penalty  per-sample ||dD/dx||^2 summed over pixels and channels
                        (StyleGAN2Loss); r1_loss = r1_penalty * gamma / 2
  pl_ws, pl_noise       inputs of the path-length term (ws, and the noise
                        already divided by sqrt(H*W)); pl_noise is NHWC
  pl_lengths            sqrt(mean_i sum_j (d(sum img*noise)/d ws)^2)
  pl_lengths_nonfused   the same through the reference's non-fused modulated
                        conv (fused_modconv=False): its own float32 spread
  pl_mean_prev, pl_decay, pl_mean, pl_penalty
                        pl_mean = lerp(pl_mean_prev, mean(pl_lengths), decay),
                        pl_penalty = (pl_lengths - pl_mean)^2
The synthesis for the path-length term runs with noise_mode='const' so that
the values are deterministic.

Committed fixtures (see tests/model/test_parity.py):
  parity_32.npz        defaults below (32x32, 5 channels, mapping 3,
                       channel_base 512, channel_max 64, no conv clamp)
  parity_16_clamp.npz  --resolution 16 --channel_base 256 --channel_max 32
                       --conv_clamp 0.5 --seed 7 (exercises the clamps)

The full-size check (256x256, channel_base 16384, channel_max 512) writes a
fixture outside the repository and points the parity test at it:
  PYTHONPATH=/tmp/sg2ada /tmp/torchvenv/bin/python tools/make_parity_fixtures.py \
      --resolution 256 --channel_base 16384 --channel_max 512 --z_dim 512 \
      --w_dim 512 --out /tmp/parity_256.npz
  GANDL_PARITY_FIXTURES=/tmp/parity_256.npz pytest -q tests/model/test_parity.py
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

_HELP_PYTHONPATH = (
    "needs a checkout of https://github.com/NVlabs/stylegan2-ada-pytorch on "
    "PYTHONPATH (e.g. PYTHONPATH=/path/to/stylegan2-ada-pytorch) and PyTorch "
    "installed")


def _import_reference():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"make_parity_fixtures: PyTorch is missing; this script "
                     f"{_HELP_PYTHONPATH}.") from e
  try:
    from training import networks  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"make_parity_fixtures: cannot import "
                     f"`training.networks` ({e}); this script "
                     f"{_HELP_PYTHONPATH}.") from e
  return torch, networks


def _randomize(torch, module, gen, prefix):
  """Replaces every parameter/buffer by random values of a meaningful scale.

  Weights stay N(0, 1) (divided by the mapping lr multiplier where the
  reference stores them that way); biases, noise strengths, w_avg and the
  affine biases get non-zero values so that each of them is exercised.
  """
  with torch.no_grad():
    for name, t in list(module.named_parameters()) + list(
        module.named_buffers()):
      full = f"{prefix}{name}"
      if name.endswith("resample_filter"):
        continue
      r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
      if full.startswith("G.mapping.fc"):
        lr_mult = 0.01
        if name.endswith(".weight"):
          t.copy_(r / lr_mult)
        else:
          t.copy_(r * 0.3 / lr_mult)
      elif name.endswith("w_avg"):
        t.copy_(r * 0.5)
      elif name.endswith("affine.bias"):
        t.copy_(1.0 + 0.3 * r)
      elif name.endswith("noise_strength"):
        t.copy_(0.3 * r)
      elif name.endswith(".bias"):
        t.copy_(0.3 * r)
      else:  # weights, const, noise_const
        t.copy_(r)


def _nhwc(x):
  return np.ascontiguousarray(x.detach().cpu().numpy().transpose(0, 2, 3, 1))


def build_reference(args):
  """Runs the reference networks and returns the dict stored in the .npz."""
  torch, networks = _import_reference()
  torch.manual_seed(args.seed)
  gen = torch.Generator().manual_seed(args.seed)

  cfg = dict(
      resolution=args.resolution, img_channels=args.img_channels,
      z_dim=args.z_dim, w_dim=args.w_dim, mapping_layers=args.mapping_layers,
      mapping_lr_multiplier=0.01, w_avg_beta=0.995,
      channel_base=args.channel_base, channel_max=args.channel_max,
      mbstd_group_size=args.mbstd_group_size, mbstd_num_channels=1,
      conv_clamp=args.conv_clamp)
  G = networks.Generator(
      z_dim=args.z_dim, c_dim=0, w_dim=args.w_dim,
      img_resolution=args.resolution, img_channels=args.img_channels,
      mapping_kwargs=dict(num_layers=args.mapping_layers),
      synthesis_kwargs=dict(channel_base=args.channel_base,
                            channel_max=args.channel_max, num_fp16_res=0,
                            conv_clamp=args.conv_clamp, architecture="skip"))
  D = networks.Discriminator(
      c_dim=0, img_resolution=args.resolution, img_channels=args.img_channels,
      architecture="resnet", channel_base=args.channel_base,
      channel_max=args.channel_max, num_fp16_res=0,
      conv_clamp=args.conv_clamp,
      epilogue_kwargs=dict(mbstd_group_size=args.mbstd_group_size))
  _randomize(torch, G, gen, "G.")
  _randomize(torch, D, gen, "D.")
  G.eval().requires_grad_(False)
  D.eval().requires_grad_(False)

  out = {"config_json": np.array(json.dumps(cfg))}
  for k, v in G.state_dict().items():
    out[f"G.{k}"] = v.detach().cpu().numpy().astype(np.float32)
  for k, v in D.state_dict().items():
    out[f"D.{k}"] = v.detach().cpu().numpy().astype(np.float32)

  n = args.batch
  res, ch = args.resolution, args.img_channels
  z = torch.randn([n, args.z_dim], generator=gen)
  out["z"] = z.numpy()
  with torch.no_grad():
    out["g_img_psi1"] = _nhwc(G(z, None, truncation_psi=1.0,
                                noise_mode="const"))
    out["g_img_psi07"] = _nhwc(G(z, None, truncation_psi=0.7,
                                 noise_mode="const"))
    ws = G.mapping(z, None, truncation_psi=1.0)
    out["ws_psi1"] = ws.numpy()

  # D logits and epilogue fc features on fixed images.
  d_img = torch.rand([n, ch, res, res], generator=gen) * 2 - 1
  out["d_img"] = _nhwc(d_img)
  feats = {}
  hook = D.b4.fc.register_forward_hook(
      lambda m, i, o: feats.__setitem__("fc", o.detach().clone()))
  with torch.no_grad():
    out["d_logits"] = D(d_img, None).numpy()
  hook.remove()
  out["d_fc"] = feats["fc"].numpy()

  # R1 (StyleGAN2Loss, Dr1 phase).
  real = d_img.detach().clone().requires_grad_(True)
  real_logits = D(real, None)
  r1_grads = torch.autograd.grad(outputs=[real_logits.sum()], inputs=[real],
                                 create_graph=True, only_inputs=True)[0]
  r1_penalty = r1_grads.square().sum([1, 2, 3])
  out["r1_gamma"] = np.float32(args.r1_gamma)
  out["r1_penalty"] = r1_penalty.detach().numpy()
  out["r1_loss"] = (r1_penalty * (args.r1_gamma / 2)).detach().numpy()

  # Path length (StyleGAN2Loss, Gpl phase), deterministic noise.
  pl_ws = ws.detach().clone().requires_grad_(True)
  img = G.synthesis(pl_ws, noise_mode="const")
  pl_noise = torch.randn(img.shape, generator=gen) / np.sqrt(
      img.shape[2] * img.shape[3])
  pl_grads = torch.autograd.grad(outputs=[(img * pl_noise).sum()],
                                 inputs=[pl_ws], create_graph=True,
                                 only_inputs=True)[0]
  pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
  pl_mean_prev = torch.tensor(args.pl_mean_prev, dtype=torch.float32)
  pl_mean = pl_mean_prev.lerp(pl_lengths.mean(), args.pl_decay)
  pl_penalty = (pl_lengths - pl_mean).square()
  # The reference's own float32 spread: the same lengths through its
  # non-fused modulated-conv path (the one ADA trains with).
  img_nf = G.synthesis(pl_ws, noise_mode="const", fused_modconv=False)
  grads_nf = torch.autograd.grad(outputs=[(img_nf * pl_noise).sum()],
                                 inputs=[pl_ws], only_inputs=True)[0]
  out["pl_lengths_nonfused"] = grads_nf.square().sum(2).mean(1).sqrt().numpy()
  out["pl_ws"] = pl_ws.detach().numpy()
  out["pl_noise"] = _nhwc(pl_noise)
  out["pl_lengths"] = pl_lengths.detach().numpy()
  out["pl_mean_prev"] = np.float32(args.pl_mean_prev)
  out["pl_decay"] = np.float32(args.pl_decay)
  out["pl_mean"] = np.float32(pl_mean.detach().numpy())
  out["pl_penalty"] = pl_penalty.detach().numpy()
  return out


def save_npz(out, path):
  """Writes atomically (temporary file in the same directory, then rename)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=d)
  os.close(fd)
  try:
    np.savez_compressed(tmp, **out)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="tests/fixtures/parity_32.npz")
  p.add_argument("--resolution", type=int, default=32)
  p.add_argument("--img_channels", type=int, default=5)
  p.add_argument("--z_dim", type=int, default=64)
  p.add_argument("--w_dim", type=int, default=64)
  p.add_argument("--mapping_layers", type=int, default=3)
  p.add_argument("--channel_base", type=int, default=512)
  p.add_argument("--channel_max", type=int, default=64)
  p.add_argument("--conv_clamp", type=float, default=None)
  p.add_argument("--mbstd_group_size", type=int, default=4)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seed", type=int, default=20260101)
  p.add_argument("--r1_gamma", type=float, default=10.0)
  p.add_argument("--pl_mean_prev", type=float, default=0.5)
  p.add_argument("--pl_decay", type=float, default=0.01)
  args = p.parse_args(argv)
  out = build_reference(args)
  save_npz(out, args.out)
  size = os.path.getsize(args.out)
  print(f"wrote {args.out} ({size / 1e6:.2f} MB, {len(out)} arrays)")
  for k in ("g_img_psi1", "g_img_psi07", "d_logits", "d_fc", "r1_penalty",
            "pl_lengths", "pl_penalty"):
    v = out[k]
    print(f"  {k:12s} shape={v.shape} absmax={np.abs(v).max():.4g}")


if __name__ == "__main__":
  sys.exit(main())
