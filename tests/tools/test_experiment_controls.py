"""tools/experiments/controls.py's arithmetic, against numpy closed forms."""
import numpy as np

from tiny import load_tool

controls = load_tool("experiments/controls")


def test_per_stain_features_embed_each_channel_alone_in_order():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 4, 4, 5), dtype=np.uint8)
  seen = []

  def embed(x):   # a nonlinear "network": features of every channel
    seen.append(x.copy())
    x = x.astype(np.float64)
    return np.concatenate([x.mean((1, 2)), np.sqrt(x).max((1, 2))], axis=1)

  out = controls.per_stain_features(embed, images)
  assert out.shape == (3, 5 * 10) and out.dtype == np.float32
  for c in range(5):
    # channel c alone: the others black (0), channel c untouched
    alone = seen[c]
    np.testing.assert_array_equal(alone[..., c], images[..., c])
    assert not np.delete(alone, c, axis=-1).any()
    np.testing.assert_allclose(out[:, 10 * c:10 * (c + 1)], embed(alone),
                               rtol=1e-6)


def test_reduce_dim_pca_equals_numpy_projection():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
  got = controls.reduce_dim(x, "pca", 3)
  xc = x - x.mean(0)
  evals, evecs = np.linalg.eigh(xc.T @ xc)
  top = evecs[:, ::-1][:, :3]
  # PCA scores up to the sign of each component
  for k in range(3):
    ref = xc @ top[:, k]
    assert min(np.abs(got[:, k] - ref).max(), np.abs(got[:, k] + ref).max()) < 1e-8
  # scores are uncorrelated with variances = the top eigenvalues
  np.testing.assert_allclose(np.sort(np.var(got, axis=0) * len(x))[::-1],
                             evals[::-1][:3], rtol=1e-8)
