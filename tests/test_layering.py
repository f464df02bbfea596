"""Data flows one way: model -> IR -> passes -> MIL text + weights -> program -> backend. A module may import its
own layer and the layers below it, never one above (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import orion

#: Lowest first; ``errors`` and ``fileio`` sit below every package. ``serve`` (the HTTP server over models) sits
#: beside ``cli``, which starts it.
LAYERS = ["errors", "fileio", "ir", "mil", "compiler", "runtime", "lora", "models", "train", "serve", "cli"]
SOURCE = Path(orion.__file__).parent


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "orion" and parts[1] in LAYERS else None


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_no_layer_imports_a_higher_one():
    checked, wrong = 0, []
    for path in sorted(SOURCE.rglob("*.py")):
        own = layer_of("orion." + ".".join(path.relative_to(SOURCE).with_suffix("").parts))
        if own is None:
            continue  # orion/__init__.py: the package's front door (a lazy orion.load)
        for line, module in imports(path):
            theirs = layer_of(module)
            checked += theirs is not None
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(own):
                wrong.append(f"{path.relative_to(SOURCE)}:{line} ({own}) imports {module} ({theirs})")
    assert checked > 100  # the walk saw the package's imports
    assert not wrong, "\n".join(wrong)
