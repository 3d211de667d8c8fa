"""Research instruments through the trainer: --analysis-every diagnostics and --eval-seq-lens, read back from
train.jsonl, TensorBoard, summary.md, the plots and `compare`; their bad input is one line and exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import cli_exit

from model import GPT, ModelConfig
from pretrain.evals.diagnostics import effective_rank, gradient_sq_norms
from pretrain.track.compare import main as compare_main
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import parse_config
from pretrain.train.loop import train

TINY = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "96", "--block-size", "64",
        "--batch-size", "2", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "1", "--log-every", "2",
        "--warmup-steps", "1", "--lr", "3e-3", "--device", "cpu", "--live", "off", "--save-minutes", "0",
        "--steps", "4", "--eval-every", "2"]
LENGTHS = "16,32,64,128"  # trained on 32, block 64: 128 is past the model's context


def run(data: Path, out: Path, *flags: str) -> dict:
    return train(parse_config(["--data", str(data), "--out-dir", str(out), *TINY, *flags]))


def events(out: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(out / "train.jsonl") if e["type"] == kind]


@pytest.fixture(scope="module")
def decoupled_run(byte_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "dec"
    run(byte_data, out, "--exp", "paper_decoupled", "--analysis-every", "2", "--eval-seq-lens", LENGTHS, "--tb",
        "--wandb", "--wandb-mode", "offline")
    return out


def test_diagnostics_every_n_steps_in_train_jsonl(decoupled_run):
    diags = events(decoupled_run, "diagnostics")
    assert [d["step"] for d in diags] == [0, 2, 4]
    last = diags[-1]
    assert set(last["layer"]) == {"00", "01"} and last["rows"] == 2 and last["seq_len"] == 32
    for row in last["layer"].values():
        assert 0 < row["entropy"] < math.log(33 + 1)  # at most uniform over 32 keys + the null slot
        assert 0 < row["null_mass"] < 1  # paper_decoupled has null_attn
        assert 0 < row["sem_share"] < 1  # and two score paths
        assert 1 <= row["key_erank"] <= row["key_width"] and 1 <= row["value_erank"] <= row["value_width"]
        assert -1 <= row["cos_in_out"] <= 1 and row["grad_norm"] > 0
    assert last["embed_grad_norm"] > 0
    assert len(last["head"]["00"]["entropy"]) == 4  # 2 layers x 4 heads is small enough for per-head series
    assert set(last["mean"]) >= {"entropy", "null_mass", "sem_share", "key_erank", "grad_norm"}


def test_eval_lengths_in_train_jsonl_with_position_curve(decoupled_run):
    evals = events(decoupled_run, "eval")
    by_len = events(decoupled_run, "eval_lengths")
    assert [e["step"] for e in by_len] == [e["step"] for e in evals] == [0, 2, 4]
    last = by_len[-1]
    assert list(last["loss"]) == ["16", "32", "64", "128"] and last["trained_len"] == 32
    # Every length scores the same targets: the 128-token windows (tests/test_length_curves.py checks the losses).
    assert last["targets"] == 128 * 1
    pos = last["position"]
    assert pos["seq_len"] == 128 and len(pos["x"]) == len(pos["loss"]) == 8  # bins of 16 positions: 1 row only
    assert list(pos["buckets"]) == ["pos_0", "pos_1", "pos_3", "pos_7", "pos_15", "pos_31", "pos_63"]


def test_instruments_reach_tensorboard_summary_and_plots(decoupled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(decoupled_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"diag/mean/entropy", "diag/layer/01/null_mass", "diag/layer/00/sem_share", "diag/layer/00/grad_norm",
            "diag/head/00/entropy/h3", "val_len/loss/128", "val_len/position/buckets/pos_63"} <= tags
    assert [e.step for e in acc.Scalars("val_len/loss/128")] == [0, 2, 4]
    summary = (decoupled_run / "summary.md").read_text()
    assert "## Validation loss by length" in summary and "| 128 (extrapolated) |" in summary
    assert "## Attention diagnostics" in summary and "semantic share" in summary
    assert "(position_loss.png)" in summary and (decoupled_run / "position_loss.png").stat().st_size > 0


def test_instruments_reach_the_offline_wandb_file(decoupled_run):
    from wandb_records import read_wandb_history

    files = list(decoupled_run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    merged: dict[int, dict] = {}
    for row in read_wandb_history(files[0]):
        merged.setdefault(row["_step"], {}).update(row)
    for e in events(decoupled_run, "diagnostics"):
        assert merged[e["step"]]["diag/mean/entropy"] == pytest.approx(e["mean"]["entropy"])
        assert merged[e["step"]]["diag/layer/01/grad_norm"] == pytest.approx(e["layer"]["01"]["grad_norm"])
    for e in events(decoupled_run, "eval_lengths"):
        assert merged[e["step"]]["val_len/loss/128"] == pytest.approx(e["loss"]["128"])


def test_compare_shows_loss_per_length_and_plots_it(decoupled_run, byte_data, tmp_path, capsys):
    base = tmp_path / "base"
    run(byte_data, base, "--eval-seq-lens", LENGTHS)
    out = tmp_path / "cmp.png"
    assert compare_main([str(decoupled_run), str(base), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert all(f"val@{n}" in header for n in (16, 32, 64, 128))
    assert (tmp_path / "cmp_lengths.png").stat().st_size > 0 and "val loss vs eval length" in text


def test_effective_rank_extremes():
    assert effective_rank(torch.outer(torch.arange(1.0, 9.0), torch.ones(5))) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, abs=1e-5)


@pytest.mark.parametrize("flags,words", [
    (["--eval-seq-lens", "512,1k"], ["'1k'", "--eval-seq-lens"]),
    (["--eval-seq-lens", "64,0"], ["'0'", "--eval-seq-lens"]),
    (["--eval-seq-lens", "64,100000000"], ["100000000", "validation split"]),
    (["--analysis-every", "-1"], ["--analysis-every"]),
    (["--exp", "paper_decoupled", "--attn", "baseline"], ["paper_decoupled means", "--attn baseline"]),
])
def test_bad_instrument_flags_are_one_line_exit_2(byte_data, tmp_path, flags, words, capsys):
    from pretrain.train.entry import main

    out = tmp_path / "r"
    code = cli_exit(main, ["--data", str(byte_data), "--out-dir", str(out), *TINY, *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(w in err for w in words), err
    assert not out.exists()


def test_diagnostics_need_no_more_memory_than_the_training_step(byte_data, tmp_path, monkeypatch):
    """Through the trainer with every tensor it allocates tracked (torch's MemTracker on real CPU tensors): under
    --grad-checkpoint the diagnostics' gradient pass recomputes activations as the step does, so running them
    never needs more memory than training itself (in eval mode it kept every block's activations)."""
    from pretrain.plan.memory import _PeakTracker
    from pretrain.train import loop

    tracker: _PeakTracker | None = None
    diag_spans: list[tuple[int, int]] = []
    real_loop, real_diagnostics = loop._loop, loop.run_diagnostics

    def tracked_loop(s, stop):
        nonlocal tracker
        tracker = _PeakTracker(record=True)
        tracker.track_external(s.model, s.optimizer)
        with tracker:
            return real_loop(s, stop)

    def marked_diagnostics(s):
        start = len(tracker.ops)
        real_diagnostics(s)
        diag_spans.append((start, len(tracker.ops)))

    monkeypatch.setattr(loop, "_loop", tracked_loop)
    monkeypatch.setattr(loop, "run_diagnostics", marked_diagnostics)
    out = tmp_path / "run"
    assert loop.main(["--data", str(byte_data), "--out-dir", str(out), "--size", "tiny", "--d-model", "64",
                      "--n-head", "4", "--n-layer", "6", "--d-ff", "256", "--block-size", "64", "--batch-size", "8",
                      "--val-frac", "0.05", "--eval-iters", "1", "--device", "cpu", "--live", "off",
                      "--save-minutes", "0", "--save-every", "0", "--steps", "5", "--eval-every", "0",
                      "--analysis-every", "2", "--grad-checkpoint"]) == 0
    assert [d["step"] for d in events(out, "diagnostics")] == [0, 2, 4, 5]
    totals = [total for _, total in tracker.ops]
    tracked = [(a, b) for a, b in diag_spans if b > a]
    assert len(tracked) == 3  # steps 0, 2, 4 ran inside the tracked loop; step 5's after it, with the final save
    in_diag = set().union(*(range(a, b) for a, b in tracked))
    diagnostics = max(totals[i] for i in in_diag)
    training = max(t for i, t in enumerate(totals) if i not in in_diag)
    print(f"peak bytes: diagnostics {diagnostics:,}, training {training:,}")
    assert diagnostics <= training, (diagnostics, training)


def test_the_diagnostics_gradient_norms_are_exact_on_cpu_too():
    """--analysis-every's per-block and embedding gradient norms (pretrain/evals/diagnostics.py) sum their squares as
    the clip does: a 3.2M-value embedding gradient's, summed in fp32, would differ in its last digits."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50304, block_size=16, n_layer=1, n_head=2, d_model=64, d_ff=128))
    x = torch.randint(0, 50304, (2, 16))
    sq = gradient_sq_norms(model, x, x.roll(1), torch.autocast("cpu", enabled=False))
    grads = torch.autograd.grad(model(x, x.roll(1)), [*model.blocks[0].parameters(), model.wte.weight])
    blocks, embed = grads[:-1], grads[-1:]
    want = [math.fsum(t.double().square().sum().item() for t in ts) for ts in (blocks, embed)]
    assert sq.tolist() == [torch.tensor(w, dtype=torch.float32).item() for w in want]
