"""Every import in eaft_megatron goes downward: the package's floors, and no circles.

    python -m pytest -q tests/test_layers.py

The source is parsed (``ast``), nothing is imported, so the check costs milliseconds and sees
every import: at the top of a module and inside functions (lazy imports count, they are edges
of the same graph). Three rules:

1. A subpackage (or top-level module) imports only from its own floor or the floors below
   (:data:`FLOORS`, bottom first). Two packages on one floor must not import each other.
2. No cycle between subpackages (implied by 1 for different floors; checked directly, so a
   floor holding two packages cannot hide one).
3. No cycle between the modules of one subpackage, except the back edges listed with their
   reason in :data:`ALLOWED_BACK_EDGES` (a lazy import inside a function, by design).

``eaft_megatron/__init__.py`` and ``__main__.py`` are the front door: they may import anything.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eaft_megatron"

# Bottom first. A package may import from its own floor's modules only within itself.
FLOORS: list[set[str]] = [
    {"paths", "progress", "plots"},  # files, progress lines, pictures: no torch, no megatron
    {"compat"},                 # the patcher, megatron-core on CPU, child processes
    {"ops"},                    # the loss maths
    {"models"},                 # architectures, HF <-> Megatron tables
    {"checkpoint"},             # layout, safe loading, torch_dist I/O
    {"convert", "data"},        # checkpoint conversion; preprocessing and datasets
    {"megatron"},               # the loss wired into Megatron-Core / Megatron-LM
    {"train"},                  # the trainer (Megatron-LM's pretrain loop)
    {"demo"},                   # the end-to-end demo
    {"cli"},                    # the console command
]
FRONT_DOOR = {"__init__", "__main__"}

# (importer, imported): why a function-level import back up the module graph is by design.
ALLOWED_BACK_EDGES: dict[tuple[str, str], str] = {
    ("eaft_megatron.models.spec", "eaft_megatron.models.registry"):
        "the registry imports every architecture table, each built from spec's classes; "
        "spec's look-up by architecture name imports the registry when called",
    ("eaft_megatron.models.layers", "eaft_megatron.models.hybrid"):
        "the DeltaNet hybrid block spec builds on layers' helpers; layers' block spec hands "
        "a hybrid model (layer_types) over to it when called",
    ("eaft_megatron.ops.vocab_parallel", "eaft_megatron.ops.triton_eaft"):
        "the Triton kernels build on vocab_parallel's helpers; vocab_parallel picks the "
        "kernel implementation when called (Triton is optional)",
    ("eaft_megatron.convert.convert", "eaft_megatron.convert.parallel"):
        "the worker pool runs convert's own export in each worker; megatron_to_hf hands the "
        "work to the pool when called with nproc > 1",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, int]]:
    """(imported eaft_megatron module, line) for every import statement of module ``name``."""
    path, is_package = MODULES[name]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import mod`` imports the submodule when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("eaft_megatron.") and target != name:
                out.append((target, node.lineno))
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _unit(module: str) -> str:
    """The subpackage or top-level module a module belongs to (``train``, ``paths``, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(unit: str) -> int:
    for i, floor in enumerate(FLOORS):
        if unit in floor:
            return i
    raise AssertionError(f"eaft_megatron/{unit} is on no floor: add it to FLOORS in "
                         f"{Path(__file__).name}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_unit_is_on_a_floor():
    for module in MODULES:
        unit = _unit(module)
        if unit not in FRONT_DOOR:
            _floor(unit)


def test_imports_go_downward():
    upward = []
    for module, imports in GRAPH.items():
        unit = _unit(module)
        if unit in FRONT_DOOR:
            continue
        for target, line in imports:
            other = _unit(target)
            if other == unit:
                continue
            if other in FRONT_DOOR or _floor(other) > _floor(unit):
                upward.append(f"{MODULES[module][0].relative_to(ROOT)}:{line} imports {target} "
                              f"({unit} is below {other})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for module, imports in GRAPH.items():
        unit = _unit(module)
        if unit in FRONT_DOOR:
            continue
        graph[unit] |= {_unit(t) for t, _ in imports if _unit(t) != unit}
    assert not _cycles(graph), f"cycles between packages: {_cycles(graph)}"


def test_no_cycle_between_modules_of_a_package():
    graph: dict[str, set[str]] = {
        module: {t for t, _ in imports if _unit(t) == _unit(module)
                 and (module, t) not in ALLOWED_BACK_EDGES}
        for module, imports in GRAPH.items()}
    assert not _cycles(graph), f"import cycles between modules: {_cycles(graph)}"


def test_the_check_sees_what_it_should():
    """The parser itself: relative imports resolved, a known edge of each kind present."""
    train_main = {t for t, _ in GRAPH["eaft_megatron.train.main"]}
    assert "eaft_megatron.train.argv" in train_main            # from .argv import ... (lazy)
    assert "eaft_megatron.checkpoint.safe_load" in train_main  # from ..checkpoint.safe_load
    assert "eaft_megatron.compat.patching" in {t for t, _ in GRAPH["eaft_megatron.compat.cpu"]}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    for edge in ALLOWED_BACK_EDGES:
        assert edge[1] in {t for t, _ in GRAPH.get(edge[0], ())}, f"stale exception {edge}"
