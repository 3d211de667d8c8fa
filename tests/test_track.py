"""train.jsonl resume safety, summary.md, plots and TensorBoard files."""

from __future__ import annotations

import json
import math

import pytest

from pretrain.track.plots import write_plots
from pretrain.track.runlog import RunLog, read_jsonl, to_metrics
from pretrain.track.summary import write_summary
from pretrain.track.tensorboard import TBWriter


def _train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["type"] == "train"]


def test_runlog_writes_typed_timed_lines(tmp_path):
    with RunLog(tmp_path) as log:
        log.event("meta", run="x")
        log.event("train", step=1, loss=float("nan"), lr=1e-3)
    records = read_jsonl(tmp_path / "train.jsonl")
    assert [r["type"] for r in records] == ["meta", "train"]
    assert all(isinstance(r["time"], float) for r in records)
    assert records[1]["loss"] is None  # non-finite floats become null so the file stays strict JSON
    for line in (tmp_path / "train.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_runlog_resume_truncates_and_drops_torn_line(tmp_path):
    log = RunLog(tmp_path)
    log.event("meta", run="x")
    for step in range(1, 11):
        log.event("train", step=step, loss=10.0 - step)
    log.event("eval", step=10, val_loss=1.5)
    log.close()
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write('{"type": "train", "step": 11, "lo')  # killed mid-write

    log = RunLog(tmp_path, resume_step=6)
    log.close()
    records = read_jsonl(tmp_path / "train.jsonl")
    assert records[0]["type"] == "meta"
    assert _train_steps(records) == [1, 2, 3, 4, 5, 6]
    assert not [r for r in records if r["type"] == "eval"]
    assert records[-1]["type"] == "resume" and records[-1]["step"] == 6
    assert (tmp_path / "train.jsonl").read_text().endswith("\n")


def test_each_step_once_after_two_resumes(tmp_path):
    def session(resume_step, start, stop):
        log = RunLog(tmp_path, resume_step=resume_step)
        if resume_step is None:
            log.event("meta", run="x")
        for step in range(start, stop):
            log.event("train", step=step, loss=float(step))
        if stop == 30:
            log.event("end", step=stop - 1)
        log.close()

    session(None, 0, 12)   # crashes after step 11, checkpoint at 8
    session(8, 9, 20)      # crashes after step 19, checkpoint at 15
    session(15, 16, 30)    # finishes
    records = read_jsonl(tmp_path / "train.jsonl")
    assert _train_steps(records) == list(range(30))
    assert [r["step"] for r in records if r["type"] == "resume"] == [8, 15]
    assert sum(r["type"] == "meta" for r in records) == 1
    assert records[-1]["type"] == "end"


def test_fresh_runlog_replaces_old_log(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"type": "train", "step": 5}\n')
    RunLog(tmp_path).close()
    assert read_jsonl(tmp_path / "train.jsonl") == []


def test_read_jsonl_missing_file(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl") == []


def test_to_metrics_namespaces_numbers_only():
    out = to_metrics("train", {"step": 3, "loss": 2.5, "mfu": None, "device": "cpu", "mem": {"rss_gb": 1.0}})
    assert out == {"train/loss": 2.5, "train/mem/rss_gb": 1.0}


def _synthetic_log(run_dir, steps=60, evals=(0, 20, 40, 59)):
    with RunLog(run_dir) as log:
        log.event("meta", run="synthetic")
        for step in range(steps):
            log.event("train", step=step, tokens=(step + 1) * 4096, loss=10 * math.exp(-step / 20) + 3,
                      lr=3e-4 * min(1.0, (step + 1) / 10), grad_norm=1.0 / (step + 1) ** 0.5,
                      tok_s=40000 + step, mfu=None)
        for step in evals:
            log.event("eval", step=step, val_loss=10 * math.exp(-step / 20) + 3.2)


def test_write_plots_makes_nonempty_pngs(tmp_path):
    _synthetic_log(tmp_path)
    paths = write_plots(tmp_path)
    assert {p.name for p in paths} == {"loss.png", "lr.png", "throughput.png", "grad_norm.png"}
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_plots_partial_data(tmp_path):
    with RunLog(tmp_path) as log:
        log.event("eval", step=0, val_loss=10.9)  # fresh run: eval at step 0 before any train line
    assert [p.name for p in write_plots(tmp_path)] == ["loss.png"]
    assert write_plots(tmp_path / "empty") == []


def test_summary_has_best_val_and_links_existing_pngs(tmp_path):
    _synthetic_log(tmp_path)
    write_plots(tmp_path)
    (tmp_path / "grad_norm.png").unlink()
    path = write_summary(tmp_path, {
        "command": ["python", "train_v29.py", "--size", "tiny", "--out-dir", "runs/a b"],
        "train_config": {"lr": 3e-4, "steps": 60}, "model_config": {"d_model": 64, "attn": "gqa"},
        "params": 1_234_567, "non_embedding_params": 234_567, "steps": 60, "total_steps": 60,
        "tokens": 245_760, "final_val_loss": 3.25, "best_val_loss": 3.2012, "best_step": 59,
        "tok_s": 41234.0, "mfu": None, "elapsed_s": 3725, "skipped_steps": 0, "status": "finished",
    })
    text = path.read_text()
    assert path == tmp_path / "summary.md"
    assert "best val loss | 3.2012 (ppl 24.56) at step 59" in text
    assert "final val loss | 3.2500" in text
    assert "'runs/a b'" in text  # the command is shell-quoted so it can be pasted back
    assert "](loss.png)" in text and "](lr.png)" in text and "](throughput.png)" in text
    assert "grad_norm.png" not in text
    assert "MFU" not in text  # unknown off-GPU: left out, not "None"
    assert "`train.jsonl`" in text and "1h02m" in text and "| `attn` | `gqa` |" in text


def test_summary_with_empty_info(tmp_path):
    text = write_summary(tmp_path, {}).read_text()
    assert text.startswith(f"# Run `{tmp_path.name}`")


def test_tbwriter_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TBWriter(tmp_path, enabled=True)
    for step in range(1, 4):
        tb.log({"train/loss": 5.0 - step, "train/mfu": None}, step=step)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    off = TBWriter(tmp_path / "off", enabled=False)
    off.log({"a": 1.0}, step=1)
    off.close()
    assert not (tmp_path / "off").exists()


def test_tbwriter_resume_purges_overlap(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TBWriter(tmp_path, enabled=True)
    for step in range(1, 6):  # crashed after step 5, checkpoint at 3
        tb.log({"train/loss": float(step)}, step=step)
    tb.close()
    tb = TBWriter(tmp_path, enabled=True, purge_step=4)
    for step in range(4, 7):
        tb.log({"train/loss": step + 0.5}, step=step)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5), (5, 5.5), (6, 6.5)]
