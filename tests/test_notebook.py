"""The Colab quickstart notebook runs headless (nbclient) top to bottom, as a user's cells, on CPU.

Only the settings cell (the form a user fills in) is replaced: a local source made from the bundled sample
instead of FineWeb-Edu streaming, no Drive, no wandb login, a few steps on the cpu tier. Every other cell runs
as written, so what a Colab user reads is what this test executes.
"""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest
from conftest import ROOT
from nbclient import NotebookClient

from pretrain.data.tokenizer import resolve_tokenizer
from pretrain.track.runlog import read_jsonl

NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _local_source(path, n_tokens: int = 200_000):
    """A jsonl of documents decoded from the bundled sample (public-domain text; see data/sample/PROVENANCE.md)."""
    enc = resolve_tokenizer("gpt2").build()
    tokens = np.load(ROOT / "data" / "sample" / "train_000000.npy", mmap_mode="r")[:n_tokens]
    ends = np.flatnonzero(tokens == 50256)
    docs = [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(ends[:-1], ends[1:])]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d.strip()))
    return path


@pytest.mark.timeout(900)
def test_notebook_cells_prepare_plan_train_resume_plot_and_compare(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager

    # jupyter_client starts the "python3" kernel with this interpreter (argv[0] "python" -> sys.executable),
    # so the kernel sees the venv's packages.
    assert "python3" in KernelSpecManager().find_kernel_specs()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    settings = code[0]
    assert 'REPO_URL = ""' in settings.source and "USE_DRIVE = True" in settings.source  # defaults a user sees
    assert "SMOKE" not in "".join(c.source for c in nb.cells)
    source = _local_source(tmp_path / "docs.jsonl")
    settings.source = "\n".join([
        'REPO_URL = ""', "USE_DRIVE = False", "WANDB = False", 'TOKENS = "150K"', f"SOURCE = {str(source)!r}",
        f"DATA = {str(tmp_path / 'data')!r}", f"RUN_ROOT = {str(tmp_path / 'runs')!r}", 'TAG = "nb"',
        'PLAN_ARGS = ["--vram", "cpu", "--steps", "6", "--seq-schedule", "64@0", "--eval-every", "3", '
        '"--eval-iters", "2", "--log-every", "1", "--save-every", "3"]',
    ])
    # The kernel starts in notebooks/, as Jupyter opens it from a clone: the notebook finds the repo from there.
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails

    assert not any("git clone" in _text(c) or "pip install" in _text(c) for c in code)
    runs = tmp_path / "runs"
    base = next(runs.glob("*-baseline-*nb*"))
    gqa = next(runs.glob("*-gqa-*nb*"))
    for run in (base, gqa):
        end = [e for e in read_jsonl(run / "train.jsonl") if e["type"] == "end"]
        assert end[-1]["status"] == "completed" and end[-1]["step"] == 6
        assert (run / "summary.md").exists() and (run / "loss.png").exists() and (run / "last.pt").exists()
    steps = [e["step"] for e in read_jsonl(base / "train.jsonl") if e["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resume cell added nothing to a finished run
    resume_out = next(_text(c) for c in code if c.source.strip() == "launch()")
    assert "already completed" in resume_out
    assert (runs / "compare-nb.png").stat().st_size > 5000
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # run plots + comparison shown inline
    table = _text(code[-1])
    assert base.name in table and gqa.name in table and "KV B/tok" in table
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 50257
