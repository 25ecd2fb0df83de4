"""Execute every notebook in notebooks/ from top to bottom and fail on any cell error.

The notebooks import the real code (model.py, train.py, sample.py, ...), so this is what keeps them from
rotting when that code changes. Each notebook is read into memory and executed there: the committed file,
with its saved plots, is never modified. Slow (each notebook runs for up to a few minutes on a CPU):

    python -m pytest tests/test_notebooks.py            # needs nbclient, nbformat, ipykernel (requirements-dev.txt)
    python -m pytest tests/test_notebooks.py -k 02_mla  # one notebook
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (pip install -r requirements-dev.txt)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (pip install -r requirements-dev.txt)")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel for the python3 kernel "
                                        "(pip install -r requirements-dev.txt)")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path):
    nb = nbformat.read(path, as_version=4)              # an in-memory copy; the file on disk stays untouched
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()                                    # raises CellExecutionError on the first failing cell
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"
