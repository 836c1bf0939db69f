"""The package's layers import downwards only, and no module of ours imports itself back (docs/architecture.md).

Every `import` and `from ... import` of every module of `swift_sophia` counts, at module level and inside functions
alike (an import inside a function is still a dependency: it runs whenever the function does), relative imports
resolved. The layers, lowest first, and what each may import of this repository:

    model        sophia_kernels
    video        nothing
    ms_swift     model, video (and sophia_kernels)
    evaluation   model, video, ms_swift (and sophia_kernels)
    tools        model, video, ms_swift, evaluation (and sophia_kernels)
    top level    anything: swift_sophia/__init__.py, __main__.py, plugin.py (and sophia_cli.py, outside the package)

and model/ and video/ import nothing of ms-swift (`swift`). The checker runs on the installed package and, to show
that it catches what it should, on a small package written here with a bad import and a cycle.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

LAYERS = ("model", "video", "ms_swift", "evaluation", "tools")
MAY_IMPORT = {
    "model": {"model", "sophia_kernels"},
    "video": {"video"},
    "ms_swift": {"ms_swift", "model", "video", "sophia_kernels"},
    "evaluation": {"evaluation", "model", "video", "ms_swift", "sophia_kernels"},
    "tools": {"tools", "model", "video", "ms_swift", "evaluation", "sophia_kernels"},
}
WITHOUT_MS_SWIFT = ("model", "video")
OURS = ("sophia_kernels", "sophia_cli")  # this repository's other top-level names


def modules_of(root: Path, package: str) -> Dict[str, Path]:
    """Module name -> file, for every .py file under the package folder `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package] + parts)] = path
    return out


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in the module `name`."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from package import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in modules else target, node.lineno))
    return sorted(set(out), key=lambda item: (item[1], item[0]))


def layer_of(module: str, package: str) -> str:
    parts = module.split(".")
    if parts[0] != package:
        return parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def check_layers(root: Path, package: str) -> Tuple[List[str], List[List[str]]]:
    """(layering violations, import cycles) of the package in the folder `root`."""
    modules = modules_of(root, package)
    violations, graph = [], {m: set() for m in modules}
    for module, path in modules.items():
        layer = layer_of(module, package)
        for target, line in imports_of(module, path, modules):
            top = target.split(".")[0]
            where = f"{path.relative_to(root.parent)}:{line}: {module} imports {target}"
            if top == "swift" and layer in WITHOUT_MS_SWIFT:
                violations.append(f"{where} (ms-swift, from the {layer} layer)")
            if top != package and top not in OURS:
                continue  # the standard library or a third-party package
            if target in modules:
                graph[module].add(target)
            target_layer = layer_of(target, package)
            if layer != "top" and target_layer not in MAY_IMPORT[layer]:
                violations.append(f"{where} (the {layer} layer may import {sorted(MAY_IMPORT[layer])} only)")
    return violations, cycles(graph)


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_root() -> Path:
    spec = importlib.util.find_spec("swift_sophia")  # finds the package without running its __init__
    return Path(next(iter(spec.submodule_search_locations)))


def test_the_package_imports_downwards_only_and_without_cycles():
    root = package_root()
    modules = modules_of(root, "swift_sophia")
    assert {layer_of(m, "swift_sophia") for m in modules} == set(LAYERS) | {"top"}
    violations, found = check_layers(root, "swift_sophia")
    assert not violations and not found, "\n".join(
        violations + ["import cycle between " + ", ".join(component) for component in found])


def _write(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def small_package(tmp_path):
    """A package in the same layers whose imports all follow the rules."""
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "from .model.modeling import Model\n",
        "plugin.py": "import pkg.ms_swift.register\n",
        "model/__init__.py": "", "model/modeling.py": "import torch\nfrom sophia_kernels import layout\n"
                                                         "from . import attention\n",
        "model/attention.py": "def f():\n    from .. import model\n",
        "video/__init__.py": "", "video/frames.py": "import numpy\n",
        "ms_swift/__init__.py": "", "ms_swift/register.py": "import swift\nfrom ..model.modeling import Model\n"
                                                              "from ..video import frames\n",
        "evaluation/__init__.py": "", "evaluation/run.py": "from pkg.ms_swift import register\n",
        "tools/__init__.py": "", "tools/tiny.py": "from ..evaluation.run import x\n",
    })
    return root


def test_the_checker_passes_a_package_that_follows_the_rules(small_package):
    assert check_layers(small_package, "pkg") == ([], [])


@pytest.mark.parametrize("module, line, expected", [
    ("model/attention.py", "def f():\n    from ..ms_swift import register\n", "the model layer may import"),
    ("model/attention.py", "import swift.utils\n", "ms-swift, from the model layer"),
    ("video/frames.py", "def f():\n    from swift.utils import get_env_args\n", "ms-swift, from the video layer"),
    ("video/frames.py", "from sophia_kernels import layout\n", "the video layer may import"),
    ("video/frames.py", "from ..model import modeling\n", "the video layer may import"),
    ("ms_swift/register.py", "from ..evaluation.run import x\n", "the ms_swift layer may import"),
    ("evaluation/run.py", "def f():\n    from ..tools.tiny import build\n", "the evaluation layer may import"),
    ("evaluation/run.py", "from pkg import plugin\n", "the evaluation layer may import"),
    ("tools/tiny.py", "import sophia_cli\n", "the tools layer may import"),
])
def test_the_checker_finds_an_import_from_a_lower_layer_to_a_higher_one(small_package, module, line, expected):
    path = small_package / module
    path.write_text(path.read_text() + line)
    violations, _ = check_layers(small_package, "pkg")
    assert len(violations) == 1 and expected in violations[0], violations


def test_the_checker_finds_cycles_through_imports_inside_functions(small_package):
    # the model layer's attention -> modeling -> attention, closed inside a function
    (small_package / "model/attention.py").write_text("def f():\n    from .modeling import Model\n")
    assert check_layers(small_package, "pkg") == ([], [["pkg.model.attention", "pkg.model.modeling"]])
    # top level -> evaluation -> top level: a layering violation and a cycle
    (small_package / "cli.py").write_text("from .evaluation import run\n")
    (small_package / "evaluation/run.py").write_text("def f():\n    from ..cli import plugin_path\n")
    violations, found = check_layers(small_package, "pkg")
    assert len(violations) == 1 and "pkg.evaluation.run imports pkg.cli" in violations[0], violations
    assert ["pkg.cli", "pkg.evaluation.run"] in found


def test_pyproject_ships_every_package_and_the_cli_module():
    import tomllib

    root = package_root()
    with open(root.parent / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    ours = {".".join(("swift_sophia",) + p.parent.relative_to(root).parts) for p in root.rglob("__init__.py")}
    assert ours == {p for p in setuptools["packages"] if p.startswith("swift_sophia")}
    assert "sophia_cli" in setuptools["py-modules"] and (root.parent / "sophia_cli.py").is_file()
