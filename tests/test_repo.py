"""The README's commands are what CI runs, and the package keeps its one-way layering."""

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_commands():
    commands = _readme_commands()
    test_cmd = next(c for c in commands if "pytest" in c and "not slow" in c)
    slow_cmd = next(c for c in commands if "pytest -m slow" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines
    assert slow_cmd in ci_lines


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package is its ``__init__.py``)."""
    out = {}
    for path in (ROOT / "cnnlab").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: pathlib.Path) -> set[str]:
    """Modules named by every import statement in ``path`` (function-level ones too).

    ``from a.b import c`` names ``a.b.c`` when that is a cnnlab module, else ``a.b``; relative
    imports are resolved against the file's package. A name is the module itself, not its
    parent packages (which Python imports first, but which are already initializing then)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return names


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES} for name, path in MODULES.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_no_import_cycle_in_the_package():
    """No chain of import statements among cnnlab modules leads back to its start.

    Edges are the import statements :func:`_imports` finds, at any level of a file. Attributes
    a package loads lazily by string (``cnnlab._lazy``) are not import statements, so a package
    ``__init__`` may name a submodule that imports ``from <package>.<sibling> import x``; but a
    submodule doing ``from <package> import x`` (an attribute of the ``__init__``) while that
    ``__init__`` imports the submodule is a cycle: it works only in one import order."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "cnnlab" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "cnnlab" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cnnlab.pkg import b\n")
    (pkg / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _modules())
    assert _graph()["cnnlab.pkg.a"] == {"cnnlab.pkg.b"}
    assert _graph()["cnnlab.pkg.b"] == {"cnnlab.pkg.a"}
    try:
        test_no_import_cycle_in_the_package()
    except AssertionError as e:
        assert "cnnlab.pkg.a -> cnnlab.pkg.b -> cnnlab.pkg.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_layering_is_one_way():
    forbidden = {
        "functional": ("flax", "cnnlab.nn", "cnnlab.models", "cnnlab.train", "cnnlab.data"),
        # the fast convolution paths (oneDNN's build, the formulations and their caches)
        "native": ("flax", "cnnlab.functional", "cnnlab.nn", "cnnlab.models", "cnnlab.train",
                   "cnnlab.data"),
        "data": ("flax", "cnnlab.nn", "cnnlab.models", "cnnlab.train"),
        "nn": ("cnnlab.models", "cnnlab.train", "cnnlab.data"),
        "models": ("cnnlab.train", "cnnlab.data"),
        "train": ("cnnlab.sweep",),
    }
    for package, banned in forbidden.items():
        for path in (ROOT / "cnnlab" / package).rglob("*.py"):
            bad = [m for m in _imports(path) if m.startswith(banned)]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for name in ("activations", "initializers", "regularizers", "constraints", "backend"):
        bad = [m for m in _imports(ROOT / "cnnlab" / f"{name}.py") if m.startswith("flax")]
        assert not bad, f"cnnlab/{name}.py imports {bad}"
    # The report reads a study; it never needs the worker or the launcher, even indirectly.
    reached = _reachable(_graph(), "cnnlab.sweep.report")
    assert not reached & {"cnnlab.sweep.worker", "cnnlab.sweep.launch"}, sorted(reached)


def test_only_the_optuna_adapter_touches_private_names_of_other_objects():
    """``x._name`` on anything but ``self``/``cls`` (Optuna's private API, another module's
    private helpers) appears in cnnlab/sweep only in its Optuna adapter."""
    for path in (ROOT / "cnnlab" / "sweep").glob("*.py"):
        if path.name == "_optuna_adapter.py":
            continue
        bad = [f"{path.name}:{node.lineno} .{node.attr}" for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Attribute) and node.attr.startswith("_")
               and not node.attr.startswith("__")
               and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
        assert not bad, bad


def test_ci_runs_the_native_code_and_packing_tests_on_an_emulated_avx2_only_cpu():
    ci = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    step = next(line for line in ci.splitlines() if "ONEDNN_MAX_CPU_ISA=AVX2" in line)
    assert "--xla_cpu_max_isa=AVX2" in step
    for tests in ("test_onednn.py", "test_conv_formulations.py", "test_packing.py", "test_precision.py"):
        assert tests in step
