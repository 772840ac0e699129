"""What the tests share: the tiny GAN-DL (and ConvAE) configs (8x8 images,
16 feature maps), tiny synthetic shards (`make_shards`; conftest.py's
`tiny_shards` fixture) and `load_tool` for the scripts in tools/."""
import importlib.util
import os

from gandl_jax import config as config_lib
from gandl_jax.baselines.convae import config as convae_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
  """tools/NAME.py as a module, without leaving its absl flags defined: the
  CLIs' own tests import gandl_jax.cli modules in the same process, whose
  flags share names with a tool's (--batch), and absl refuses a second
  definition (DuplicateFlagError, depending on which tests share a worker)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "tools", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for flag in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, flag)
  return mod


def make_shards(root, resolution: int = 8, plates: int = 1,
                num_shards: int = 2, size: int = 32) -> str:
  """Synthetic RxRx19a (4 experiments x `plates` plates x 16 wells of
  SIZE x SIZE sites) under ROOT/raw, converted at `resolution` into
  ROOT/shards; returns the shards' glob."""
  from gandl_jax.data import convert, synthetic  # pylint: disable=import-outside-toplevel
  tree = synthetic.generate(os.path.join(root, "raw"), size=size,
                            plates=plates, wells_per_plate=16, seed=0)
  out = os.path.join(root, "shards")
  convert.convert("rxrx19a", tree, out, resolution, num_shards=num_shards)
  return os.path.join(out, "*.tfrecord")


def override(config, overrides):
  """Sets dotted keys, e.g. {'loss.r1_gamma': 2.0}; returns `config`."""
  for key, value in overrides.items():
    *parents, last = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
  return config


def _tiny_run(config, path: str) -> None:
  """The run both tiny configs share: data at `path`, batch 8, 4 iterations
  (0.032 kimg), checkpoints every 2, logs every 1, 2x2 image grids."""
  config.data.path = path
  config.data.shuffle_buffer = 16
  config.batch_size = 8
  config.total_kimg = 0.032
  config.checkpoint_every_kimg = 0.016
  config.log_every_kimg = 0.008
  config.image_grid_every_kimg = 0.016
  config.image_grid_size = 2


def tiny_config(path: str = "", **overrides):
  """Batch 8; 4 iterations (0.032 kimg), checkpoints every 2, logs every 1."""
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      resolution=8, z_dim=16, w_dim=16, channel_base=64, channel_max=16,
      mbstd_group_size=2)
  _tiny_run(config, path)
  config.loss.r1_gamma = 1.0
  config.ema.half_life_kimg = 0.01
  return override(config, overrides)


def train_config(path: str = "", **overrides):
  """`tiny_config` with both regularizers every 2 iterations (each runs
  twice in 4): the config the tests that train share, so that XLA's
  persistent cache compiles its phases once for the whole suite."""
  return tiny_config(path, **{"loss.r1_interval": 2, "loss.pl_interval": 2,
                              **overrides})


def tiny_convae_config(path: str = "", **overrides):
  """The ConvAE baseline at the same size: 8x8, 16 feature maps, a 16-d
  bottleneck; batch 8, 4 iterations, checkpoints every 2, logs every 1."""
  config = convae_config.base_config()
  config.model = convae_config.model_config(
      resolution=8, channel_base=64, channel_max=16, bottleneck_dim=16)
  _tiny_run(config, path)
  return override(config, overrides)
