"""TFDS builder for RxRx19a (manual download), sharing the converter's reader.

For users who prefer `tfds build` over `gandl-convert`:

  tfds build gandl_jax/data/tfds_rxrx19a.py --config 256 \
      --manual_dir /data/RxRx19a

Sites are read, checked and area-resized by the same functions as
`gandl-convert` (`gandl_jax.data.reader`); each example holds the uint8 HWC
image and every metadata.csv column. Sites that cannot be read (missing
channel, corrupt or wrong-sized PNG, metadata row without images) are skipped
and each is logged as a warning with the file and the reason, followed by a
count. The training pipeline (`gandl_jax.data.pipeline`) reads gandl-convert
shards; TFDS output is for `tfds.load` users.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from gandl_jax.data import reader
from gandl_jax import io as gio
from gandl_jax import schema

_HOMEPAGE = "https://www.rxrx.ai/rxrx19a"
_RESOLUTIONS = (32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class Rxrx19aConfig(tfds.core.BuilderConfig):
  resolution: int = 256


class Rxrx19a(tfds.core.GeneratorBasedBuilder):
  """RxRx19a: 5-channel fluorescence images of SARS-CoV-2-infected cells."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "RxRx19a (August 2020 metadata), area-resized."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  RxRx19a (about 450 GB, CC-BY 4.0) must be downloaded by hand from
  https://www.rxrx.ai/rxrx19a: fetch the metadata and the images archive and
  unpack them so that `manual_dir` holds

    metadata.csv
    images/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png

  (`manual_dir` may also be the parent of an `RxRx19a/` folder). For a quick
  trial, `gandl-synth --output DIR` writes a synthetic tree in this layout at
  DIR/RxRx19a.
  """
  BUILDER_CONFIGS = [
      Rxrx19aConfig(name=str(r), resolution=r,
                    description=f"{r}x{r} pixels, 5 channels (w1-w5)")
      for r in _RESOLUTIONS
  ]
  DEFAULT_CONFIG_NAME = "256"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9's default resolves the path through the `importlib_resources`
    # backport, which is not installed on Python >= 3.9; the file is enough.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    feats = {schema.TFRECORD_IMAGE: tfds.features.Tensor(
        shape=(r, r, len(schema.RXRX19A_CHANNELS)), dtype=np.uint8)}
    for col in schema.RXRX19A_COLUMNS:
      kind = schema.column_type(col)
      feats[col] = (tfds.features.Text() if kind == "bytes" else
                    tfds.features.Scalar(np.int64 if kind == "int64" else np.float32))
    return self.dataset_info_from_configs(
        description="RxRx19a: HRCE and VERO cells, mock / UV-inactivated / "
        "active SARS-CoV-2, about 1,670 compounds; channels: " + ", ".join(
            f"w{c.index} {c.stain}" for c in schema.RXRX19A_CHANNELS),
        features=tfds.features.FeaturesDict(feats),
        homepage=_HOMEPAGE,
        citation="Cuccarese et al., Functional immune mapping with deep-learning "
        "enabled phenomics applied to immunomodulatory and COVID-19 drug "
        "discovery, bioRxiv 2020.08.02.233064",
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    if not gio.exists(gio.join(root, "metadata.csv")) and gio.exists(
        gio.join(root, "RxRx19a", "metadata.csv")):
      root = gio.join(root, "RxRx19a")
    return {"train": self._generate_examples(root)}

  def _generate_examples(self, root):
    yield from iter_examples(root, self.builder_config.resolution)


def iter_examples(root: str, resolution: int, channels=None):
  """(site_id, example dict) for every readable site, as the converter reads them."""
  channels = reader.check_channels("rxrx19a", channels)
  df = reader.read_metadata("rxrx19a", root)
  metas, failed = [], 0
  for row in df.to_dict("records"):
    try:
      metas.append(reader.parse_row(row, "rxrx19a"))
    except reader.SiteError as e:
      failed += 1
      logging.warning("skipping %s: %s", row.get("site_id", "?"), e.reason)
  size = reader.probe_source_size(root, metas, channels)
  for m in metas:
    r = reader.load_task((root, m, channels, resolution, size))
    if r.image is None:
      failed += 1
      logging.warning("skipping %s: %s (%s)", m["site_id"], r.error, r.path)
      continue
    ex = {schema.TFRECORD_IMAGE: r.image}
    ex.update({c: m[c] for c in schema.RXRX19A_COLUMNS})
    yield m["site_id"], ex
  if failed:
    logging.warning("%d RxRx19a sites could not be read (see warnings above)", failed)
