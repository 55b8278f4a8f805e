"""The README contract: CI runs exactly the README's test command."""

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# --- README: test command ---") + 1]
    assert command in readme


def test_readme_documents_the_main_command():
    readme = (ROOT / "README.md").read_text()
    assert 'python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . && python pipeline/run.py' in readme
