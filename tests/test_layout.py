"""The package's import graph: no cycles, only downward imports, and no shard reader imports pack.

Every ``import``/``from ... import`` inside ``affectfast/`` counts, at module level and inside
functions alike (a function-level import hides a cycle from Python at run time, not from readers).
The layers are the ones README.md's layout section documents.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "affectfast"

# Lowest first; a module may import from its own layer (without a cycle) or any layer below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "constants", "tasks", "jpeg", "dist", "console", "batch", "safe_files"),
    ("affwild2", "shards", "config", "features"),
    ("pack", "verify", "synth", "stage"),
    ("loaders", "model", "losses", "metrics", "smoothing", "tuned", "sequence"),
    ("rundir", "train", "predict", "prediction_folder", "extract", "train_temporal", "temporal"),
    ("bench", "study", "doctor"),
    ("cli", "__main__"),
)
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}
# The only modules allowed to import the shard writer: the CLI that runs it, and doctor, which
# packs its own small synthetic tree when it is given no shards.
PACK_IMPORTERS = {"cli", "doctor"}


def module_name(path: Path) -> str:
    """``affectfast/loaders/dali.py`` -> ``loaders.dali``; a package's __init__ is the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every affectfast module ``path`` imports, anywhere in the file, without the prefix."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.startswith("affectfast."):
                found.add(name.removeprefix("affectfast."))
    return found


def layer(module: str) -> int:
    """The layer of a module; a subpackage's modules share the subpackage's layer."""
    return LAYER_OF[module.split(".")[0]]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = sorted(p for p in PACKAGE.rglob("*.py") if module_name(p) != "")
    return {module_name(p): imported_modules(p) for p in modules}


def test_every_module_has_a_layer(graph):
    unplaced = sorted(m for m in graph if m.split(".")[0] not in LAYER_OF)
    assert not unplaced, f"add these modules to LAYERS (and README's layout section): {unplaced}"


def test_imports_only_go_down_or_sideways(graph):
    upward = [
        f"{importer} (layer {layer(importer)}) imports {imported} (layer {layer(imported)})"
        for importer, imports in graph.items()
        for imported in imports
        if layer(imported) > layer(importer)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a closed path ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "open" while on the depth-first stack, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                cycle = path + [module]
                return cycle[cycle.index(imported) :] + [imported]
            if imported not in state and (cycle := visit(imported, path + [module])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_reader_of_shards_imports_the_writer(graph):
    # A subpackage's modules count as the subpackage (doctor.run is doctor).
    importers = {m.split(".")[0] for m, imports in graph.items() if "pack" in imports}
    assert importers <= PACK_IMPORTERS, f"{sorted(importers - PACK_IMPORTERS)} import pack"


def test_the_checks_catch_what_they_claim(tmp_path):
    """The parser sees function-level imports, and the cycle search finds a planted cycle."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from affectfast.pack import pack\n    import affectfast.train\n"
    )
    assert imported_modules(source) == {"pack", "train"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
