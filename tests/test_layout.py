"""The package's layout: imports flow one way (modeling -> pipeline/training -> the command line and the demo),
with no circle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


# Where each subpackage of harmon_hf lives in the source tree (pyproject's package-dir).
PACKAGE_FOLDERS = {"harmon_hf": REPO / "src" / "harmon_hf", "harmon_hf.modeling": REPO / "modeling",
                   "harmon_hf.training": REPO / "training"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_FOLDERS.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            if "models" in relative.parts:  # the bundled model's copy of modeling/
                continue
            parts = [part for part in relative.parts if part != "__init__"]
            name = ".".join([package, *parts])
            if name.split(".")[:2] == ["harmon_hf", "modeling"] and package == "harmon_hf":
                continue
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports, at any level (module or function)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from package import module` depends on the module; `from module import name`, on the module
            candidates = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                          for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {candidate for candidate in candidates if candidate in modules and candidate != name}
    return found


@pytest.mark.parametrize("entry_point", ["harmon_hf.cli", "harmon_hf.lmms_eval_harmon"])
def test_nothing_in_the_package_imports_an_entry_point(entry_point):
    modules = _modules()
    assert entry_point in modules
    importers = [name for name, path in modules.items() if entry_point in _imports(name, path, modules)]
    assert importers == []


def test_the_package_has_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, circles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in graph.get(node, ()):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert circles == []


HEAVY_MODULES = ("torch", "transformers", "diffusers")


@pytest.mark.parametrize("arguments", [["--help"], ["describe", "no-such-image.png"], ["generate", "--preset"]])
def test_help_and_argument_errors_load_no_heavy_library(arguments, tmp_path):
    """`harmon --help` and a one-line input error answer without importing torch, transformers or diffusers."""
    script = ("import sys, runpy\nsys.argv = ['harmon', *sys.argv[1:]]\n"
              "try:\n    runpy.run_module('harmon_hf.cli', run_name='__main__')\nexcept SystemExit as end:\n"
              "    loaded = [name for name in %r if name in sys.modules]\n"
              "    print('LOADED:' + ','.join(loaded), file=sys.stderr)\n    raise\n" % (HEAVY_MODULES,))
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, cwd=tmp_path)
    assert "LOADED:" in result.stderr, result.stderr[-2000:]
    assert result.stderr.split("LOADED:", 1)[1].strip() == ""
    assert (result.returncode == 0) == (arguments == ["--help"])


def test_importing_the_package_loads_nothing_heavy_until_a_name_is_used():
    script = ("import sys, harmon_hf\nassert not [m for m in %r if m in sys.modules]\n"
              "from transformers import AutoConfig\nharmon_hf.HarmonConfig\n"
              "assert type(AutoConfig.for_model('harmon')).__name__ == 'HarmonConfig'\nprint('OK')" % (HEAVY_MODULES,))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "OK", result.stderr[-2000:]
