"""The package's shape: sub-packages list every public name of their modules, importing karyo
does not import TensorFlow, and no module imports one that imports it back."""

import ast
import importlib
import subprocess
import sys

import pytest

from tests.common import REPO

PACKAGES = ["data", "karyograms", "models", "uncertainty", "experiments", "bench"]


def _public_names(module_file):
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_listed_by_its_package(package):
    imported = importlib.import_module(f"karyo.{package}")
    for module_file in sorted((REPO / "karyo" / package).glob("*.py")):
        if module_file.name == "__init__.py":
            continue
        assert module_file.stem in imported.__all__, module_file
        for name in _public_names(module_file):
            assert name in imported.__all__, f"karyo.{package}.{name} (from {module_file.name}) is not listed"


def test_import_karyo_is_cheap_and_registers_layers_once_keras_comes():
    script = ("import sys, karyo, karyo.data, karyo.models, karyo.experiments\n"
              "assert 'tensorflow' not in sys.modules, 'import karyo imported TensorFlow'\n"
              "import keras\n"
              "assert keras.saving.get_registered_object('karyo>MCDropout') is not None\n"
              "print('ok')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _karyo_imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("karyo"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if (REPO / (full.replace(".", "/") + ".py")).is_file() else node.module)
    return found


def _modules():
    found = {}
    for path in (REPO / "karyo").rglob("*.py"):
        found[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _karyo_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    for start in graph:  # a cycle shows as a module reachable from itself
        seen, stack = set(), list(graph[start])
        while stack:
            current = stack.pop()
            assert current != start, f"import cycle through {start}"
            if current not in seen:
                seen.add(current)
                stack.extend(graph.get(current, ()))


def test_no_private_name_is_used_outside_its_module():
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("karyo"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{name} imports private {private} from {node.module}"


def test_tests_share_helpers_only_through_tests_common():
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
                assert node.module == "tests.common", f"{path.name} imports from {node.module}"
