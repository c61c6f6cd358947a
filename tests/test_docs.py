"""The project documents its algorithms itself: citations resolve inside the repository."""
import os
import re

from conftest import REPO

ALGORITHMS = os.path.join(REPO, "docs", "algorithms.md")
CITED_DIRS = ("ddpo_jax", "launch", "benchmarks", "tests", "docs")
CITED_FILES = ("README.md",)


def _text_files():
  for name in CITED_FILES:
    path = os.path.join(REPO, name)
    if os.path.exists(path):
      yield path
  for top in CITED_DIRS:
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      for name in files:
        if name.endswith((".py", ".md", ".sh")):
          yield os.path.join(root, name)


def _sections():
  """Section numbers of docs/algorithms.md's headings ("## 3. ..." -> "3", "### 3.5 ..." ->
  "3.5")."""
  numbers = set()
  for line in open(ALGORITHMS, encoding="utf-8"):
    m = re.match(r"#{2,4} (\d+(?:\.\d+)*)\.? ", line)
    if m:
      numbers.add(m.group(1))
  return numbers


def test_every_algorithms_citation_names_an_existing_section():
  sections = _sections()
  assert {"1", "1.2", "3.5", "4", "4.3"} <= sections, sorted(sections)
  cited = {}
  for path in _text_files():
    text = open(path, encoding="utf-8").read()
    for m in re.finditer(r"docs/algorithms\.md §(\d+(?:\.\d+)*)", text):
      cited.setdefault(m.group(1), []).append(os.path.relpath(path, REPO))
  assert cited, "no file cites docs/algorithms.md"
  missing = {s: files for s, files in cited.items() if s not in sections}
  assert not missing, f"citations of sections docs/algorithms.md does not have: {missing}"


def test_no_citation_of_a_document_outside_the_repository():
  """Docstrings cite docs/algorithms.md, never the spec the project was built against."""
  this = os.path.abspath(__file__)
  offending = []
  for path in _text_files():
    if os.path.abspath(path) == this:
      continue
    for i, line in enumerate(open(path, encoding="utf-8"), 1):
      if re.search(r"\bSPEC(\.md)?\b( §| section)", line) or "shared/SPEC" in line:
        offending.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
  assert not offending, "\n".join(offending)


def test_every_test_that_docs_reliability_cites_exists():
  """docs/reliability.md names the test behind each guarantee: `tests/FILE.py::test_name`, or
  `::test_name` for another test of the file named last."""
  import ast
  text = open(os.path.join(REPO, "docs", "reliability.md"), encoding="utf-8").read()
  defined, cited, current = {}, [], None
  for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?", text):
    file, name = m.group(1), m.group(2)
    if file:
      current = file
      if file not in defined:
        tree = ast.parse(open(os.path.join(REPO, file), encoding="utf-8").read())
        defined[file] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if name:
      cited.append((current, name))
  assert len(cited) > 30, cited
  missing = [f"{f}::{n}" for f, n in cited if n not in defined[f]]
  assert not missing, missing
