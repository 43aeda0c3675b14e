"""The package's layout rules (docs/ARCHITECTURE.md), checked on the source.

- No module imports a private name from another family's module: what families share
  lives in shared modules (ops/_checks.py, ops/_linear.py, triton/_common.py, ...).
- The library never imports the application (pykernels.app); tests/app/test_cli.py checks
  the same at run time.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pykernels"
FAMILIES = {"linear_act", "linear_glu", "cross_entropy", "linear_cross_entropy", "attention"}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path):
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _imports(path, dotted):
    """(absolute module imported from, names) for every import statement of the module
    ``dotted`` whose source is ``path``."""
    package = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            yield source, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _family(dotted):
    last = dotted.rsplit(".", 1)[-1]
    return last if last in FAMILIES else None


def private_imports_across_families(path, dotted):
    """The private names ``dotted`` imports from another family's module."""
    own = _family(dotted)
    found = []
    for source, names in _imports(path, dotted):
        if _family(source) not in (None, own):
            found += [f"{source}.{n}" for n in names if n.startswith("_")]
    return found


def test_no_private_name_from_another_family():
    found = {_dotted(p): private_imports_across_families(p, _dotted(p)) for p in _modules()}
    assert {module: names for module, names in found.items() if names} == {}


# pykernels/__main__.py is the command line's entry (python -m pykernels), not the library.
LIBRARY = [p for p in _modules() if "app" not in p.parts and p.name != "__main__.py"]


def test_library_does_not_import_the_app():
    found = [(_dotted(p), source) for p in LIBRARY for source, _ in _imports(p, _dotted(p))
             if (source or "").startswith("pykernels.app")]
    assert found == []


def test_the_checker_finds_a_planted_violation(tmp_path):
    module = tmp_path / "linear_glu.py"
    module.write_text("from .linear_act import _rows, check_args\nfrom ._linear import rows\n")
    assert private_imports_across_families(module, "pykernels.ops.linear_glu") == [
        "pykernels.ops.linear_act._rows"]
    package_init = tmp_path / "__init__.py"
    package_init.write_text("from ..app import cli\n")
    assert [s for s, _ in _imports(package_init, "pykernels.models")] == ["pykernels.app"]
