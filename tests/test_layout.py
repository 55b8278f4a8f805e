"""The layering the README's Layout section describes: the library `vgg/` imports with
PyTorch alone (Ray, MLflow, pyarrow and DALI blocked), except the adapter modules named
here; it imports nothing of the workflow; no two modules import each other; stages are
thin modules over the library, no stage imports another, each stage's `run` takes the
section and inputs the DAG declares for it, and the hand-over file names live in one
module."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
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
            names.update(f"{node.module}.{a.name}" for a in node.names)  # submodules
    return names


#: Top-level packages a bare GPU box lacks (it has PyTorch, torchvision, numpy, PIL, PyYAML).
BLOCKED = ("ray", "mlflow", "pyarrow", "nvidia", "pipeline", "stages")

#: The library's adapters: modules that import a blocked package when imported, each behind
#: an explicit choice (a backend, a file format), imported only where that choice is made.
ADAPTERS = {
    "vgg.data.dali": "nvidia",  # augment.backend: dali (vgg.data.loaders imports it when chosen)
    "vgg.data.shards": "pyarrow",  # reading the Parquet shards (the loaders' row source)
    "vgg.data.torch_loaders": "pyarrow",  # augment.backend: torch, over the Parquet shards
    "vgg.results.parquet": "pyarrow",  # .parquet posteriors files (vgg.results.metrics, by extension)
}

#: Installs a meta-path hook that refuses the blocked packages, as a bare GPU box would.
BLOCK_HOOK = f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, _Block())
"""


def _library_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in LIBRARY)


def test_the_library_imports_with_pytorch_alone():
    """Each vgg module, in a fresh interpreter in which ray, mlflow, pyarrow, nvidia and the
    workflow cannot be imported: only the named adapters fail, and on their own package."""
    code = BLOCK_HOOK + f"""
import importlib, json
out = {{}}
for name in {_library_modules()!r}:
    try:
        importlib.import_module(name)
    except ImportError as e:
        out[name] = str(e)
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    failed = __import__("json").loads(res.stdout.splitlines()[-1])
    assert {m: e.split(": ")[-1].split(".")[0] for m, e in failed.items()} == ADAPTERS


def test_gpu_tests_collect_and_run_with_pytorch_alone():
    """tests/test_gpu.py on a bare GPU box: it collects and runs (its CUDA test skipped here)."""
    code = BLOCK_HOOK + "import pytest\nsys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_gpu.py']))\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "error" not in res.stdout.lower()


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_no_stage_and_nothing_of_the_workflow(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("stages", "pipeline")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_two_modules_import_each_other():
    """Import cycles between any two modules of vgg/, pipeline/ and stages/ (any import
    statement, also inside a function)."""
    files = [*LIBRARY, *STAGES, *sorted((ROOT / "pipeline").glob("*.py"))]
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {n: {m for m in imported_modules(p) if m in names and m != n} for n, p in names.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph[b]})
    assert not pairs, f"modules that import each other: {pairs}"


def test_the_workflow_keys_are_the_pipeline_config_beyond_the_experiment():
    from pipeline.config import PipelineConfig
    from vgg.config import WORKFLOW_KEYS, ExperimentConfig

    assert set(WORKFLOW_KEYS) == set(PipelineConfig.__dataclass_fields__) - set(ExperimentConfig.__dataclass_fields__)


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
