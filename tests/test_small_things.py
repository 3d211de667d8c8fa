"""Small things users hit (issue 22, item 7): --tb without tensorboard says how to install it; evals, downstream
and the inference benchmark report progress when they take a while; the Colab resume text and cell survive a
runtime reset that deleted DATA."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

from pretrain.errors import run_cli
from pretrain.evals.downstream import main as downstream_main
from pretrain.evals.infer_bench import main as bench_main
from pretrain.train.entry import main as train_main

FAST = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--d-ff", "64", "--block-size", "32",
        "--batch-size", "2", "--val-frac", "0.05", "--log-every", "1", "--warmup-steps", "1", "--device", "cpu",
        "--live", "off", "--save-minutes", "0"]
ITEMS = [{"ctx": "In the beginning", "endings": ["God created", "zq xv", "blorp"], "label": 0},
         {"ctx": "And the earth", "endings": ["was without form", "qq", "pp"], "label": 0},
         {"ctx": "Let there be", "endings": ["light", "xx", "yy"], "label": 0}]


@pytest.fixture
def always_show(monkeypatch) -> None:
    """Progress from the first item on (the real threshold is seconds; these runs take less)."""
    from pretrain.track import progress

    monkeypatch.setattr(progress, "AFTER_SECONDS", 0.0)
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)


def test_tb_hint_and_progress_of_evals_downstream_and_bench(byte_data, tmp_path, monkeypatch, capsys, always_show):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the tensorboard package
    items = tmp_path / "mc.jsonl"
    items.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    out = tmp_path / "run"
    assert run_cli(train_main, ["--data", str(byte_data), "--out-dir", str(out), *FAST, "--steps", "2",
                                "--eval-every", "2", "--eval-iters", "2", "--eval-seq-lens", "16,32",
                                "--hellaswag", str(items), "--tb"]) == 0
    err = capsys.readouterr().err
    (tb,) = [line for line in err.splitlines() if "--tb" in line]
    assert tb.startswith("warning:") and "pip install tensorboard" in tb, tb
    assert "eval: 1/2 batches" in err and "eval: 2/2 batches" in err, err
    assert "eval at lengths: 1/" in err and "downstream: 3/3 items" in err, err

    assert run_cli(downstream_main, [str(out), "--hellaswag", str(items), "--checkpoint", "last"]) == 0
    assert "downstream: 1/3 items" in capsys.readouterr().err
    assert run_cli(bench_main, [str(out), "--lengths", "8,16", "--decode-tokens", "2", "--no-write"]) == 0
    err = capsys.readouterr().err
    assert "inference benchmark: 1/2 lengths" in err and "inference benchmark: 2/2 lengths" in err, err


def test_colab_resume_survives_a_runtime_reset():
    nb = json.loads((ROOT / "notebooks" / "colab_quickstart.ipynb").read_text())
    cells = nb["cells"]
    text = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("## Resume"))
    assert "/content" in text and "DATA" in text and "Drive" in text and "prepare" in text
    # launch(), which the launch and resume cells call, makes the dataset again when a reset deleted it
    launch = next("".join(c["source"]) for c in cells if "def launch(" in "".join(c["source"]))
    body = launch[launch.index("def launch("):]
    assert body.index('manifest.json").exists()') < body.index("prepare_fineweb.py") < body.index('"--run")')
