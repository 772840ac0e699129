"""The package's imports run one way (docs/architecture.md)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gandl_jax"
# Layer of each top-level module/subpackage; a module may import only from
# its own layer or lower ones, and train/inference not from each other.
LAYERS = {
    "schema": 0, "config": 0, "sharding": 0, "io": 0, "images": 0,
    "progress": 0, "families": 0, "embeddings": 1, "checkpoint": 1,
    "model": 2, "data": 3,
    "evaluate": 3, "train": 4, "inference": 4, "interop": 4, "baselines": 4,
    "cli": 5,
}


def _unit(rel: pathlib.PurePosixPath) -> str:
  return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == "gandl_jax" or node.module.startswith("gandl_jax.")):
      parts = node.module.split(".")[1:]
      if parts:
        yield parts[0]
      else:
        for alias in node.names:
          yield alias.name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("gandl_jax."):
          yield alias.name.split(".")[1]


def test_imports_run_one_way():
  bad = []
  for path in PACKAGE.rglob("*.py"):
    rel = pathlib.PurePosixPath(path.relative_to(PACKAGE).as_posix())
    unit = _unit(rel)
    if unit == "__init__":
      continue
    for target in _imports(path):
      if target not in LAYERS or target == unit:
        continue
      if LAYERS[target] > LAYERS[unit] or (
          {unit, target} == {"train", "inference"}):
        bad.append(f"gandl_jax/{rel} imports gandl_jax.{target}")
  assert not bad, "imports that run up or sideways:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
  units = {_unit(pathlib.PurePosixPath(p.relative_to(PACKAGE).as_posix()))
           for p in PACKAGE.rglob("*.py")}
  assert units - {"__init__"} <= set(LAYERS), units - set(LAYERS)
