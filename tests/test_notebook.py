"""The Colab quickstart notebook runs headless (nbclient) in its CPU smoke mode on the bundled sample."""

from __future__ import annotations

import sys

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

from pretrain.track.runlog import read_jsonl

NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.timeout(300)
def test_notebook_smoke_mode_trains_resumes_plots_and_compares(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    # jupyter_client starts the "python3" kernel with this interpreter (argv[0] "python" -> sys.executable),
    # so the kernel sees the venv's packages; the kernel inherits os.environ, hence monkeypatch.setenv.
    assert "python3" in KernelSpecManager().find_kernel_specs()
    monkeypatch.setenv("PRETRAIN_SMOKE", "1")
    monkeypatch.setenv("PRETRAIN_RUN_ROOT", str(tmp_path / "runs"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert f"smoke mode: True; python: {sys.executable}" in _text(code[0])
    assert not any("git clone" in _text(c) or "pip install" in _text(c) for c in code)

    base, gqa = tmp_path / "runs" / "tiny-baseline-smoke", tmp_path / "runs" / "tiny-gqa-smoke"
    for run in (base, gqa):
        end = [e for e in read_jsonl(run / "train.jsonl") if e["type"] == "end"]
        assert end[-1]["status"] == "completed" and end[-1]["step"] == 6
        assert (run / "summary.md").exists() and (run / "loss.png").exists() and (run / "last.pt").exists()
    steps = [e["step"] for e in read_jsonl(base / "train.jsonl") if e["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resume cell added nothing to a finished run
    resume_out = next(_text(c) for c in code if c.source.strip() == "launch()")
    assert "already completed" in resume_out
    assert (tmp_path / "runs" / "compare-smoke.png").stat().st_size > 5000
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # run plots + comparison shown inline
    table = _text(code[-1])
    assert "tiny-baseline-smoke" in table and "tiny-gqa-smoke" in table and "KV B/tok" in table
