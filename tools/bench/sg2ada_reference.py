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
G_ema update, with TF32 off as training_loop.py sets it (allow_tf32=False).
On CUDA the reference's custom ops (upfirdn2d, bias_act) build at the first
call; where a build fails, or without CUDA, they take their `impl='ref'`
fallbacks (plain PyTorch), and the ready line says which ones did.

Protocol: started with `--spec JSON` (the configuration, see
`spec_from_config` below), it builds everything, warms up and emits the ready
line {"ready": true, "custom_ops": ..., ...}; then answers each stdin line
`train N` (N iterations) or `embed N` (N discriminator forwards on one batch)
with {"seconds": s, "images": n, "cpu_seconds": c}; `quit` ends it. Each
answer is `RESULT_PREFIX` + one JSON object on stdout; the reference's own
prints (its op builds) may surround it and are ignored by the client.
"""
import argparse
import copy
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
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
    torch.backends.cudnn.allow_tf32 = False         # fp32 convs stay fp32
    torch.backends.cuda.matmul.allow_tf32 = False
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


RESULT_PREFIX = "SG2ADA_RESULT "


def _emit(obj, out=None):
  """One protocol line: RESULT_PREFIX + JSON. It may follow other output on
  the same line (the reference's op build prints without a newline), so it
  starts on a fresh line and the client looks for the prefix anywhere."""
  out = out or sys.stdout
  out.write("\n" + RESULT_PREFIX + json.dumps(obj) + "\n")
  out.flush()


def ops_report(device_type, modules):
  """{op name: 'cuda' | 'ref'}: the implementation the reference's custom
  ops (torch_utils.ops.upfirdn2d, bias_act) really use. On CUDA an op is
  'cuda' only if its plugin built (`_init()` true, `_plugin` set); a failed
  build makes the reference fall back to its slow `impl='ref'` silently
  (a warning), which would inflate a ratio against it. Off CUDA always
  'ref' (the reference's own dispatch)."""
  out = {}
  for name, mod in modules.items():
    ok = False
    if device_type == "cuda":
      try:
        ok = bool(mod._init()) and mod._plugin is not None  # pylint: disable=protected-access
      except Exception:  # pylint: disable=broad-except
        ok = False
    out[name] = "cuda" if ok else "ref"
  return out


def serve(ref, info, lines=None, out=None):
  """The protocol loop: emits `info` (the ready line), then answers each
  line of `lines` (stdin) `train N` / `embed N` with {"seconds", "images",
  "cpu_seconds"}; `quit` ends it. `ref` has `train(n)` and `embed(n)`, each
  returning (seconds, images)."""
  _emit(dict(info, ready=True), out)
  for line in (sys.stdin if lines is None else lines):
    cmd = line.split()
    if not cmd:
      continue
    if cmd[0] == "quit":
      break
    if cmd[0] not in ("train", "embed") or len(cmd) != 2:
      _emit({"error": f"unknown command {line.strip()!r}"}, out)
      continue
    cpu0 = time.process_time()
    seconds, images = (ref.train if cmd[0] == "train" else ref.embed)(
        int(cmd[1]))
    # CPU seconds of all of this process's threads: on a machine shared with
    # other jobs the figure to compare (wall time measures the contention).
    _emit({"seconds": seconds, "images": images,
           "cpu_seconds": time.process_time() - cpu0}, out)


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
  # Warm up (first-call allocations; on CUDA the custom ops build here),
  # then align the schedule so timed windows start at a multiple of both
  # regularization intervals, like ours.
  if mode == "train":
    l = spec["loss"]
    interval = int(np.lcm(l["r1_interval"], l["pl_interval"]))
    ref.train(args.warmup)
    ref.train(-ref.batch_idx % interval)
  else:
    ref.embed(args.warmup)
  torch = ref.torch
  from torch_utils.ops import bias_act, upfirdn2d  # pylint: disable=import-outside-toplevel
  ops = ops_report(ref.device.type, {"upfirdn2d": upfirdn2d,
                                     "bias_act": bias_act})
  impls = set(ops.values())
  serve(ref, {
      "torch": torch.__version__, "device": str(ref.device),
      "device_name": (torch.cuda.get_device_name(ref.device)
                      if ref.device.type == "cuda" else "cpu"),
      "threads": torch.get_num_threads(),
      "custom_ops": impls.pop() if len(impls) == 1 else "mixed",
      "custom_ops_by_op": ops,
      "allow_tf32": {
          "cudnn": bool(torch.backends.cudnn.allow_tf32),
          "matmul": bool(torch.backends.cuda.matmul.allow_tf32)},
      "num_fp16_res": int(spec.get("num_fp16_res", 0)),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default"})


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


def define_flags() -> None:
  """--reference_timeout and --reference_omp_wait_policy (for the benches
  that take --reference); `from_flags` reads them."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if "reference_timeout" in flags.FLAGS:
    return
  flags.DEFINE_float(
      "reference_timeout", 1800.0, "Seconds the stylegan2-ada-pytorch worker "
      "may take for its start-up (op builds, warm-up) and for each round "
      "before it is stopped.")
  flags.DEFINE_string(
      "reference_omp_wait_policy", None, "OMP_WAIT_POLICY for the reference "
      "(e.g. PASSIVE on a CPU shared with other jobs); default: torch's "
      "default, as the reference's users run it. Recorded with every ratio.")


def from_flags(ref_dir: str, spec: dict) -> "Worker":
  """A Worker with --reference_timeout and --reference_omp_wait_policy."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  return Worker(ref_dir, spec, timeout=f.reference_timeout,
                start_timeout=f.reference_timeout,
                omp_wait_policy=f.reference_omp_wait_policy)


class WorkerTimeout(RuntimeError):
  """The reference worker gave no result in time (it was stopped)."""


class Worker:
  """The reference in a subprocess: `run('train' | 'embed', n)` times n
  iterations / batches there and returns (seconds, images, CPU seconds).

  Results come back as stdout lines holding RESULT_PREFIX (anywhere in the
  line); everything else the reference prints (its op builds: "Setting up
  PyTorch plugin ...") is kept in `noise` and never parsed. A worker that
  gives no result within `timeout` seconds (start-up: `start_timeout`) is
  stopped with a `WorkerTimeout` naming the checkout and the time waited.

  `omp_wait_policy`: None leaves torch's default (as the reference's users
  run it; the environment's OMP_WAIT_POLICY, if any, passes through); else
  the value to set, e.g. 'PASSIVE' (helps torch on a CPU shared with other
  jobs, slows it on a quiet one). `info` records what the worker ran with.
  `argv` replaces the worker command (tests run a stand-in).
  """

  def __init__(self, ref_dir: str, spec: dict, python: str = sys.executable,
               timeout: float = 1800.0, start_timeout: float = 1800.0,
               omp_wait_policy: str = None, argv=None):
    self.ref_dir = ref_dir
    self.timeout = float(timeout)
    self.noise = []
    self._err = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ)
    if omp_wait_policy:
      env["OMP_WAIT_POLICY"] = omp_wait_policy
    self._proc = subprocess.Popen(
        argv or [python, os.path.abspath(__file__), "--reference", ref_dir,
                 "--spec", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
        env=env)
    # stdout in chunks, not lines: a build message without its newline
    # still shows in a timeout's message.
    self._chunks = queue.Queue()
    self._buf = ""

    def pump(fd, chunks):
      while True:
        chunk = os.read(fd, 65536)
        chunks.put(chunk.decode("utf-8", "replace") if chunk else None)
        if not chunk:
          return
    threading.Thread(target=pump, args=(self._proc.stdout.fileno(),
                                        self._chunks), daemon=True).start()
    self.info = self._read(start_timeout, "start-up (build, warm-up)")

  def _last_output(self) -> str:
    self._err.seek(0)
    return ("".join(self.noise[-5:]) + self._buf + "\n" +
            self._err.read()[-3000:])

  def _read(self, timeout: float, waiting_for: str) -> dict:
    t0 = time.monotonic()
    while True:
      while "\n" in self._buf:
        line, self._buf = self._buf.split("\n", 1)
        if RESULT_PREFIX not in line:
          self.noise.append(line + "\n")
          continue
        head, payload = line.split(RESULT_PREFIX, 1)
        if head.strip():
          self.noise.append(head + "\n")
        out = json.loads(payload)
        if "error" in out:
          raise RuntimeError(f"stylegan2-ada-pytorch worker: {out['error']}")
        return out
      try:
        chunk = self._chunks.get(
            timeout=max(timeout - (time.monotonic() - t0), 0.0))
      except queue.Empty:
        elapsed = time.monotonic() - t0
        self.kill()
        raise WorkerTimeout(
            f"the stylegan2-ada-pytorch worker (checkout {self.ref_dir}) gave "
            f"no result for {waiting_for} in {elapsed:.0f} s (limit "
            f"{timeout:.0f} s); stopped it. Its last output:\n"
            f"{self._last_output()}") from None
      if chunk is None:                     # the worker exited
        self._proc.wait()
        raise RuntimeError(
            f"the stylegan2-ada-pytorch worker (checkout {self.ref_dir}) "
            f"exited with status {self._proc.returncode} during "
            f"{waiting_for}:\n{self._last_output()}")
      self._buf += chunk

  def run(self, command: str, n: int):
    """(wall seconds, images, CPU seconds of the worker's threads)."""
    self._proc.stdin.write(f"{command} {int(n)}\n".encode())
    self._proc.stdin.flush()
    out = self._read(self.timeout, f"'{command} {int(n)}'")
    return out["seconds"], out["images"], out["cpu_seconds"]

  def kill(self):
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()

  def close(self):
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write(b"quit\n")
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
      except (OSError, ValueError, subprocess.TimeoutExpired):
        self.kill()


if __name__ == "__main__":
  main()
