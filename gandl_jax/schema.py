"""The one place for dataset facts: channels, metadata columns, vocabularies.

Everything here is taken from Recursion's public dataset documentation for
RxRx19a and RxRx1 (see README, "Data"). Other modules import these names; no
other module spells a channel name or a metadata column by hand.
"""
from __future__ import annotations

import dataclasses
import re
from typing import List, Tuple


@dataclasses.dataclass(frozen=True)
class Channel:
  index: int          # the `w{index}` suffix in file names (1-based)
  stain: str          # the dye
  target: str         # what it labels
  short: str          # a short name for plots and column prefixes


# RxRx19a: five channels, w1..w5.
RXRX19A_CHANNELS: Tuple[Channel, ...] = (
    Channel(1, "Hoechst 33342", "nucleus", "hoechst"),
    Channel(2, "Concanavalin A", "endoplasmic reticulum", "cona"),
    Channel(3, "Phalloidin", "actin", "phalloidin"),
    Channel(4, "Syto14", "nucleoli / cytoplasmic RNA", "syto14"),
    Channel(5, "Wheat germ agglutinin", "Golgi / plasma membrane", "wga"),
)

# RxRx1: the same five, plus MitoTracker as w6 (dropped to feed a 5-channel model).
RXRX1_CHANNELS: Tuple[Channel, ...] = RXRX19A_CHANNELS + (
    Channel(6, "MitoTracker Deep Red", "mitochondria", "mitotracker"),
)

CHANNELS = {"rxrx19a": RXRX19A_CHANNELS, "rxrx1": RXRX1_CHANNELS}

# Any Cell Painting set described by a CellProfiler LoadData CSV
# (gandl-convert --dataset loaddata): one FileName_<name> / PathName_<name>
# column pair per channel, the channel's name being the suffix. The five
# channels of the Cell Painting protocol (Bray et al. 2016, Nat. Protoc.;
# Cimini et al. 2023, the JUMP version) under the names JUMP's load_data_csv
# files use. Other names keep their name as stain.
LOADDATA = "loaddata"
CELL_PAINTING_STAINS = {   # name -> (stain, target, short as in RxRx's)
    "OrigDNA": ("Hoechst 33342", "nucleus", "hoechst"),
    "OrigER": ("Concanavalin A", "endoplasmic reticulum", "cona"),
    "OrigRNA": ("SYTO 14", "nucleoli / cytoplasmic RNA", "syto14"),
    "OrigAGP": ("Phalloidin + Wheat germ agglutinin",
                "actin, Golgi / plasma membrane", "phalloidin"),
    "OrigMito": ("MitoTracker Deep Red", "mitochondria", "mitotracker"),
}
JUMP_CHANNELS: Tuple[str, ...] = ("OrigDNA", "OrigER", "OrigRNA", "OrigAGP",
                                  "OrigMito")
# LoadData CSV columns: the per-channel prefixes, and the columns read as our
# plate / well / site (first one present wins; plate and well are required).
LOADDATA_FILE_PREFIX = "FileName_"
LOADDATA_PATH_PREFIX = "PathName_"
LOADDATA_FRAME_PREFIX = "Frame_"     # page of a multi-page file (0-based)
LOADDATA_METADATA_PREFIX = "Metadata_"
LOADDATA_KEY_COLUMNS = {
    "plate": ("Metadata_Plate", "Metadata_plate", "plate"),
    "well": ("Metadata_Well", "Metadata_well", "well"),
    "site": ("Metadata_Site", "Metadata_site", "Metadata_Field", "site"),
}

# Default channel selection when RxRx1 feeds a model trained on RxRx19a.
RXRX1_DEFAULT_CHANNELS: Tuple[int, ...] = (1, 2, 3, 4, 5)

# metadata.csv columns, in the published order.
RXRX19A_COLUMNS: Tuple[str, ...] = (
    "site_id", "well_id", "cell_type", "experiment", "plate", "well", "site",
    "disease_condition", "treatment", "treatment_conc", "SMILES",
)
RXRX1_COLUMNS: Tuple[str, ...] = (
    "site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well",
    "site", "well_type", "sirna", "sirna_id",
)
# A LoadData set's records: these, then the CSV's other Metadata_* columns
# under their own names (text). `plate` is text there (plate barcodes).
LOADDATA_COLUMNS: Tuple[str, ...] = ("site_id", "well_id", "plate", "well",
                                     "site")
COLUMNS = {"rxrx19a": RXRX19A_COLUMNS, "rxrx1": RXRX1_COLUMNS,
           LOADDATA: LOADDATA_COLUMNS}

# Integer-valued metadata columns (everything else is text; `treatment_conc` is float).
INT_COLUMNS = frozenset({"plate", "site", "sirna_id"})
FLOAT_COLUMNS = frozenset({"treatment_conc"})

# RxRx19a vocabularies.
RXRX19A_CELL_TYPES: Tuple[str, ...] = ("HRCE", "VERO")
RXRX19A_EXPERIMENTS: Tuple[str, ...] = ("HRCE-1", "HRCE-2", "VERO-1", "VERO-2")
RXRX19A_SITES: Tuple[int, ...] = (1, 2, 3, 4)
MOCK = "Mock"
UV_INACTIVATED = "UV Inactivated SARS-CoV-2"
ACTIVE = "Active SARS-CoV-2"
DISEASE_CONDITIONS: Tuple[str, ...] = (MOCK, UV_INACTIVATED, ACTIVE)

# RxRx1 vocabularies.
RXRX1_CELL_TYPES: Tuple[str, ...] = ("HEPG2", "HUVEC", "RPE", "U2OS")
RXRX1_WELL_TYPES: Tuple[str, ...] = ("treatment", "negative_control",
                                     "positive_control")
RXRX1_SITES: Tuple[int, ...] = (1, 2)

# Native image sizes of the public releases.
NATIVE_RESOLUTION = {"rxrx19a": 1024, "rxrx1": 512}


# Site and well ids join their fields with "_". A field holding "_" or "%"
# has them percent-encoded ("%" -> "%25", "_" -> "%5F"), so an id names one
# tuple of fields whatever the plate and well names: plate "BR_X", well "A01"
# gives "BR%5FX_A01_1", plate "BR", well "X_A01" gives "BR_X%5FA01_1". Fields
# without either character are unchanged, so RxRx19a / RxRx1 ids are exactly
# Recursion's (their published embeddings join on them). `split_id` decodes.
_ID_ESCAPES = {"%": "%25", "_": "%5F"}
_ID_UNESCAPE = re.compile(r"%(25|5F)")


def id_field(value: object) -> str:
  """One field of a site or well id, "%" and "_" percent-encoded."""
  text = str(value)
  if "%" in text or "_" in text:
    text = "".join(_ID_ESCAPES.get(c, c) for c in text)
  return text


def join_id(*fields: object) -> str:
  """The one builder of site and well ids: the encoded fields joined by "_"."""
  return "_".join(id_field(f) for f in fields)


def split_id(text: str) -> List[str]:
  """The fields of an id built by `join_id`, decoded."""
  return [decode_id_field(p) for p in str(text).split("_")]


def decode_id_field(text: str) -> str:
  """Undoes `id_field` ("%5F" -> "_", "%25" -> "%")."""
  return _ID_UNESCAPE.sub(lambda m: "_" if m.group(1) == "5F" else "%", text)


def site_id(experiment: str, plate: int, well: str, site: int) -> str:
  """`{experiment}_{plate}_{well}_{site}`, as in metadata.csv (fields
  encoded by `id_field`)."""
  return join_id(experiment, plate, well, site)


def well_id(experiment: str, plate: int, well: str) -> str:
  """`{experiment}_{plate}_{well}`, as in metadata.csv (`id_field`)."""
  return join_id(experiment, plate, well)


def loaddata_site_id(plate: str, well: str, site: int) -> str:
  """A LoadData site's id: `{plate}_{well}_{site}` (fields encoded by
  `id_field`). Three fields, not RxRx's four: readers that parse RxRx ids
  (gandl_jax/evaluate/io.py) take LoadData ids as opaque keys; the plate,
  well and site travel in their own columns."""
  return join_id(plate, well, site)


def loaddata_well_id(plate: str, well: str) -> str:
  """A LoadData well's id: `{plate}_{well}` (`id_field`)."""
  return join_id(plate, well)


def image_relpath(experiment: str, plate: int, well: str, site: int,
                  channel: int) -> str:
  """Path of one channel PNG below `images/`, e.g. `HRCE-1/Plate1/AA02_s2_w3.png`."""
  return f"{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png"


# TFRecord shards written by gandl-convert (gandl_jax/data/convert.py) and read
# by gandl_jax/data/pipeline.py. One tf.train.Example per site:
#   image                      bytes: raw uint8 array, row-major H x W x C
#   height, width, channels    int64: its shape
#   every metadata.csv column  int64 (INT_COLUMNS), float (FLOAT_COLUMNS; NaN
#                              when empty) or bytes (UTF-8 text, may be empty)
TFRECORD_IMAGE = "image"
TFRECORD_SHAPE: Tuple[str, ...] = ("height", "width", "channels")
DATASET_INFO_FILE = "dataset_info.json"   # next to the shards
SYNTHETIC_TRUTH_FILE = "synthetic_truth.csv"  # planted truth, gandl-synth's tree root
SITES_INDEX_FILE = "sites.csv"            # next to the shards: shard, position, metadata
# A TFDS dataset directory (gandl_jax/data/tfds_builder.py) holds TFDS's
# features.json, and the DATASET_INFO_FILE fields in TFDS's metadata.json
# (TFDS owns the name dataset_info.json there).
TFDS_FEATURES_FILE = "features.json"
TFDS_METADATA_FILE = "metadata.json"


def column_type(column: str, dataset: str = "") -> str:
  """TFRecord type of a metadata column: "int64", "float" or "bytes".

  In a LoadData set only `site` is a number; plates are barcodes and the
  carried Metadata_* columns text.
  """
  if dataset == LOADDATA:
    return "int64" if column == "site" else "bytes"
  if column in INT_COLUMNS:
    return "int64"
  if column in FLOAT_COLUMNS:
    return "float"
  return "bytes"
