"""The package's floor plan and sizes, read from the sources with `ast`.

Floors, bottom up: no module imports one of a higher floor, at the top of the file or
inside a function; no two modules import each other, directly or around a loop.
Known exceptions are listed by name below, each with the reason it is still there:
remove an entry when its import is gone (the test then says the entry is stale).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tfhfp8"

# Floor of every module: the longest dotted prefix listed here decides.
FLOORS = {
    # 0: helpers that know nothing of tfhfp8.
    "tfhfp8._compat": 0, "tfhfp8.registry": 0, "tfhfp8.replicas": 0,
    # 1: number formats, block formats, their registry face, the rounding names.
    "tfhfp8.formats": 1, "tfhfp8.block_formats": 1,
    # 2: the two quantization backends.
    "tfhfp8.ops": 2,
    # 3: quantize, accumulators, the stochastic-rounding seed and master-weight rounding.
    "tfhfp8.quantization": 3, "tfhfp8.accumulation": 3, "tfhfp8.rounding": 3,
    "tfhfp8.fused_accumulation": 3,
    # 4: the GEMMs (products, einsum, convolutions and their geometry, the axis algebra
    # of blocked operands, the portable convolution ops; `tfhfp8.portable_conv`: the
    # old name of the last).
    "tfhfp8.gemm": 4, "tfhfp8.portable_conv": 4,
    # 5: policies (with their loss-scaling specs and rules) and layers.
    "tfhfp8.policy": 5, "tfhfp8.policy_presets": 5, "tfhfp8.loss_scaling_spec": 5,
    "tfhfp8.loss_scaling": 5,
    "tfhfp8.layers": 5,
    # 6: the weight update and the emulated all-reduce.
    "tfhfp8.optimizers": 6, "tfhfp8.all_reduce": 6, "tfhfp8.distribute": 6,
    # 7: what is built from models: conversion, calibration, experiments, fine-tuning.
    "tfhfp8.conversion": 7, "tfhfp8.calibration": 7, "tfhfp8.callbacks": 7,
    "tfhfp8.experiment": 7, "tfhfp8.fine_tuning": 7, "tfhfp8.datasets": 7,
    "tfhfp8.models": 7, "tfhfp8.pretrained": 7, "tfhfp8.tfmot": 7, "tfhfp8.program": 7,
    # 8: the command line and the package's face.
    "tfhfp8.cli": 8, "tfhfp8": 8,
}

# (importer, imported): imports that break the plan today, to be removed.
KNOWN_EXCEPTIONS = set()

# Modules and functions over the size limits today, to be cut (issue 25).
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
KNOWN_LONG_MODULES = set()
KNOWN_LONG_FUNCTIONS = set()


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources():
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name, modules):
    return name in modules


def _imports(name, path, modules):
    """The tfhfp8 modules `name` imports anywhere in its file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package up
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if _is_module(submodule, modules) else base)
    return {module for module in found
            if module == "tfhfp8" or module.startswith("tfhfp8.")} - {name}


def _floor(name):
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise KeyError(f"{name} has no floor: add it to FLOORS")


def _graph():
    modules = _sources()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_floor():
    for name in _sources():
        _floor(name)


def test_no_module_imports_a_higher_floor():
    upward = sorted((a, b) for a, targets in _graph().items() for b in targets
                    if _floor(b) > _floor(a) and (a, b) not in KNOWN_EXCEPTIONS)
    assert not upward, "imports of a higher floor: " + ", ".join(
        f"{a} (floor {_floor(a)}) -> {b} (floor {_floor(b)})" for a, b in upward)


def test_no_import_cycle():
    graph = {a: {b for b in targets if (a, b) not in KNOWN_EXCEPTIONS}
             for a, targets in _graph().items()}
    # A package's __init__ handing on its submodules' names is how packages work; a
    # submodule importing its own package back is a cycle.
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_policy_is_data():
    """A policy holds a loss-scaling spec; the rules (TensorFlow, tf.distribute) are the
    layers': nothing the policy imports, directly or not, reaches them."""
    graph, reached, todo = _graph(), set(), ["tfhfp8.policy"]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert not reached & {"tfhfp8.loss_scaling", "tfhfp8.replicas"}, sorted(reached)


def test_known_exceptions_are_still_needed():
    graph = _graph()
    stale = sorted((a, b) for a, b in KNOWN_EXCEPTIONS if b not in graph.get(a, ()))
    assert not stale, f"remove these from KNOWN_EXCEPTIONS: {stale}"


def _function_lengths(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, node.end_lineno - start + 1


def _relative(path):
    return path.relative_to(PACKAGE.parent).as_posix()


@pytest.mark.parametrize("kind", ["modules", "functions"])
def test_sizes(kind):
    long, stale = [], set()
    for path in _sources().values():
        key = _relative(path)
        if kind == "modules":
            lines = len(path.read_text().splitlines())
            if lines > MAX_MODULE_LINES and key not in KNOWN_LONG_MODULES:
                long.append(f"{key}: {lines} lines")
            if lines <= MAX_MODULE_LINES and key in KNOWN_LONG_MODULES:
                stale.add(key)
        else:
            for function, lines in _function_lengths(path):
                name = f"{key}:{function}"
                if lines > MAX_FUNCTION_LINES and name not in KNOWN_LONG_FUNCTIONS:
                    long.append(f"{name}: {lines} lines")
    if kind == "functions":
        lengths = {f"{_relative(p)}:{f}": n for p in _sources().values()
                   for f, n in _function_lengths(p)}
        stale = {name for name in KNOWN_LONG_FUNCTIONS
                 if lengths.get(name, 0) <= MAX_FUNCTION_LINES}
    limit = MAX_MODULE_LINES if kind == "modules" else MAX_FUNCTION_LINES
    assert not long, f"over {limit} lines: {long}"
    assert not stale, f"now within the limit, remove from the known exceptions: {sorted(stale)}"
