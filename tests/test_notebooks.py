"""Every notebook runs top to bottom in its quick mode (papermill sets its ``parameters`` cell);
a failing cell fails the suite."""

import os
from pathlib import Path

import nbformat
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(path, workdir, parameters, timeout=900):
    """Run the notebook at ``path`` with papermill in ``workdir``; return the executed notebook.

    Only the parameters the notebook's ``parameters`` cell declares are passed."""
    import papermill

    declared = papermill.inspect_notebook(str(path))
    env_before = dict(os.environ)
    os.environ.update(MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="3")  # the kernel inherits them
    try:
        return papermill.execute_notebook(
            str(path), str(Path(workdir) / f"executed-{Path(path).name}"), cwd=str(workdir),
            parameters={k: v for k, v in parameters.items() if k in declared},
            kernel_name="python3", execution_timeout=timeout, progress_bar=False)
    finally:
        os.environ.clear()
        os.environ.update(env_before)


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def test_papermill_sets_the_parameters_and_a_broken_cell_fails_the_run(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters = nbformat.v4.new_code_cell("QUICK = False")
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell("if QUICK:\n    raise RuntimeError('broken cell')")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    execute(path, tmp_path, {"QUICK": False}, timeout=120)
    with pytest.raises(PapermillExecutionError, match="broken cell"):
        execute(path, tmp_path, {"QUICK": True, "UNDECLARED": 1}, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path):
    nb = execute(path, tmp_path, {"QUICK": True, "OUT": str(tmp_path), "DATA": str(SHARED_DATA)})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
