"""visualization.ipynb runs headlessly against a small evaluated category."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(REPO / "visualization.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


def test_notebook_runs_and_draws(evaluated):
    root, out, _ = evaluated
    notebook = nbformat.read(REPO / "visualization.ipynb", as_version=4)
    assert notebook.cells[1].source.startswith("RESULTS = ")
    notebook.cells[1].source = f"RESULTS = r'{out / 'widget'}'\nDATA_PATH = r'{root}'"
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    pictures = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) >= 4  # most/least anomalous, ROC + histograms, the predict cell
