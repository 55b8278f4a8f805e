"""The layering the README's Layout section describes, checked on the source: stages are
thin modules over the library, no stage imports another, the library imports no stage
and no part of the workflow above it, each stage's `run` takes the section and inputs
the DAG declares for it, and the hand-over file names live in one module."""

from __future__ import annotations

import ast
import importlib
import inspect
import typing
from pathlib import Path

import pytest

from pipeline.dag import KINDS
from tests.conftest import ROOT

LIBRARY = sorted((ROOT / "vgg").rglob("*.py"))
STAGES = sorted(p for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_no_stage_and_nothing_of_the_workflow(path):
    bad = {m for m in imported_modules(path)
           if m.split(".")[0] == "stages" or m in ("pipeline.runner", "pipeline.dag", "pipeline.cli")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_no_stage_imports_another_and_each_is_short(path):
    others = {m for m in imported_modules(path) if m.split(".")[0] == "stages"}
    assert not others, f"{path.name} imports {sorted(others)}"
    assert len(path.read_text().splitlines()) < 200, f"{path.name} is not a thin stage module"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_stage_runs_on_the_section_and_inputs_the_dag_declares(kind):
    decl = KINDS[kind]
    module, fn = decl.entry.split(":")
    run = getattr(importlib.import_module(module), fn)
    params = list(inspect.signature(run).parameters)
    assert params[:3] == ["config", "inputs", "ctx"]
    hints = typing.get_type_hints(run)
    assert hints["config"] is decl.section and hints["inputs"] is decl.inputs


def test_hand_over_file_names_are_written_in_one_place():
    names = ('"spec.json"', '"rows.json"', '"model.pt"', '"health.json"', '"fusion.json"',
             '"member_rows.json"', '"classes.json"', '"stats.json"')
    sources = [p for p in [*LIBRARY, *STAGES, *sorted((ROOT / "pipeline").glob("*.py"))]
               if p.name != "artifacts.py"]
    for p in sources:
        text = p.read_text()
        found = [n for n in names if n in text]
        assert not found, f"{p.relative_to(ROOT)} spells {found}: use vgg.artifacts"
