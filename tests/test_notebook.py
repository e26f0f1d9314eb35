"""The quickstart notebook is committed without outputs and runs top to bottom (a few training steps)."""

import json
import os
import re
import sys

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "quickstart.ipynb")


def test_notebook_is_valid_and_has_no_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  assert notebook.nbformat == 4
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
  headings = [cell.source.splitlines()[0] for cell in notebook.cells if cell.cell_type == "markdown"]
  assert "## Tiled prediction on a large image" in headings
  tiled = next(cell.source for cell in code if cell.id == "tiled")
  assert "Tiling(mode=" in tiled and "predict_labels(big, tiling)" in tiled and "predict_instances(" in tiled


def test_notebook_runs_top_to_bottom(tmp_path, tfds_dir, monkeypatch):
  # The kernel inherits this environment, including conftest's 4 fake CPU devices.
  monkeypatch.setenv("SEGJAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("SEGJAX_NOTEBOOK_TFDS_DIR", tfds_dir)
  workdir = tmp_path / "quickstart"
  monkeypatch.setenv("SEGJAX_NOTEBOOK_WORKDIR", str(workdir))
  # Kernel connection files and the IPython profile go to the test's directory, not the home directory.
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  # A `python3` kernel spec first on JUPYTER_PATH: the kernel is this interpreter (the venv's), whatever kernels the
  # machine has installed elsewhere.
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps({**spec, "display_name": "Python 3 (segjax tests)"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # Run from the notebook's own folder, as Jupyter does; the notebook finds the repository root itself.
  client = NotebookClient(
    notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
  )
  client.execute()  # raises CellExecutionError, naming the cell, on the first error

  outputs = {cell.id: cell.outputs for cell in notebook.cells if cell.cell_type == "code"}
  setting = "".join(o.get("text", "") for o in outputs["imports"])
  assert "on 4 cpu device(s)" in setting  # the kernel saw conftest's fake devices
  figures = [o for cell in outputs.values() for o in cell if "image/png" in o.get("data", {})]
  assert len(figures) == 4  # the data, the loss curve, the predictions and the tiled prediction
  text = "".join(o.get("text", "") for o in outputs["resume"])
  assert "trained 2 more steps, 6 in all" in text
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  text = "".join(o.get("text", "") for o in outputs["tiled"])
  tiled = re.search(r"tiled prediction of a 512x512 image: mean IoU ([\d.]+), (\d+) instances", text)
  assert tiled, text
  assert 0.0 <= float(tiled.group(1)) <= 1.0
