"""fastbd's packages form layers, and imports point only downward (docs/design.md, "Layers").

A module may import its own package and packages of lower layers — never a higher layer or
another package of its own layer. Every import counts, the ones inside functions too. The
packages are also all installable: every folder of Python files is a package.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastbd"

LAYERS = [
    {"fastbd", "validation", "devices", "schedules", "distributed"},
    {"storage"},
    {"configfile"},
    {"kernels"},
    {"ops"},
    {"data"},
    {"models"},
    {"attacks"},
    {"eval", "report"},
    {"training"},
    {"detection", "clipdefense", "world"},
    {"poisoncam", "patchsearch", "ubt", "baselines", "density"},
    {"registry", "environment", "smoke"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The layering unit of a dotted module name: ``fastbd.X...`` → ``X`` (``fastbd`` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fastbd"


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "fastbd":
                found += [(node.lineno, f"fastbd.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "fastbd"]


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in SOURCES}
    assert units <= set(LAYER_OF), f"add to LAYERS: {sorted(units - set(LAYER_OF))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_downward(path):
    own = unit_of(module_name(path))
    upward = []
    for line, name in imports_of(path):
        target = unit_of(name)
        if target == own:
            continue
        if LAYER_OF[target] >= LAYER_OF[own]:
            upward.append(f"line {line}: {name} (layer {LAYER_OF[target]} ≥ {LAYER_OF[own]})")
    assert not upward, f"{path.relative_to(ROOT)} imports upward or sideways: {upward}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fastbd.cli import main\n    import fastbd.ubt.defend\n")
    assert [name for _, name in imports_of(bad)] == ["fastbd.cli", "fastbd.ubt.defend"]
    assert LAYER_OF[unit_of("fastbd.cli")] > LAYER_OF[unit_of("fastbd.data.bank")]


def test_every_folder_of_python_files_is_a_package():
    folders = {p.parent for p in SOURCES}
    assert [f for f in folders if not (f / "__init__.py").exists()] == []
