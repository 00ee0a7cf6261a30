"""The package's import graph, read from the source: no circles, and samplers that know no process or Lightning."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusion_lab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports (absolute names, TYPE_CHECKING blocks included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module_name(path)] = names
    return {name: {dep for dep in deps if dep in graph and dep != name} for name, deps in graph.items()}


def test_no_import_circle():
    graph = imports()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            assert state.get(dep) != 1, "import circle: " + " -> ".join([*stack, name, dep])
            if dep not in state:
                visit(dep, [*stack, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_samplers_import_neither_a_process_nor_lightning():
    for path in (PACKAGE / "samplers").glob("*.py"):
        source = path.read_text()
        tree = ast.parse(source)
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        forbidden = [m for m in modules if m.startswith(("diffusion_lab.diffusion", "diffusion_lab.models", "lightning",
                                                           "pytorch_lightning"))]
        assert not forbidden, f"{path.name} imports {forbidden}"
