"""The package imports downwards only: no import cycle between ddpo_jax's modules, counting the
imports inside functions too (they hide a cycle from Python, not from a reader), and no
project module imported inside a function (every dependency stated at the top)."""
import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "ddpo_jax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
  """{module: the ddpo_jax modules it imports anywhere in its body}."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
  modules = {_module_name(f): f for f in files}
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      for n in names:
        # `from ddpo_jax import train` imports the module ddpo_jax.algorithms.train; `from ddpo_jax.x
        # import f` imports ddpo_jax.x. Name the deepest module that exists.
        while n and n not in modules:
          n = n.rsplit(".", 1)[0] if "." in n else ""
        if n and n != name:
          targets.add(n)
    graph[name] = targets
  return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm: the components with more than one module (the import cycles)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_cycle():
  assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  graph = import_graph()
  assert "ddpo_jax.trainer.loop" in graph and "ddpo_jax.trainer.checkpoints" in graph["ddpo_jax.trainer.loop"]
  # a package's __init__ re-exporting its modules is not a cycle with them
  cycles = strongly_connected({m: {t for t in ts if not (m.startswith(t + ".") and
                                                         t == m.rsplit(".", 1)[0])}
                               for m, ts in graph.items()})
  assert not cycles, "import cycles (each list imports itself through its members): " + \
      "; ".join(" <-> ".join(c) for c in cycles)


def function_level_imports() -> list[str]:
  """"path:line" of every import of a ddpo_jax module below a module's top level."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
  found = []
  for path in sorted(files):
    tree = ast.parse(open(path).read(), path)
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
      if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else ["." if node.level else node.module or ""])
      if any(n == "." or n == "ddpo_jax" or n.startswith("ddpo_jax.") for n in names):
        found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
  return found


def test_no_function_level_imports_of_the_project():
  assert function_level_imports() == []


def test_the_function_level_import_finder_finds_one(tmp_path, monkeypatch):
  pkg = tmp_path / "ddpo_jax"
  pkg.mkdir()
  (pkg / "a.py").write_text("import os\nfrom ddpo_jax import b\n\ndef f():\n  from ddpo_jax import c\n"
                            "  import numpy\n\nclass K:\n  def g(self):\n    from . import d\n")
  monkeypatch.setattr(__import__(__name__), "PACKAGE", str(pkg))
  monkeypatch.setattr(__import__(__name__), "REPO", str(tmp_path))
  assert function_level_imports() == ["ddpo_jax/a.py:5", "ddpo_jax/a.py:10"]
