"""gandl_jax.io: the only atomic writer, and the rule that keeps it the only one."""
import ast
import os
import pathlib

import pytest

from gandl_jax import io as gio

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gandl_jax"
# Calls that make "a temporary file, then rename" writer. Only gandl_jax/io.py
# may use them; the checkpointer renames whole Orbax step directories aside.
_WRITER_CALLS = {"replace", "rename", "mkstemp", "NamedTemporaryFile",
                 "mkdtemp"}
_ALLOWED = {("train/checkpointer.py", "rename")}


def _calls(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      base = node.func.value
      # os.replace / Path.rename / tempfile.mkstemp / gfile.rename; not
      # str.replace (receiver is a string constant or a name of a string)
      if node.func.attr not in _WRITER_CALLS or isinstance(base, ast.Constant):
        continue
      # DataFrame.rename(columns=...) / Series.rename("x") are not file moves:
      # a file rename takes a destination variable and no pandas keywords.
      if node.func.attr == "rename" and (
          {k.arg for k in node.keywords} & {"columns", "index", "axis",
                                            "mapper", "inplace"} or
          (node.args and isinstance(node.args[0], ast.Constant))):
        continue
      yield node.func.attr, node.lineno, ast.unparse(node.func)


def test_no_second_atomic_writer():
  found = []
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE).as_posix()
    if rel == "io.py":
      continue
    for attr, line, text in _calls(path):
      if attr == "replace" and not text.startswith(("os.", "shutil.")):
        continue   # str.replace / DataFrame.replace
      if (rel, attr) in _ALLOWED:
        continue
      found.append(f"gandl_jax/{rel}:{line}: {text}(...)")
  assert not found, ("write files through gandl_jax.io (atomic_path / "
                     "atomic_write), not another temp-then-rename:\n" +
                     "\n".join(found))


def test_atomic_write_publishes_whole_files_only(tmp_path):
  path = str(tmp_path / "sub" / "out.json")
  gio.write_json(path, {"a": 1})
  assert gio.read_text(path) == '{\n  "a": 1\n}\n'
  with pytest.raises(RuntimeError):
    def boom(f):
      f.write("half")
      raise RuntimeError("killed")
    gio.atomic_write(path, boom)
  assert gio.read_text(path) == '{\n  "a": 1\n}\n'   # old file untouched
  assert os.listdir(tmp_path / "sub") == ["out.json"]  # no temp left


def test_atomic_path_keeps_extension_and_permissions(tmp_path):
  path = tmp_path / "x.npz"
  with gio.atomic_path(str(path)) as tmp:
    assert tmp.endswith(".npz") and os.path.basename(tmp).startswith(".x.npz.tmp-")
    assert pathlib.Path(tmp).match(gio.tmp_glob("x.npz"))
    pathlib.Path(tmp).write_bytes(b"1")
  umask = os.umask(0)
  os.umask(umask)
  assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_remote_helpers():
  assert gio.is_remote("gs://b/x") and not gio.is_remote("/tmp/x")
  assert gio.join("gs://b/", "/d/", "f") == "gs://b/d/f"
  assert gio.join("/a", "b") == os.path.join("/a", "b")
  assert gio.absolute("gs://b/x") == "gs://b/x"


def test_append_line(tmp_path):
  p = str(tmp_path / "m.jsonl")
  gio.append_line(p, "1")
  gio.append_line(p, "2\n")
  assert gio.read_text(p) == "1\n2\n"
