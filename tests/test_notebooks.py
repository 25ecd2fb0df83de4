"""Execute every notebook in notebooks/ and every solutions notebook in notebooks/solutions/ from top to bottom,
fail on any cell error (the solutions assert their known answers), and record how long each took; check that
every notebook finds the repository from any working directory, and that every exercise list links to a
solutions notebook with one section per exercise.

The notebooks import the real code (model.py, train.py, sample.py, ...), so this is what keeps them from
rotting when that code changes. Each notebook is read into memory and executed there: the committed file,
with its saved plots, is never modified. Each kernel runs with one torch thread (a notebook's small models
gain less from a second thread than two notebooks gain from a core each); `-n auto` (pytest-xdist) runs them
side by side, one per core, the longest first (tests/conftest.py). Each run's wall-clock seconds and the
kernel's CPU seconds are printed (`-s` shows them, without -n) and written to notebook_times.json in pytest's
temporary folder (the path is printed too). Each notebook is meant to take at most about two minutes of kernel
CPU time:

    python -m pytest tests/test_notebooks.py -n auto     # needs nbclient, nbformat, ipykernel, pytest-xdist
    python -m pytest tests/test_notebooks.py -k 02_mla   # one notebook and its solutions
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*_solutions.ipynb"))
CELL_TIMEOUT_S = 600

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (pip install -r requirements-dev.txt)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (pip install -r requirements-dev.txt)")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel for the python3 kernel "
                                        "(pip install -r requirements-dev.txt)")

# Appended to the in-memory copy: the kernel's own CPU seconds (user + system), which depend much less than
# wall-clock seconds on other jobs sharing the machine.
CPU_PROBE = "import resource as _r\n_u = _r.getrusage(_r.RUSAGE_SELF)\nprint(f'kernel cpu seconds: {_u.ru_utime + _u.ru_stime:.1f}')"


def execute(path: Path) -> dict:
    """Execute the notebook at `path` (an in-memory copy plus the CPU probe) in a kernel, which inherits this
    process's environment (OMP_NUM_THREADS among it). Returns the executed notebook, the wall-clock seconds and
    the error that stopped it (None if every cell ran)."""
    nb = nbformat.read(path, as_version=4)              # the file on disk stays untouched
    nb.cells.append(nbformat.v4.new_code_cell(CPU_PROBE))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(path.parent)}})
    t0, error = time.perf_counter(), None
    try:
        client.execute()                                # raises CellExecutionError on the first failing cell
    except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError,
            nbclient.exceptions.DeadKernelError) as e:
        error = f"{type(e).__name__}: {e}"
    return {"nb": nb, "seconds": time.perf_counter() - t0, "error": error}


@pytest.fixture(scope="session")
def times_file(tmp_path_factory) -> Path:
    """notebook_times.json in pytest's temporary folder, filled in by each notebook's test."""
    path = tmp_path_factory.getbasetemp() / "notebook_times.json"
    path.write_text("{}")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=[p.name for p in NOTEBOOKS + SOLUTIONS])
def test_notebook_executes_without_errors(path, times_file, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")          # the kernel's torch threads
    run = execute(path)
    assert run["error"] is None, f"{path.name}: {run['error']}"
    nb, seconds = run["nb"], run["seconds"]
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    probe = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    cpu = float(probe.split(":")[1])
    record = {"wall_s": round(seconds, 1), "kernel_cpu_s": cpu, "omp_num_threads": 1,
              "notebooks_at_once": int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")),
              "load_avg_1min_at_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    times = json.loads(times_file.read_text())
    times[path.name] = record
    times_file.write_text(json.dumps(times, indent=1))
    print(f"\n{path.name}: {seconds:.1f} s wall, {cpu:.1f} s kernel CPU ({times_file})")
    if path in NOTEBOOKS:
        assert nb.cells[-2].cell_type == "markdown" and nb.cells[-2].source.startswith("## Exercises"), \
            f"{path.name} should end with its exercises"


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


def exercise_numbers(path: Path) -> list[int]:
    """The numbers of the exercises listed in a notebook's last cell ("1. ...", "2. ...")."""
    return [int(n) for n in re.findall(r"^(\d+)\. ", nbformat.read(path, as_version=4).cells[-1].source, re.MULTILINE)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_exercises_link_to_a_solution_for_each_exercise(path):
    """The exercise cell links to notebooks/solutions/<name>_solutions.ipynb, which exists and has a section
    "## Exercise N" for every exercise N of the list, in order, and nothing else numbered."""
    solutions = path.parent / "solutions" / f"{path.stem}_solutions.ipynb"
    exercises = nbformat.read(path, as_version=4).cells[-1].source
    assert f"(solutions/{solutions.name})" in exercises, f"{path.name}: its exercise cell should link to {solutions.name}"
    assert solutions.is_file(), f"{solutions} is missing"
    numbers = exercise_numbers(path)
    assert numbers == list(range(1, len(numbers) + 1)) and numbers, f"{path.name}: exercises not numbered 1..N"
    sections = [int(m) for c in nbformat.read(solutions, as_version=4).cells if c.cell_type == "markdown"
                for m in re.findall(r"^## Exercise (\d+)\b", c.source, re.MULTILINE)]
    assert sections == numbers, f"{solutions.name}: sections {sections}, exercises {numbers}"


def test_every_solutions_notebook_belongs_to_a_notebook():
    stems = {p.stem for p in NOTEBOOKS}
    orphans = [p.name for p in SOLUTIONS if p.stem.removesuffix("_solutions") not in stems]
    assert SOLUTIONS and not orphans, f"solutions without a notebook: {orphans}"


def first_code_cell(path: Path) -> str:
    """The source of the notebook's first code cell (the one that finds the repository)."""
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=[p.name for p in NOTEBOOKS + SOLUTIONS])
def test_first_cell_finds_the_repository_from_anywhere(path, tmp_path):
    """From a folder outside the repository: with TINYSEEK_ROOT set, the cell makes the code importable;
    without it, it stops with a one-line message saying what to do."""
    code = first_code_cell(path) + "\nimport model\nprint('ROOT', ROOT)\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TINYSEEK_ROOT", "PYTHONPATH")}
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "TINYSEEK_ROOT": str(ROOT)},
                           check=False, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and f"ROOT {ROOT}" in found.stdout, found.stderr
    lost = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=False, capture_output=True,
                          text=True, timeout=120)
    message = lost.stderr.strip().splitlines()[-1]
    assert lost.returncode != 0 and "TINYSEEK_ROOT" in message and len(message) < 200, lost.stderr
