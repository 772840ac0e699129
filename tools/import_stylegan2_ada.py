"""Kept for old instructions: the importer is the `gandl-import` command
(gandl_jax/cli/import_weights.py; library: gandl_jax/interop/stylegan2_ada.py).

  python tools/import_stylegan2_ada.py --pkl SNAPSHOT.pkl --workdir DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gandl_jax.cli import import_weights  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  import_weights.run()
