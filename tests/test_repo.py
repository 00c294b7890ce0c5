"""The README's commands are what CI runs, and the package keeps its one-way layering."""

import ast
import pathlib
import re

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


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layering_is_one_way():
    forbidden = {
        "functional": ("flax", "cnnlab.nn", "cnnlab.models", "cnnlab.train", "cnnlab.data"),
        "data": ("flax", "cnnlab.nn", "cnnlab.models", "cnnlab.train"),
        "nn": ("cnnlab.models", "cnnlab.train", "cnnlab.data"),
        "models": ("cnnlab.train", "cnnlab.data"),
    }
    for package, banned in forbidden.items():
        for path in (ROOT / "cnnlab" / package).rglob("*.py"):
            bad = [m for m in _imports(path) if m.startswith(banned)]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for name in ("activations", "initializers", "regularizers", "constraints", "backend"):
        bad = [m for m in _imports(ROOT / "cnnlab" / f"{name}.py") if m.startswith("flax")]
        assert not bad, f"cnnlab/{name}.py imports {bad}"
