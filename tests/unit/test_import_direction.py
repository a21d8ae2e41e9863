"""DESIGN.md's package order, held: a module imports only from its own level or the levels below it.

Every `import` counts, the lazy ones inside functions too (they are still dependencies), and so do
`importlib.import_module("dapeng.…")` calls and the "module:attr" strings registries load.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "dapeng"

# Lowest first. DESIGN.md's table, with the top-level helper modules placed where they belong.
LEVELS: list[tuple[str, ...]] = [
    # `config` holds the typed config models and imports nothing but errors; `__version__` is the
    # package root's one eager attribute (everything else there is a lazy "module:attr" string)
    ("errors", "records", "registry", "config", "_files", "_hardware", "_lazy", "__version__"),
    ("track",),
    ("layers",),
    ("models",),
    ("data",),
    ("tasks",),
    ("train",),
    ("hub",),
    ("explain", "compress"),
    ("pipeline",),
    ("runner",),
    ("serve", "cli"),
    ("__init__", "__main__"),
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}
# DESIGN.md: hub/ never imports train/, although train/ sits below it.
FORBIDDEN = {("hub", "train")}


def _part(module: str) -> str | None:
    """The package (or top-level module) of `dapeng.x.y` → "x"; None outside dapeng."""
    parts = module.split(".")
    if parts[0] != "dapeng":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "dapeng":
            found += [(node.lineno, f"dapeng.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"(dapeng(?:\.\w+)+)(?::\w+)?", node.value)
            if match:
                found.append((node.lineno, match.group(1)))
    return found


def _own_part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_package_has_a_level():
    parts = {_own_part(p) for p in SRC.rglob("*.py")}
    assert parts <= set(LEVEL), f"place these in LEVELS (and DESIGN.md): {sorted(parts - set(LEVEL))}"


def test_no_import_points_up():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        own = _own_part(path)
        for line, module in _imports(path):
            target = _part(module)
            if target is None or target == own or target not in LEVEL:
                continue
            if LEVEL[target] > LEVEL[own] or (own, target) in FORBIDDEN:
                bad.append(f"{path.relative_to(SRC.parent)}:{line} ({own}) imports {module} ({target})")
    assert not bad, "imports against DESIGN.md's order:\n" + "\n".join(bad)
