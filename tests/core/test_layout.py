"""The package's structure holds: imports only point down the layers, no import cycle
(imports inside functions count), at most 5 imports of jlora modules inside functions
(``cli.py`` aside), no module over 900 lines, and ``jlora.__all__`` is one list that
keeps every name of 0.1's public face.

The reference is the source itself, read with ``ast`` (nothing is imported to build the
graph), against the layer table of DESIGN.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jlora

PACKAGE = Path(jlora.__file__).resolve().parent

# DESIGN.md, "The layers": a module may import from its own layer or a lower one.
LAYERS = {
    "core": 1,
    "quant": 2,
    "layouts": 2,
    "name_maps": 2,
    "nodes": 3,
    "tree": 4,
    "io": 5,
    "adapters": 6,
    "transform": 7,
    "models": 8,  # beside the core: nothing below imports it
    "cli": 9,
    "": 9,  # jlora/__init__.py
}

# jlora.__all__ of 0.1.x: these names stay importable from jlora.
NAMES_0_1 = [
    "LoraConfig", "LoraWeight", "MultiLoraWeight", "Trainable", "KernelLayout", "wrap", "unload",
    "count_parameters", "print_trainable_parameters", "is_lora_tree", "lora_leaves", "lora", "explain",
    "LoraReport", "MaterializationWarning", "MaterializationError", "optimizer", "trainable_labels",
    "nnx_trainable", "partition", "combine", "merge", "merge_adapter", "unmerge_adapter", "add_adapter",
    "load_adapter", "set_adapter", "delete_adapter", "disable_adapter", "enable_adapter", "get_adapter",
    "adapter_names", "active_adapters", "adapter_ids", "add_weighted_adapter", "QuantConfig", "QuantizedArray",
    "quantize", "quantize_array", "dequantize", "save_quantized", "load_quantized", "save", "load", "save_peft",
    "load_peft", "hf", "name_maps", "default_target_modules",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool, int]]:
    """``(imported jlora module, inside a function, line)`` for each import in module ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(c) for c in ast.walk(node) if isinstance(c, (ast.Import, ast.ImportFrom)))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in MODULES and t != name:
                found.append((t, id(node) in in_function, node.lineno))
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_subpackage_has_a_layer():
    assert {_layer(m) for m in MODULES} <= set(LAYERS), sorted({_layer(m) for m in MODULES} - set(LAYERS))


def test_imports_point_down():
    up = [
        f"{m}:{line} imports {t} (layer {_layer(t)!r} is above {_layer(m)!r})"
        for m, edges in GRAPH.items() for t, _, line in edges
        if LAYERS[_layer(t)] > LAYERS[_layer(m)] and t != "jlora"
    ]
    assert not up, "\n".join(up)


def test_nothing_outside_models_imports_models():
    bad = [f"{m} imports {t}" for m, edges in GRAPH.items() for t, _, _ in edges
           if _layer(t) == "models" and _layer(m) not in ("models",)]
    assert not bad, bad


def test_no_import_cycle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_few_imports_inside_functions():
    inner = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() if m != "jlora.cli"
             for t, inside, line in edges if inside]
    assert len(inner) <= 5, "\n".join(inner)


def test_no_module_over_900_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 900}
    assert not long, long


def test_one_public_face():
    src = (PACKAGE / "__init__.py").read_text()
    tree = ast.parse(src)
    all_assignments = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))
                       and any(getattr(t, "id", None) == "__all__"
                               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
    assert len(all_assignments) == 1, "jlora/__init__.py defines __all__ more than once"
    imports = [i for i, n in enumerate(tree.body) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == list(range(imports[0], imports[0] + len(imports))), "one import block"
    missing = [n for n in NAMES_0_1 if not hasattr(jlora, n)]
    assert not missing, missing
    assert set(NAMES_0_1) <= set(jlora.__all__)
    assert all(hasattr(jlora, n) for n in jlora.__all__)


@pytest.mark.parametrize("sub", ["core", "quant", "layouts", "name_maps", "nodes", "tree", "io", "adapters", "transform"])
def test_subpackage_faces_are_short(sub):
    """Each subpackage's ``__init__`` only names what it exports (no code of its own)."""
    path = PACKAGE / sub / "__init__.py"
    tree = ast.parse(path.read_text())
    code = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign))]
    assert not code, [type(n).__name__ for n in code]
    assert len(path.read_text().splitlines()) <= 120
