"""visualization.ipynb runs headlessly against a small evaluated category."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from scripts import evaluate, train
from synthetic import make_synthetic_category

REPO = Path(__file__).resolve().parents[1]


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(REPO / "visualization.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


def run_notebook(root: Path, out: Path) -> list:
    """The notebook executed against OUT/widget, evaluated on ROOT; its pictures."""
    notebook = nbformat.read(REPO / "visualization.ipynb", as_version=4)
    assert notebook.cells[1].source.startswith("RESULTS = ")
    notebook.cells[1].source = f"RESULTS = r'{out / 'widget'}'\nDATA_PATH = r'{root}'"
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def test_notebook_runs_and_draws(evaluated):
    root, out, _ = evaluated
    assert len(run_notebook(root, out)) >= 4  # most/least anomalous, ROC + histograms, the predict cell


def test_notebook_runs_on_a_category_without_masks(tmp_path):
    """No ground truth: no pixel F1 threshold; the region is drawn at the calibrated pixel threshold."""
    make_synthetic_category(tmp_path / "data", "widget", n_train=6, n_test_good=2, n_per_defect=1, size=72, layout="folder")
    assert train(tmp_path / "data", tmp_path / "out").returncode == 0
    assert evaluate(tmp_path / "data", tmp_path / "out").returncode == 0
    assert len(run_notebook(tmp_path / "data", tmp_path / "out")) >= 4
