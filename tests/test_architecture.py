"""The layers drawn in docs/architecture.md are the code's: every import inside the package points
to the same layer or one below it, in the order of the page's layer table."""
import ast
import os
import re

from conftest import REPO

PACKAGE = os.path.join(REPO, "ddpo_jax")


def _layers() -> list[tuple[str, list[str]]]:
  """[(layer name, [module prefixes below ddpo_jax])], top layer first, from the page's table
  (rows "| `name` | `prefix`, `prefix` | ... |" between the markers)."""
  text = open(os.path.join(REPO, "docs", "architecture.md")).read()
  table = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
  rows = []
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) < 2 or not cells[0].startswith("`"):
      continue
    rows.append((cells[0].strip("`"), re.findall(r"`([\w./]+)`", cells[1])))
  return rows


def _layer_of(module: str, layers) -> int:
  """Index in `layers` (0 = top) of a dotted module below ddpo_jax, by its longest prefix."""
  best, best_len = None, -1
  for i, (_, prefixes) in enumerate(layers):
    for p in prefixes:
      p = p.rstrip("/").replace("/", ".").removesuffix(".py")
      if (module == p or module.startswith(p + ".")) and len(p) > best_len:
        best, best_len = i, len(p)
  assert best is not None, f"ddpo_jax.{module} is in no layer of docs/architecture.md"
  return best


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), PACKAGE)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__") if rel != "__init__" else ""] = os.path.join(root, f)
  return out


def _imports(path: str, modules) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if not name.startswith("ddpo_jax."):
        continue
      name = name[len("ddpo_jax."):]
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name:
        found.add(name)
  return found


def test_every_import_points_down_the_drawn_layers():
  layers = _layers()
  assert [name for name, _ in layers][:2] == ["cli", "trainer"] and len(layers) >= 8, layers
  modules = _modules()
  upward = []
  for module, path in sorted(modules.items()):
    if not module:
      continue
    mine = _layer_of(module, layers)
    for target in sorted(_imports(path, modules) - {module}):
      if _layer_of(target, layers) < mine:
        upward.append(f"ddpo_jax.{module} ({layers[mine][0]}) imports ddpo_jax.{target} "
                      f"({layers[_layer_of(target, layers)][0]})")
  assert not upward, "imports running back up the layers:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
  """The check can fail: an import of the trainer from a numerics module is reported."""
  layers = _layers()
  modules = {**_modules(), "numerics.probe": str(tmp_path / "probe.py")}
  (tmp_path / "probe.py").write_text("from ddpo_jax.trainer import loop\n")
  assert "trainer.loop" in _imports(modules["numerics.probe"], modules)
  assert _layer_of("trainer.loop", layers) < _layer_of("numerics.probe", layers)
