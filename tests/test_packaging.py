"""The project as a package: pyproject.toml agrees with requirements.txt, `neti` is a console script for the CLI,
and the code reaches its modules as a package (no `sys.path` edits) and cites only files inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neti.paths import REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def requirement_names(lines) -> dict[str, str]:
    specs = [line.split("#")[0].strip() for line in lines]
    return {re.split(r"[<>=!~ ]", s)[0].lower().replace("_", "-"): s.replace(" ", "") for s in specs if s}


def test_pyproject_pins_the_same_requirements_as_requirements_txt():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
    assert declared == requirement_names((REPO_ROOT / "requirements.txt").read_text().splitlines())


def test_the_neti_console_script_runs_the_cli():
    import neti.__main__

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["neti"] == "neti.__main__:main"
    assert callable(neti.__main__.main)


def python_files():
    """Every Python file of the project but this one (whose patterns would match themselves)."""
    skip = {".git", "build", "runs", "artifacts", ".cache", ".venv", "venv", "site-packages", "node_modules"}
    return [p for p in REPO_ROOT.rglob("*.py")
            if not skip & set(p.relative_to(REPO_ROOT).parts) and p.resolve() != Path(__file__).resolve()]


def test_no_module_edits_sys_path():
    offenders = [str(p.relative_to(REPO_ROOT)) for p in python_files() if "sys.path." in p.read_text()]
    assert offenders == []


OUTSIDE_NOTES = "/".join(("..", "shared"))  # the method notes' folder beside a development checkout


def test_code_cites_only_documents_inside_the_repository():
    offenders = [str(p.relative_to(REPO_ROOT)) for p in python_files()
                 if p.parts[len(REPO_ROOT.parts)] != "toyworld" and OUTSIDE_NOTES in p.read_text()]
    assert offenders == []
