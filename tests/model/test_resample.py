"""The slice-based FIR resampling (gandl_jax/model/layers.py) and the CPU
convolution forms (gandl_jax/model/cpu_ops.py: polyphase transposed
convolution, space-to-depth strided convolution, 1x1 convolution as a matrix
product, VALID convolution with its own gradients) against the formulations
they replaced:
depthwise `conv_general_dilated` for upfirdn2d, input dilation for the
transposed conv, a strided `conv_general_dilated` and a 1x1
`conv_general_dilated`, written out here as the reference. Values and
gradients (first and second order, as R1 and the path-length penalty need)
on random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gandl_jax.model import cpu_ops, layers

DN = ("NHWC", "HWIO", "NHWC")
FIR = layers.fir_filter()


def ref_upfirdn2d(x, f, up=1, down=1, pad=(0, 0), gain=1.0):
  """The previous definition: zero insertion and padding by lax.pad, then the
  (flipped) filter as a depthwise convolution with stride `down`."""
  c = x.shape[-1]
  f = np.asarray(f, np.float32)[::-1, ::-1] * gain
  p0, p1 = pad
  spatial = (p0, p1 + up - 1, up - 1)
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), spatial, spatial,
                                          (0, 0, 0)])
  kernel = jnp.asarray(np.tile(f[:, :, None, None], (1, 1, 1, c)), x.dtype)
  return lax.conv_general_dilated(x, kernel, (down, down), "VALID",
                                  dimension_numbers=DN, feature_group_count=c,
                                  precision=lax.Precision.HIGHEST)


def ref_transposed_conv(x, w, up):
  """torch's conv_transpose2d: correlation of the input-dilated x with the
  flipped kernel."""
  k = w.shape[0]
  return lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), [(k - 1, k - 1)] * 2,
                                  lhs_dilation=(up, up), dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


def ref_conv2d_resample(x, w, up=1, down=1, padding=0):
  """The previous conv2d_resample for the networks' cases."""
  conv = lambda y, k, s=1, p=0: lax.conv_general_dilated(
      y, k, (s, s), [(p, p)] * 2, dimension_numbers=DN,
      precision=lax.Precision.HIGHEST)
  k, fw = w.shape[0], FIR.shape[0]
  if down > 1:
    p0, p1 = padding + (fw - down + 1) // 2, padding + (fw - down) // 2
    if k == 1:
      return conv(ref_upfirdn2d(x, FIR, down=down, pad=(p0, p1)), w)
    return conv(ref_upfirdn2d(x, FIR, pad=(p0, p1)), w, s=down)
  p0 = padding + (fw + up - 1) // 2 - (k - 1)
  p1 = padding + (fw - up) // 2 - (k - up)
  return ref_upfirdn2d(ref_transposed_conv(x, w, up), FIR, pad=(p0, p1),
                       gain=up * up)


def _rand(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def _value_and_vjp(fn, args):
  """fn(*args) and its vjp with a fixed random cotangent, in one jit (one
  compilation instead of an eager dispatch per op)."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(_rand(99, out.shape))
  return jax.jit(run)(*args)


def _check_value_and_vjp(new, ref, args, atol):
  out_new, grads_new = _value_and_vjp(new, args)
  out_ref, grads_ref = _value_and_vjp(ref, args)
  assert out_new.shape == out_ref.shape
  np.testing.assert_allclose(out_new, out_ref, rtol=1e-5, atol=atol)
  for g_new, g_ref in zip(grads_new, grads_ref):
    np.testing.assert_allclose(g_new, g_ref, rtol=1e-5, atol=atol)


# (up, down, pad, gain): upsample2d (toRGB skip), downsample2d (D skip),
# the FIR before D's strided 3x3 conv, the FIR after G's transposed conv, a
# crop, and both resamplings with zero padding.
@pytest.mark.parametrize("up,down,pad,gain", [
    (2, 1, (2, 1), 4.0), (1, 2, (1, 1), 1.0), (1, 1, (2, 2), 1.0),
    (1, 1, (1, 1), 4.0), (1, 1, (-1, 2), 1.0), (2, 1, (0, 0), 4.0),
    (1, 2, (0, 0), 1.0), (3, 1, (1, 2), 9.0)])
def test_upfirdn2d_equals_depthwise_conv_definition(up, down, pad, gain):
  x = _rand(0, (2, 9, 9, 3))
  f = lambda x: layers.upfirdn2d(x, FIR, up=up, down=down, pad=pad, gain=gain)
  r = lambda x: ref_upfirdn2d(x, FIR, up=up, down=down, pad=pad, gain=gain)
  _check_value_and_vjp(f, r, (x,), atol=1e-5)


def test_upfirdn2d_non_separable_filter_and_gradients():
  f2 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, 4)))
  assert layers.separable_factors(f2) is None
  x = _rand(1, (2, 7, 7, 2))
  for up, down, pad in [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (0, -1))]:
    _check_value_and_vjp(
        lambda x: layers.upfirdn2d(x, f2, up=up, down=down, pad=pad),
        lambda x: ref_upfirdn2d(x, f2, up=up, down=down, pad=pad), (x,),
        atol=1e-5)


def test_separable_factors_are_exact_for_the_binomial_filter():
  a, b = layers.separable_factors(FIR * 4.0)
  np.testing.assert_array_equal(a, [0.25, 0.75, 0.75, 0.25])
  np.testing.assert_array_equal(b, [0.25, 0.75, 0.75, 0.25])
  a, b = layers.separable_factors(-FIR)
  np.testing.assert_allclose(np.outer(a, b), -FIR)


@pytest.mark.parametrize("k,up", [(3, 2), (1, 2), (4, 2), (3, 3)])
def test_polyphase_transposed_conv_equals_input_dilation(k, up):
  x, w = _rand(2, (2, 5, 5, 3)), _rand(3, (k, k, 3, 4))
  new = lambda x, w: cpu_ops.transposed_conv_polyphase(x, w, up)
  _check_value_and_vjp(new, lambda x, w: ref_transposed_conv(x, w, up),
                       (x, w), atol=1e-4)


def ref_strided_conv(x, w, stride):
  """The strided VALID convolution space-to-depth replaces on CPU."""
  return lax.conv_general_dilated(x, w, (stride, stride), "VALID",
                                  dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


# (k, stride, input size): D's conv1 (3x3, stride 2 on the FIR-padded odd
# size), an even size that needs a crop, 1x1 and 4x4 kernels, stride 3.
@pytest.mark.parametrize("k,stride,size", [(3, 2, 9), (3, 2, 8), (1, 2, 8),
                                           (4, 2, 9), (3, 3, 10)])
def test_space_to_depth_conv_equals_strided_conv(k, stride, size):
  x, w = _rand(10, (2, size, size, 3)), _rand(11, (k, k, 3, 4))
  new = lambda x, w: cpu_ops.strided_conv_space_to_depth(x, w, stride)
  ref = lambda x, w: ref_strided_conv(x, w, stride)
  _check_value_and_vjp(new, ref, (x, w), atol=1e-4)

  # Second order (R1's structure): d/dw of ||d<out, c>/dx||^2.
  c = _rand(12, jax.eval_shape(ref, x, w).shape)
  def penalty(fn):
    gx = lambda w: jax.grad(lambda x: jnp.sum(fn(x, w) * c))(x)
    return lambda w: jnp.sum(jnp.square(gx(w)))
  np.testing.assert_allclose(jax.jit(jax.grad(penalty(new)))(w),
                             jax.jit(jax.grad(penalty(ref)))(w), rtol=1e-4,
                             atol=1e-3)


def _penalty_grad(fn, x, w, c):
  """d/dw of ||d<fn(x, w), c>/dx||^2 (R1's structure), jitted."""
  gx = lambda w: jax.grad(lambda x: jnp.sum(fn(x, w) * c))(x)
  return jax.jit(jax.grad(lambda w: jnp.sum(jnp.square(gx(w)))))(w)


@pytest.mark.parametrize("k,stride,size", [(3, 2, 9), (3, 2, 8)])
def test_strided_conv_s2d_grads_equals_strided_conv(k, stride, size):
  x, w = _rand(16, (2, size, size, 3)), _rand(17, (k, k, 3, 4))
  new = lambda x, w: cpu_ops.strided_conv_s2d_grads(x, w, stride)
  ref = lambda x, w: ref_strided_conv(x, w, stride)
  _check_value_and_vjp(new, ref, (x, w), atol=1e-4)
  c = _rand(18, jax.eval_shape(ref, x, w).shape)
  np.testing.assert_allclose(_penalty_grad(new, x, w, c),
                             _penalty_grad(ref, x, w, c), rtol=1e-4,
                             atol=1e-3)


@pytest.mark.parametrize("k", [2, 3])
def test_conv_valid_equals_valid_convolution(k):
  x, w = _rand(19, (2, 7, 6, 3)), _rand(20, (k, k, 3, 4))
  ref = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=DN,
      precision=lax.Precision.HIGHEST)
  _check_value_and_vjp(cpu_ops.conv_valid, ref, (x, w), atol=1e-4)
  c = _rand(21, jax.eval_shape(ref, x, w).shape)
  np.testing.assert_allclose(_penalty_grad(cpu_ops.conv_valid, x, w, c),
                             _penalty_grad(ref, x, w, c), rtol=1e-4,
                             atol=1e-3)


# (c_in, c_out): D's fromRGB (5 image channels in), G's toRGB (5 out), and a
# skip connection's shape.
@pytest.mark.parametrize("c_in,c_out", [(5, 4), (4, 5), (3, 6)])
def test_pointwise_conv_equals_1x1_convolution(c_in, c_out):
  x, w = _rand(13, (2, 6, 7, c_in)), _rand(14, (1, 1, c_in, c_out))
  ref = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=DN,
      precision=lax.Precision.HIGHEST)
  _check_value_and_vjp(cpu_ops.pointwise_conv, ref, (x, w), atol=1e-4)
  # conv2d_resample routes unresampled 1x1 kernels through it.
  _check_value_and_vjp(lambda x, w: layers.conv2d_resample(x, w), ref,
                       (x, w), atol=1e-4)
  # Second order (R1's structure): d/dw of ||d<out, c>/dx||^2.
  c = _rand(15, (2, 6, 7, c_out))
  def penalty(fn):
    gx = lambda w: jax.grad(lambda x: jnp.sum(fn(x, w) * c))(x)
    return lambda w: jnp.sum(jnp.square(gx(w)))
  new = penalty(cpu_ops.pointwise_conv)
  np.testing.assert_allclose(jax.jit(jax.grad(new))(w),
                             jax.jit(jax.grad(penalty(ref)))(w), rtol=1e-4,
                             atol=1e-3)


@pytest.mark.parametrize("k,up,down", [(3, 2, 1), (3, 1, 2), (1, 1, 2)])
def test_conv2d_resample_equals_previous_definition(k, up, down):
  x, w = _rand(4, (2, 8, 8, 3)), _rand(5, (k, k, 3, 4))
  new = lambda x, w: layers.conv2d_resample(x, w, FIR, up=up, down=down,
                                            padding=k // 2)
  ref = lambda x, w: ref_conv2d_resample(x, w, up=up, down=down,
                                         padding=k // 2)
  _check_value_and_vjp(new, ref, (x, w), atol=1e-4)


@pytest.mark.parametrize("up,down", [(2, 1), (1, 2)])
def test_second_order_gradients_match(up, down):
  # d/dw of ||d<out, c>/dx||^2: the R1 / path-length structure.
  x, w = _rand(6, (2, 8, 8, 3)), _rand(7, (3, 3, 3, 4))
  def penalty(fn):
    def total(x, w):
      return jnp.sum(fn(x, w) * _rand(8, fn(x, w).shape))
    return lambda w: jnp.sum(jnp.square(jax.grad(total)(x, w)))
  new = penalty(lambda x, w: layers.conv2d_resample(x, w, FIR, up=up,
                                                    down=down, padding=1))
  ref = penalty(lambda x, w: ref_conv2d_resample(x, w, up=up, down=down,
                                                 padding=1))
  np.testing.assert_allclose(jax.jit(jax.grad(new))(w),
                             jax.jit(jax.grad(ref))(w), rtol=1e-4,
                             atol=1e-3)


def test_bfloat16_keeps_dtype_and_filters_in_float32():
  x = _rand(9, (1, 8, 8, 2))
  got = layers.upfirdn2d(x.astype(jnp.bfloat16), FIR, up=2, pad=(2, 1),
                         gain=4.0)
  assert got.dtype == jnp.bfloat16
  want = ref_upfirdn2d(x.astype(jnp.bfloat16).astype(jnp.float32), FIR, up=2,
                       pad=(2, 1), gain=4.0)
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=1e-2,
                             atol=1e-2)
