"""wandb offline: what we log is what the .wandb file holds, a resume continues the same run id with
strictly increasing steps, and wandb failures never stop training."""

from __future__ import annotations

import struct

import pytest
from wandb_records import iter_wandb_records, read_wandb_history

from pretrain.track.wandb_run import RUN_ID_FILE, WandbRun

pytest.importorskip("wandb")


def _open(run_dir, **kw):
    args = dict(config={"lr": 3e-4}, enabled=True, project="pretrain-test", entity=None, name="t",
                group=None, tags=["test"], mode="offline", run_id=None)
    args.update(kw)
    return WandbRun(run_dir, **args)


def _history(run_dir) -> list[dict]:
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no .wandb file under {run_dir}"
    return [row for f in files for row in read_wandb_history(f)]


def test_offline_run_reads_back_and_resumes(tmp_path):
    losses = {0: 10.9, 1: 9.5, 2: 8.25, 3: 7.125}
    wb = _open(tmp_path)
    assert wb.enabled and wb.run_id
    for step, loss in losses.items():
        wb.log({"train/loss": loss, "train/lr": 1e-4 * (step + 1), "train/mfu": None}, step=step)
    wb.log({"train/loss": 99.0}, step=2)  # a step already sent: dropped, not sent
    wb.finish()
    run_id = wb.run_id
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == run_id

    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].name == f"run-{run_id}.wandb"
    assert files[0].read_bytes()[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    kinds = {r.WhichOneof("record_type") for r in iter_wandb_records(files[0])}
    assert {"run", "history"} <= kinds
    rows = [r for r in _history(tmp_path) if "train/loss" in r]
    assert [(r["_step"], r["train/loss"]) for r in rows] == list(losses.items())
    assert "train/mfu" not in rows[0]

    # Resume (checkpoint at step 2, crash after 3): same id found via the run dir, later steps only.
    wb2 = _open(tmp_path, config={"lr": 3e-4, "steps": 10})
    assert wb2.run_id == run_id
    wb2.log({"train/loss": 6.5}, step=4)
    wb2.log({"train/loss": 6.0, "val/loss": 6.1}, step=5)
    wb2.finish()
    steps = [r["_step"] for r in _history(tmp_path) if "train/loss" in r]
    assert steps == [0, 1, 2, 3, 4, 5]
    assert all(b > a for a, b in zip(steps, steps[1:]))


def test_explicit_run_id_wins_and_fresh_ignores_stored(tmp_path):
    (tmp_path / RUN_ID_FILE).write_text("storedid1\n")
    wb = _open(tmp_path, run_id="ckptid123")
    assert wb.run_id == "ckptid123"
    wb.finish()
    wb = _open(tmp_path, fresh=True)
    assert wb.run_id not in ("ckptid123", "storedid1")
    wb.finish()


def test_disabled_is_noop(tmp_path):
    wb = _open(tmp_path, enabled=False)
    wb.log({"train/loss": 1.0}, step=1)
    wb.finish()
    assert wb.run_id is None and not wb.enabled
    assert not (tmp_path / "wandb").exists()


def test_init_failure_warns_once_and_continues(tmp_path):
    warnings: list[str] = []
    wb = _open(tmp_path, mode="not-a-mode", warn=warnings.append)
    wb.log({"train/loss": 1.0}, step=1)
    wb.finish()
    assert not wb.enabled and len(warnings) == 1 and "wandb disabled" in warnings[0]


def test_reader_stops_at_torn_tail(tmp_path):
    wb = _open(tmp_path)
    for step in range(3):
        wb.log({"train/loss": float(step)}, step=step)
    wb.finish()
    path = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    full = list(iter_wandb_records(path))
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # killed mid-record
    assert len(list(iter_wandb_records(path))) == len(full) - 1
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a wandb"):
        list(iter_wandb_records(path))
