"""Every notebook runs top to bottom in its quick mode; a failing cell fails the suite."""

import os
from pathlib import Path

import nbformat
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(nb, workdir, timeout=900):
    from nbclient import NotebookClient

    env_before = dict(os.environ)
    os.environ.update(KARYO_NOTEBOOK_QUICK="1", KARYO_NOTEBOOK_OUT=str(workdir), MPLBACKEND="Agg",
                      TF_CPP_MIN_LOG_LEVEL="3", KARYO_SHARED_DATA=str(SHARED_DATA))
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return nb


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def test_a_broken_cell_fails_the_run(tmp_path):
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise RuntimeError('broken cell')")]
    with pytest.raises(CellExecutionError, match="broken cell"):
        execute(nb, tmp_path, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path):
    nb = execute(nbformat.read(path, as_version=4), tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
