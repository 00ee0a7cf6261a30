"""The package's import graph, read from the source with every import counted (inside functions and TYPE_CHECKING
blocks too): no circles, each module in a declared layer importing only the layers below it, the process maths and
the networks free of Lightning, Hydra and OmegaConf, and the command-line programs imported by nothing. And the
sizes: no file over 300 lines, no class over 150, no function over 60 (issue 25)."""

import ast
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusion_lab"

# The layers, bottom to top. Each names its modules (a name covers its submodules; the longest name that covers a
# module places it) and the layers it may import besides its own. Data, evaluation and the LightningModules stand
# beside each other over the model object: none imports another. A command-line program imports no other one.
LAYERS = {
    # errors, files, seeds, checkpoint files, process launch
    "utils": ({"utils"}, set()),
    # paths, processes, losses, samplers, EMA profiles
    "maths": ({"diffusion", "samplers", "ema"}, {"utils"}),
    # backbones, autoencoders, LPIPS, the feature classifier's network
    "networks": ({"models.components"}, {"utils"}),
    # the model object, its first stage, its builder and the batched sampling loop
    "model object": ({"models.diffusion_model", "models.first_stage", "builders", "generate"},
                     {"utils", "maths", "networks"}),
    # the rest of models/: training and distillation, the teacher
    "lightning modules": ({"models"}, {"utils", "maths", "networks", "model object"}),
    # datamodules, shards, latents (encoded by the first stage)
    "data": ({"data"}, {"utils", "networks", "model object"}),
    # feature extractors, scores, the bound of a model object
    "evaluation": ({"metrics"}, {"utils", "maths", "networks", "model object"}),
    "training callbacks": ({"callbacks"}, {"utils", "maths", "networks", "model object", "evaluation"}),
    # the one config mechanism: configs/, the resolvers (${first_stage:PATH}, ...), hydra_main, compose_config
    "config": ({"config"}, {"utils", "model object", "data"}),
    "command-line programs": ({"train", "sample", "data.prepare", "metrics.__main__", "posthoc_ema", "sweep"},
                              {"utils", "maths", "networks", "model object", "lightning modules", "data",
                               "evaluation", "training callbacks", "config"}),
}
SELF_IMPORT_FORBIDDEN = {"command-line programs"}

# What the bottom layers may import from outside the package (the standard library aside).
THIRD_PARTY = {
    "maths": {"torch", "numpy", "scipy", "torchdiffeq"},
    "networks": {"torch", "einops", "diffusers", "lpips"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, package: list[str]) -> set[str]:
    """Every name an import statement anywhere in `source` reads (module, and module.name for `from` imports),
    imports relative to `package` made absolute."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def file_imports(path: Path) -> set[str]:
    package = module_name(path).split(".")
    return imported_names(path.read_text(), package if path.name == "__init__.py" else package[:-1])


def imports() -> dict[str, set[str]]:
    """Every module of the package -> the modules of the package it imports."""
    graph = {module_name(path): file_imports(path) for path in PACKAGE.rglob("*.py")}
    return {name: {dep for dep in deps if dep in graph and dep != name} for name, deps in graph.items()}


def layer_of(module: str) -> str | None:
    """The layer whose longest module name covers `module` (None: in no layer)."""
    relative = module.removeprefix("diffusion_lab").removeprefix(".")
    covering = [(len(prefix), layer) for layer, (prefixes, _) in LAYERS.items() for prefix in prefixes
                if relative == prefix or relative.startswith(prefix + ".")]
    return max(covering)[1] if covering else None


def test_every_module_has_a_layer():
    graph = imports()
    unplaced = sorted(name for name in graph if name != "diffusion_lab" and layer_of(name) is None
                      and not (PACKAGE / name.split(".", 1)[1].replace(".", "/") / "__init__.py").is_file())
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_each_layer_imports_only_the_layers_it_stands_on():
    graph = imports()
    wrong = []
    for module, deps in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None:
            continue
        allowed = LAYERS[layer][1] | ({layer} - SELF_IMPORT_FORBIDDEN)
        wrong += [f"{module} ({layer}) -> {dep} ({layer_of(dep)})" for dep in sorted(deps)
                  if layer_of(dep) is not None and layer_of(dep) not in allowed]
    assert not wrong, "imports that break the layering:\n" + "\n".join(wrong)


def test_nothing_imports_a_command_line_program():
    graph = imports()
    programs = {name for name in graph if layer_of(name) == "command-line programs"}
    importers = sorted(f"{module} -> {dep}" for module, deps in graph.items() for dep in deps & programs)
    assert programs and not importers, f"library code imports a command-line program: {importers}"


def test_process_maths_and_networks_import_no_lightning_hydra_or_omegaconf():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        layer = layer_of(module_name(path))
        if layer in THIRD_PARTY:
            outside = {name.split(".")[0] for name in file_imports(path)} - {"diffusion_lab"}
            wrong += [f"{module_name(path)} imports {name}" for name in sorted(outside)
                      if name not in sys.stdlib_module_names and name not in THIRD_PARTY[layer]]
    assert not wrong, "\n".join(wrong)


def test_imports_inside_functions_and_relative_ones_count():
    source = "def f():\n    if True:\n        from diffusion_lab.sample import sample\n        from ..data import shards\n"
    names = imported_names(source, ["diffusion_lab", "models"])
    assert {"diffusion_lab.sample", "diffusion_lab.data.shards"} <= names


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
        forbidden = [m for m in file_imports(path) if m.startswith(("diffusion_lab.diffusion", "diffusion_lab.models",
                                                                        "lightning", "pytorch_lightning"))]
        assert not forbidden, f"{path.name} imports {forbidden}"


MAX_LINES = {"file": 300, "class": 150, "function": 60}


def oversized() -> dict[tuple[str, str, str], int]:
    """(file under src/diffusion_lab, kind, name) -> lines, for every file, class and function (methods and nested
    functions included) longer than MAX_LINES allows; lines counted from the def or class line to the last line."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source, where = path.read_text(), str(path.relative_to(PACKAGE))
        if len(source.splitlines()) > MAX_LINES["file"]:
            found[(where, "file", "")] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function" if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if kind and node.end_lineno - node.lineno + 1 > MAX_LINES[kind]:
                found[(where, kind, node.name)] = node.end_lineno - node.lineno + 1
    return found


def test_no_file_class_or_function_is_too_long():
    over = oversized()
    assert not over, "over " + str(MAX_LINES) + ": " + ", ".join(f"{f} {k} {n} ({lines} lines)" for (f, k, n), lines
                                                                 in over.items())
