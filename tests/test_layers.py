"""The tree's layering, as docs/ARCHITECTURE.md states it: lower layers never import higher
ones (at run time, function-level imports included), only the CLI imports the CLI, and no
module imports another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "omgtool"
# layer -> the omgtool packages it may import from (besides itself and the top-level modules)
ALLOWED = {
    "formats": set(),
    "kernels": set(),
    "plan": {"formats", "kernels"},
    "arch": {"formats", "kernels", "plan"},
    "ops": {"formats", "kernels", "plan", "arch"},
    "verify": {"formats", "kernels", "plan", "arch", "ops"},
}


def _imports(path: Path):
    """(module, names, line) of every import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("omgtool"):
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("omgtool"):
                    yield a.name, [], node.lineno


def test_layers_import_only_downwards():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = path.relative_to(ROOT).parts[0]
        for module, names, line in _imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else None
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {module}"
            if target == "cli" and layer != "cli":
                bad.append(where)
            elif layer in ALLOWED and target in ALLOWED and target != layer and target not in ALLOWED[layer]:
                bad.append(where)
            bad += [f"{where}.{n} (private)" for n in names if n.startswith("_") and n != "__version__"]
    assert bad == []
