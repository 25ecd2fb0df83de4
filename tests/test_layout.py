"""The repository's shape is part of its teaching: the top level holds the design card's files and the modules
they import, the further programs live in extras/, and imports point one way, down the reading order

    model  <-  tasks / tokenizer  <-  sample  <-  train / grpo  <-  extras/*

(cli.py and checkpoint.py are the plumbing beside them: cli imports nothing of ours, checkpoint only the model
and the tokenizer it rebuilds). A module may import only what sits below it, so a reader can stop at any file
having seen everything it depends on.

Run: python -m pytest tests/test_layout.py -q
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each top-level module may import from the project (anything else of ours is a layering error).
ALLOWED = {
    "model": set(),
    "tokenizer": set(),
    "tasks": set(),
    "cli": set(),
    "checkpoint": {"model", "tokenizer"},
    "sample": {"model", "tokenizer", "tasks", "checkpoint", "cli"},
    "train": {"model", "tokenizer", "tasks", "checkpoint", "cli", "sample"},
    "grpo": {"model", "tokenizer", "tasks", "checkpoint", "cli", "sample"},
}
CORE = set(ALLOWED)
EXTRAS = {p.stem for p in (ROOT / "extras").glob("*.py")} - {"__init__"}


def project_imports(path: Path) -> set[str]:
    """Names of this project's modules that `path` imports anywhere (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & (CORE | {"extras"})


def test_top_level_holds_the_design_card_and_what_it_imports():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == CORE, f"top-level modules {sorted(modules)}; further programs belong in extras/"
    for name in ("README.md", "notebooks", "tests", "extras"):
        assert (ROOT / name).exists(), name
    assert {"bench", "r1", "cost", "hf"} <= EXTRAS


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_imports_point_down_the_reading_order(module):
    got = project_imports(ROOT / f"{module}.py")
    assert "extras" not in got, f"{module}.py imports extras/: the core files must not depend on the extras"
    assert got <= ALLOWED[module], f"{module}.py imports {sorted(got - ALLOWED[module])}, which sit above it"


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_extras_import_the_core_as_modules_without_path_edits(module):
    text = (ROOT / "extras" / f"{module}.py").read_text(encoding="utf-8")
    assert "sys.path" not in text, f"extras/{module}.py edits sys.path; run it as `python -m extras.{module}`"
