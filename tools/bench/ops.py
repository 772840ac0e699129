r"""The convolutions training spends its time in, per
formulation, and (with torch installed) the same op in PyTorch (oneDNN on
CPU), which is what stylegan2-ada-pytorch runs.

For each case: forward, forward + VJP (input and weight gradients), and the
second-order gradient R1 / the path-length penalty take (the gradient of
||d<conv(x, w), c>/dx||^2 with respect to x, w and c). Rounds alternate
between the formulations (and torch).

  python -m tools.bench.ops                       # configs/demo.py's shapes
  python -m tools.bench.ops --batch 16 --res 64 --channels 64,128
"""
import functools
import os

# As sg2ada_reference.py: PyTorch's OpenMP threads otherwise spin-wait
# and, on a loaded machine, stall (set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import lax

from gandl_jax.model import cpu_ops, layers
from tools.bench import harness

harness.define_flags(rounds=5, warmup=0)

_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_RES = flags.DEFINE_integer("res", 32, "Input resolution of the first case.")
_CHANNELS = flags.DEFINE_list(
    "channels", ["32", "64"], "C_in,C_out of the first downsampling conv "
    "(configs/demo.py's D at 32x32: 32 -> 64).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch if installed.")
DN = ("NHWC", "HWIO", "NHWC")


def _conv_im2col(x, w):
  """Stride-1 VALID correlation as one matmul over the k*k shifted windows
  (the im2col formulation, for comparison; slower on XLA:CPU)."""
  n, h, wd, c_in = x.shape
  kh, kw, _, c_out = w.shape
  oh, ow = h - kh + 1, wd - kw + 1
  cols = jnp.concatenate([x[:, i:i + oh, j:j + ow] for i in range(kh)
                          for j in range(kw)], axis=-1)
  return jnp.dot(cols.reshape(-1, kh * kw * c_in),
                 w.reshape(kh * kw * c_in, c_out)).reshape(n, oh, ow, c_out)


def _jax_cases(n, r, c_in, c_out):
  """{case: {formulation: (fn(x, w), x, w)}} at the given shapes."""
  key = jax.random.PRNGKey(0)
  kx, kw = jax.random.split(key)
  xp = jax.random.normal(kx, (n, r + 1, r + 1, c_in))    # FIR-padded input
  x = jax.random.normal(kx, (n, r, r, c_in))
  w3 = jax.random.normal(kw, (3, 3, c_in, c_out)) / np.sqrt(9 * c_in)
  # G's upsampling conv at this resolution: c_out -> c_in channels from
  # r/2 to r, as the polyphase 2x2 convolution on the pre-padded input.
  xu = jax.random.normal(kx, (n, r // 2 + 2, r // 2 + 2, c_out))
  w2 = jax.random.normal(kw, (2, 2, c_out, 4 * c_in)) / np.sqrt(4 * c_out)
  plain = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                                dimension_numbers=DN)
  return {
      f"3x3 stride-2 conv {n}x{r + 1}x{r + 1}x{c_in}->{c_out}": {
          "strided": (functools.partial(layers.strided_conv, stride=2),
                      xp, w3),
          "space-to-depth": (functools.partial(
              cpu_ops.strided_conv_space_to_depth, stride=2), xp, w3),
          "strided, s2d grads": (functools.partial(
              cpu_ops.strided_conv_s2d_grads, stride=2), xp, w3),
      },
      f"2x2 VALID conv (polyphase up) {n}x{r // 2 + 2}x{r // 2 + 2}x{c_out}"
      f"->{4 * c_in}": {
          "lax conv": (lambda x, w: lax.conv_general_dilated(
              x, w, (1, 1), "VALID", dimension_numbers=DN), xu, w2),
          "conv_valid": (cpu_ops.conv_valid, xu, w2)},
      f"3x3 conv {n}x{r}x{r}x{c_in}->{c_out}": {
          "plain": (plain, x, w3),
          "im2col matmul": (lambda x, w: _conv_im2col(
              jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), w), x, w3)},
  }


def _jax_modes(fn, x, w):
  """forward, vjp and second-order functions of `fn`, jitted."""
  out_shape = jax.eval_shape(fn, x, w).shape
  c = jax.random.normal(jax.random.PRNGKey(1), out_shape)

  def vjp(x, w):
    _, pull = jax.vjp(fn, x, w)
    return pull(c)

  def second(x, w):
    # Gradient of ||d<fn(x, w), c>/dx||^2 with respect to x, w and c (in a
    # network x and c depend on other layers' parameters).
    def penalty(x, w, c):
      return jnp.sum(jnp.square(jax.grad(lambda x: jnp.sum(fn(x, w) * c))(x)))
    return jax.grad(penalty, argnums=(0, 1, 2))(x, w, c)
  return {"forward": jax.jit(fn), "fwd+vjp": jax.jit(vjp),
          "2nd order": jax.jit(second)}


def _torch_cases(n, r, c_in, c_out):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  xp = torch.randn(n, c_in, r + 1, r + 1)
  x = torch.randn(n, c_in, r, r)
  w3 = torch.randn(c_out, c_in, 3, 3) / np.sqrt(9 * c_in)
  conv = torch.nn.functional.conv2d
  # The reference's upsampling conv: conv_transpose2d, stride 2, 3x3,
  # c_out -> c_in channels at r/2 (the op our polyphase 2x2 conv replaces).
  xu = torch.randn(n, c_out, r // 2, r // 2)
  wt = torch.randn(c_out, c_in, 3, 3) / np.sqrt(9 * c_out)
  cases = {
      f"2x2 VALID conv (polyphase up) {n}x{r // 2 + 2}x{r // 2 + 2}x{c_out}"
      f"->{4 * c_in}": (lambda x, w: torch.nn.functional.conv_transpose2d(
          x, w, stride=2), xu, wt),
      f"3x3 stride-2 conv {n}x{r + 1}x{r + 1}x{c_in}->{c_out}":
          (lambda x, w: conv(x, w, stride=2), xp, w3),
      f"3x3 conv {n}x{r}x{r}x{c_in}->{c_out}":
          (lambda x, w: conv(x, w, padding=1), x, w3)}
  out = {}
  for name, (fn, x, w) in cases.items():
    c = torch.randn(fn(x, w).shape)

    def forward(fn=fn, x=x, w=w):
      with torch.no_grad():
        return fn(x, w)

    def vjp(fn=fn, x=x, w=w, c=c):
      x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
      return torch.autograd.grad((fn(x, w) * c).sum(), [x, w])

    def second(fn=fn, x=x, w=w, c=c):
      x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
      c = c.clone().requires_grad_()
      (gx,) = torch.autograd.grad((fn(x, w) * c).sum(), [x],
                                  create_graph=True)
      return torch.autograd.grad(gx.square().sum(), [x, w, c],
                                 allow_unused=True)
    out[name] = {"forward": forward, "fwd+vjp": vjp, "2nd order": second}
  return out, torch


def main(argv):
  del argv
  n, r = _BATCH.value, _RES.value
  c_in, c_out = (int(c) for c in _CHANNELS.value)
  timers = {}   # (case, formulation, mode) -> callable running once
  for case, forms in _jax_cases(n, r, c_in, c_out).items():
    for form, (fn, x, w) in forms.items():
      for mode, f in _jax_modes(fn, x, w).items():
        jax.block_until_ready(f(x, w))   # compile
        timers[(case, f"jax {form}", mode)] = (
            lambda f=f, x=x, w=w: jax.block_until_ready(f(x, w)))
  torch_info = None
  if _TORCH.value:
    try:
      cases, torch = _torch_cases(n, r, c_in, c_out)
      torch_info = {"torch": torch.__version__,
                    "threads": torch.get_num_threads()}
      for case, modes in cases.items():
        for mode, f in modes.items():
          f()
          timers[(case, "torch", mode)] = f
    except ImportError:
      pass
  times = harness.alternate(timers, flags.FLAGS.rounds, flags.FLAGS.warmup)
  for (case, form, mode), t in times.items():
    harness.emit(f"{form} | {mode}", 1e3 * t.median, "ms",
                 {"case": case, "batch": n, "torch": torch_info}, timing=t)
    harness.say(f"{case:40s} {form:22s} {mode:10s} {1e3 * t.median:8.2f} ms")


if __name__ == "__main__":
  harness.run(main, "ops")
