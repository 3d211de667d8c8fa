"""The one checkpoint finder of the commands that read a finished run: generate, downstream, export and
infer_bench all pick best.pt, else last.pt, else the newest step_<N>.pt when --checkpoint is not given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import GPT, ModelConfig
from pretrain.evals import downstream, infer_bench
from pretrain.export import MARKER
from pretrain.export import main as export_main
from pretrain.generate import main as generate_main

TINY = ModelConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, d_model=32, d_ff=64)


def _save(run: Path, name: str, step: int) -> None:
    torch.manual_seed(step)
    torch.save({"model": GPT(TINY).state_dict(), "model_config": TINY.to_dict(), "train_config": {}, "step": step},
               run / name)


def _picked_by_generate(run: Path, tmp_path: Path, capsys) -> tuple[str, int]:
    assert generate_main([str(run), "--prompt", "ab", "--max-new-tokens", "1", "--temperature", "0"]) == 0
    header = capsys.readouterr().err.strip().splitlines()[0]  # "[<path>, step <N>, <attn>]"
    path, step, _ = header.strip("[]").split(", ")
    return Path(path).name, int(step.removeprefix("step "))


def _picked_by_downstream(run: Path, tmp_path: Path, capsys) -> tuple[str, int]:
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}) + "\n")
    assert downstream.main([str(run), "--hellaswag", str(items), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    return Path(out["checkpoint"]).name, out["step"]


def _picked_by_export(run: Path, tmp_path: Path, capsys) -> tuple[str, int]:
    pytest.importorskip("safetensors")
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    marker = json.loads((tmp_path / "hf" / MARKER).read_text())
    return Path(marker["checkpoint"]).name, marker["step"]


def _picked_by_infer_bench(run: Path, tmp_path: Path, capsys) -> tuple[str, int]:
    assert infer_bench.main([str(run), "--lengths", "8", "--decode-tokens", "1", "--dtype", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)[0]
    step = [e for e in map(json.loads, (run / "train.jsonl").read_text().splitlines()) if e["type"] == "infer"]
    return out["checkpoint"], step[-1]["step"]


@pytest.mark.parametrize("command", [_picked_by_generate, _picked_by_downstream, _picked_by_export,
                                     _picked_by_infer_bench], ids=["generate", "downstream", "export", "infer_bench"])
@pytest.mark.parametrize("files, expected", [
    ({"best.pt": 1, "last.pt": 3, "step_3.pt": 3}, ("best.pt", 1)),  # best, even when last is newer
    ({"last.pt": 3, "step_2.pt": 2}, ("last.pt", 3)),  # a run without evals has no best.pt
    ({"step_2.pt": 2, "step_3.pt": 3}, ("step_3.pt", 3)),  # last.pt gone: the newest numbered one
], ids=["best", "last", "step_N"])
def test_every_command_reading_a_run_has_the_same_default_checkpoint(tmp_path, capsys, command, files, expected):
    run = tmp_path / "run"
    run.mkdir()
    for name, step in files.items():
        _save(run, name, step)
    assert command(run, tmp_path, capsys) == expected
