"""Repository invariants from DEVELOPERS.md: namespace layout, no stdlib shadowing, boundaries."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("protocol", "engine", "server", "operator")


def test_stdlib_operator_is_not_shadowed() -> None:
    """`import operator` must give the standard library even with the repo root on sys.path."""
    code = "import operator, sys; print(operator.__file__); print(operator.itemgetter)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = out.splitlines()[0]
    assert not Path(path).resolve().is_relative_to(ROOT), path


@pytest.mark.parametrize("component", COMPONENTS)
def test_components_are_namespace_distributions(component: str) -> None:
    folder = ROOT / component
    assert not (folder / "__init__.py").exists()
    assert not (folder / "src" / "kubellm" / "__init__.py").exists(), "kubellm must be PEP 420"
    assert (folder / "src" / "kubellm" / component / "__init__.py").is_file()
    assert (folder / "pyproject.toml").is_file()


def test_server_import_does_not_load_torch() -> None:
    """API servers need only CPU and no torch: importing the whole server must not load it."""
    code = (
        "import sys, importlib, pkgutil, kubellm.server as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'kubellm.server.'):\n"
        "    importlib.import_module(m.name)\n"
        "import kubellm.protocol.cli, kubellm.engine.model_files\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_no_pickle_in_sources() -> None:
    pattern = re.compile(
        r"^\s*(import (c?pickle|cloudpickle)|from (c?pickle|cloudpickle) )|_pyobj\("
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for component in COMPONENTS
        for path in (ROOT / component / "src").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in ci
