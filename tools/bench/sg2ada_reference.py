r"""stylegan2-ada-pytorch as a benchmark subprocess (the reference side of
`python -m tools.bench.train --reference` and `tools.bench.embed`; the
harness alternates its rounds with ours through `harness.worker_side`).

Imports the reference's own code from a checkout (never part of this
repository): `training.networks` (Generator, "skip"; Discriminator, "resnet"),
`training.loss.StyleGAN2Loss` and `torch_utils`, and runs its training
iteration as `training/training_loop.py` does: phases G main, G reg (every
G_reg_interval), D main, D reg (every D_reg_interval), each with its own
zero_grad / accumulate_gradients(gain=interval) / nan_to_num / Adam step,
the lazy-regularization correction of lr and betas (mb_ratio), then the
G_ema update. Without CUDA the reference's custom ops (upfirdn2d, bias_act)
take their `impl='ref'` fallbacks (plain PyTorch), as its own code does on CPU.

Protocol (one JSON object per line): started with `--spec JSON` (the
configuration, see `spec_from_config` below), it
builds everything, warms up, prints {"ready": ...}; then answers each stdin
line `train N` (N iterations) or `embed N` (N discriminator forwards on one
batch) with {"seconds": s, "images": n}; `quit` ends it.
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np


def _import_reference(ref_dir):
  if not os.path.isdir(os.path.join(ref_dir, "training")):
    raise SystemExit(f"sg2ada_reference: {ref_dir!r} is not a checkout of "
                     "stylegan2-ada-pytorch (no training/ directory)")
  sys.path.insert(0, os.path.abspath(ref_dir))
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("sg2ada_reference: PyTorch is missing; install the "
                     "[import] extra (pip install -e '.[import]')") from e
  # pylint: disable=import-outside-toplevel
  from torch_utils import misc
  from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix
  from training import loss as loss_lib
  from training import networks
  return torch, misc, conv2d_gradfix, grid_sample_gradfix, loss_lib, networks


class Reference:
  """The reference networks, loss, optimizers and phase schedule."""

  def __init__(self, spec, ref_dir):
    (torch, self.misc, conv2d_gradfix, grid_sample_gradfix, loss_lib,
     networks) = _import_reference(ref_dir)
    self.torch = torch
    m = spec["model"]
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(spec.get("seed", 0))
    # As training_loop.py sets them (no effect on CPU).
    torch.backends.cudnn.benchmark = True
    conv2d_gradfix.enabled = True
    grid_sample_gradfix.enabled = True
    common = dict(c_dim=0, img_resolution=m["resolution"],
                  img_channels=m["img_channels"])
    fp16 = int(spec.get("num_fp16_res", 0))
    G = networks.Generator(
        z_dim=m["z_dim"], w_dim=m["w_dim"],
        mapping_kwargs=dict(num_layers=m["mapping_layers"],
                            lr_multiplier=m["mapping_lr_multiplier"]),
        synthesis_kwargs=dict(channel_base=m["channel_base"],
                              channel_max=m["channel_max"],
                              num_fp16_res=fp16, conv_clamp=m["conv_clamp"],
                              architecture="skip"), **common)
    D = networks.Discriminator(
        architecture="resnet", channel_base=m["channel_base"],
        channel_max=m["channel_max"], num_fp16_res=fp16,
        conv_clamp=m["conv_clamp"],
        epilogue_kwargs=dict(mbstd_group_size=m["mbstd_group_size"],
                             mbstd_num_channels=m["mbstd_num_channels"]),
        **common)
    self.G = G.train().requires_grad_(False).to(self.device)
    self.D = D.train().requires_grad_(False).to(self.device)
    self.G_ema = copy.deepcopy(self.G).eval()
    self.spec = spec
    self.batch = int(spec["batch_size"])
    self.res, self.ch = m["resolution"], m["img_channels"]
    self.z_dim = m["z_dim"]
    if "loss" in spec:
      l, o = spec["loss"], spec["optim"]
      self.loss = loss_lib.StyleGAN2Loss(
          device=self.device, G_mapping=self.G.mapping,
          G_synthesis=self.G.synthesis, D=self.D, augment_pipe=None,
          style_mixing_prob=l["style_mixing_prob"], r1_gamma=l["r1_gamma"],
          pl_batch_shrink=l["pl_batch_shrink"], pl_decay=l["pl_decay"],
          pl_weight=l["pl_weight"])
      self.phases = []
      for name, module, lr, interval in (
          ("G", self.G, o["g_lr"], l["pl_interval"] if l["pl_weight"] else None),
          ("D", self.D, o["d_lr"], l["r1_interval"] if l["r1_gamma"] else None)):
        betas = [o["beta1"], o["beta2"]]
        if interval is None:
          opt = torch.optim.Adam(module.parameters(), lr=lr, betas=betas,
                                 eps=o["eps"])
          self.phases.append((name + "both", module, opt, 1))
        else:
          r = interval / (interval + 1)
          opt = torch.optim.Adam(module.parameters(), lr=lr * r,
                                 betas=[b**r for b in betas], eps=o["eps"])
          self.phases += [(name + "main", module, opt, 1),
                          (name + "reg", module, opt, interval)]
      self.batch_idx = 0
      self.real = torch.rand([self.batch, self.ch, self.res, self.res],
                             device=self.device) * 2 - 1
      self.c = torch.zeros([self.batch, 0], device=self.device)

  def _sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def train_iteration(self):
    """One iteration of training_loop.py's loop body (batch_gpu = batch)."""
    torch = self.torch
    all_gen_z = torch.randn([len(self.phases) * self.batch, self.z_dim],
                            device=self.device).split(self.batch)
    for (name, module, opt, interval), gen_z in zip(self.phases, all_gen_z):
      if self.batch_idx % interval != 0:
        continue
      opt.zero_grad(set_to_none=True)
      module.requires_grad_(True)
      self.loss.accumulate_gradients(
          phase=name, real_img=self.real, real_c=self.c, gen_z=gen_z,
          gen_c=self.c, sync=True, gain=interval)
      module.requires_grad_(False)
      for param in module.parameters():
        if param.grad is not None:
          self.misc.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5,
                               out=param.grad)
      opt.step()
    e = self.spec["ema"]
    ema_nimg = e["half_life_kimg"] * 1000
    if e.get("rampup") is not None:
      ema_nimg = min(ema_nimg, (self.batch_idx * self.batch) * e["rampup"])
    beta = 0.5 ** (self.batch / max(ema_nimg, 1e-8))
    with torch.no_grad():
      for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
        p_ema.copy_(p.lerp(p_ema, beta))
      for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
        b_ema.copy_(b)
    self.batch_idx += 1

  def train(self, iterations):
    self._sync()
    t0 = time.perf_counter()
    for _ in range(iterations):
      self.train_iteration()
    self._sync()
    return time.perf_counter() - t0, iterations * self.batch

  def embed(self, batches):
    """D forward (the reference's embedding pass) on uint8 images, as an
    exporter would: convert to [-1, 1], then D in eval mode without grad."""
    torch = self.torch
    if not hasattr(self, "_u8"):
      gen = torch.Generator().manual_seed(1)
      self._u8 = torch.randint(0, 256, [self.batch, self.ch, self.res,
                                        self.res], generator=gen,
                               dtype=torch.uint8).to(self.device)
      self.D.eval()
    self._sync()
    t0 = time.perf_counter()
    with torch.no_grad():
      for _ in range(batches):
        img = self._u8.to(torch.float32) / 127.5 - 1
        out = self.D(img, None)
    out.cpu()
    self._sync()
    return time.perf_counter() - t0, batches * self.batch


def _emit(obj):
  sys.stdout.write(json.dumps(obj) + "\n")
  sys.stdout.flush()


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reference", required=True,
                 help="checkout of stylegan2-ada-pytorch")
  p.add_argument("--spec", required=True, help="JSON configuration")
  p.add_argument("--warmup", type=int, default=2)
  args = p.parse_args()
  spec = json.loads(args.spec)
  ref = Reference(spec, args.reference)
  mode = spec["mode"]
  # Warm up (first-call allocations), then align the schedule so timed
  # windows start at a multiple of both regularization intervals, like ours.
  if mode == "train":
    l = spec["loss"]
    interval = int(np.lcm(l["r1_interval"], l["pl_interval"]))
    ref.train(args.warmup)
    ref.train(-ref.batch_idx % interval)
  else:
    ref.embed(args.warmup)
  torch = ref.torch
  _emit({"ready": True, "torch": torch.__version__,
         "device": str(ref.device), "threads": torch.get_num_threads(),
         "custom_ops": "cuda" if ref.device.type == "cuda" else "ref",
         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")})
  for line in sys.stdin:
    cmd = line.split()
    if not cmd:
      continue
    if cmd[0] == "quit":
      break
    if cmd[0] not in ("train", "embed") or len(cmd) != 2:
      _emit({"error": f"unknown command {line.strip()!r}"})
      continue
    cpu0 = time.process_time()
    seconds, images = (ref.train if cmd[0] == "train" else ref.embed)(
        int(cmd[1]))
    # CPU seconds of all of this process's threads: on a machine shared with
    # other jobs the figure to compare (wall time measures the contention).
    _emit({"seconds": seconds, "images": images,
           "cpu_seconds": time.process_time() - cpu0})


# ---------------------------------------------------------------------------
# Client side (imported by the bench tools; needs neither torch nor the
# reference checkout in the calling process).


def spec_from_config(config, mode: str, batch: int = None) -> dict:
  """The worker's configuration from a gandl-jax training config: the same
  architecture, loss, optimizer, EMA and batch. The reference's
  num_fp16_res is `config.num_bf16_res` (-1, all blocks: 10, every
  resolution up to 1024)."""
  m, l, o, e = config.model, config.loss, config.optim, config.ema
  return {
      "mode": mode, "seed": int(config.seed),
      "batch_size": int(batch or config.batch_size),
      "num_fp16_res": (10 if int(config.num_bf16_res) < 0
                       else int(config.num_bf16_res)),
      "model": {k: m.get(k) for k in (
          "resolution", "img_channels", "z_dim", "w_dim", "mapping_layers",
          "mapping_lr_multiplier", "channel_base", "channel_max",
          "mbstd_group_size", "mbstd_num_channels", "conv_clamp")},
      "loss": {k: l[k] for k in (
          "r1_gamma", "r1_interval", "pl_weight", "pl_interval", "pl_decay",
          "pl_batch_shrink", "style_mixing_prob")},
      "optim": {k: o[k] for k in ("g_lr", "d_lr", "beta1", "beta2", "eps")},
      "ema": {"half_life_kimg": e.half_life_kimg, "rampup": e.rampup},
  }


class Worker:
  """The reference in a subprocess: `run('train' | 'embed', n)` times n
  iterations / batches there and returns (seconds, images)."""

  def __init__(self, ref_dir: str, spec: dict, python: str = sys.executable):
    import subprocess  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    self._err = tempfile.TemporaryFile(mode="w+")
    # torch's OpenMP threads spin-wait by default; on a CPU shared with other
    # jobs that stalls every parallel region (measured here: 0.8 vs 5-7 img/s
    # at configs/demo.py under load 20), so the reference gets the passive
    # policy unless the caller sets one.
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    self._proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "--reference", ref_dir,
         "--spec", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
        text=True, env=env)
    self.info = self._read()

  def _read(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      self._proc.wait()
      self._err.seek(0)
      tail = self._err.read()[-3000:]
      raise RuntimeError(f"the stylegan2-ada-pytorch worker exited with "
                         f"status {self._proc.returncode}:\n{tail}")
    out = json.loads(line)
    if "error" in out:
      raise RuntimeError(f"stylegan2-ada-pytorch worker: {out['error']}")
    return out

  def run(self, command: str, n: int):
    """(wall seconds, images, CPU seconds of the worker's threads)."""
    self._proc.stdin.write(f"{command} {int(n)}\n")
    self._proc.stdin.flush()
    out = self._read()
    return out["seconds"], out["images"], out["cpu_seconds"]

  def close(self):
    if self._proc.poll() is None:
      self._proc.stdin.write("quit\n")
      self._proc.stdin.close()
      self._proc.wait(timeout=60)


if __name__ == "__main__":
  main()
