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
    offenders = [str(p.relative_to(REPO_ROOT)) for p in python_files() if OUTSIDE_NOTES in p.read_text()]
    assert offenders == []


def imports(path: Path) -> set[str]:
    """The project modules a file imports, at its top or inside functions (`from .x import y` resolved)."""
    import ast

    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in ("neti", "toyworld")}


def test_the_library_and_the_toy_world_import_without_circles():
    modules = {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in python_files() if p.parts[len(REPO_ROOT.parts)] in ("neti", "toyworld")}
    graph = {name: imports(path) & set(modules) - {name} for name, path in modules.items()}
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}  # a parent

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(m == goal or (m not in seen and not seen.add(m) and reaches(m, goal, seen)) for m in graph[start])

    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and reaches(b, a, set()))
    assert circles == [], circles


def test_the_trainer_leaves_rendering_and_checkpoint_files_to_their_modules():
    assert not imports(REPO_ROOT / "neti" / "train.py") & {"neti.generate", "neti.previews"}
    source = (REPO_ROOT / "neti" / "train.py").read_text()
    trainer = source[source.index("class Trainer:"):].splitlines()
    assert len(trainer) <= 150 and "save_file" not in source and "per_layer" not in source
