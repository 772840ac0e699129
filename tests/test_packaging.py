"""setup.py's extras install what they name with any pip."""
import ast
import os
import re

from tiny import REPO


def _extras():
  tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
      return [k.value for k in node.value.keys]
  raise AssertionError("setup.py has no extras_require")


def test_extra_names_are_the_same_before_and_after_normalization():
  # setuptools writes "a_b" as "a-b"; pip < 23.3 (Python 3.11's venv) then
  # finds no extra "a_b", warns and installs nothing of it.
  extras = _extras()
  assert {"test", "beam", "import", "tpu"} <= set(extras)
  for name in extras:
    assert re.fullmatch(r"[a-z0-9]+", name), (
        f"extra {name!r}: use lowercase letters and digits only")
