"""Resuming is the same run (issue 19): a rollback keeps the live branch and sets the abandoned one aside, a
command that writes a default out is the command that left it out, and the logged figures do not depend on
where a run was interrupted."""

from __future__ import annotations

from pathlib import Path

import torch
from faults import nan_at_step
from test_track_trust import FAST, events, sigterm_at_batch, trainer

from pretrain.errors import EXIT_STOPPED
from pretrain.train.checkpoint import load_checkpoint

QUIET = ["--eval-every", "0", "--save-every", "0"]


def names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.suffix == ".pt"}


def test_rollback_sets_the_abandoned_branch_aside_and_later_fall_backs_stay_on_the_live_one(
        byte_data, made_bytes, tmp_path, capsys):
    out = tmp_path / "r"
    keep = ["--eval-every", "0", "--keep-last", "3"]
    assert trainer(byte_data, out, *keep, "--steps", "9", "--save-every", "3") == 0
    assert names(out) == {"step_3.pt", "step_6.pt", "step_9.pt", "last.pt", "best.pt"}
    before = (out / "train.jsonl").read_text()

    # Roll back to step 3 and go on with other data: a new branch from step 3.
    new_data = ["--data", str(made_bytes), "--allow-data-change", "--save-every", "1"]
    assert trainer(byte_data, out, *keep, *new_data, "--resume", str(out / "step_3.pt"), "--steps", "5") == 0
    assert names(out) == {"step_3.pt", "step_4.pt", "step_5.pt", "last.pt", "best.pt"}  # nothing of it pruned
    [aside] = (out / "abandoned").iterdir()
    assert aside.name.startswith("branch-from-step3-")
    assert names(aside) == {"step_6.pt", "step_9.pt", "last.pt", "best.pt"}  # moved, never deleted
    assert {load_checkpoint(aside / n)["step"] for n in names(aside)} == {6, 9}
    assert (aside / "train.jsonl").read_text() == before
    [resume] = events(out, "resume")
    assert resume["step"] == 3 and resume["branch"]["from_step"] == 3 and resume["branch"]["reached_step"] == 9
    assert resume["branch"]["moved_to"] == f"abandoned/{aside.name}"
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3, 4, 5]
    assert f"rolled back to step 3: the abandoned branch (to step 9) is set aside in abandoned/{aside.name}/" \
        in capsys.readouterr().out
    assert f"abandoned/{aside.name}" in (out / "summary.md").read_text().split("## Resumes", 1)[1]

    # last.pt is damaged: the fall-back resumes the live branch's newest checkpoint, not the abandoned step 9.
    (out / "last.pt").unlink()  # a hard link of step_5.pt: replace it rather than damage both
    (out / "last.pt").write_bytes(b"torn")
    assert trainer(byte_data, out, *keep, *new_data, "--steps", "7") == 0
    assert [(e["step"], Path(e["from"]).name) for e in events(out, "resume")] == [(3, "step_3.pt"), (5, "step_5.pt")]
    assert [e["step"] for e in events(out, "train")] == list(range(1, 8))
    final = load_checkpoint(out / "last.pt")
    assert final["step"] == 7 and final["data_fingerprint"] == load_checkpoint(out / "step_5.pt")["data_fingerprint"]
    assert names(aside) == {"step_6.pt", "step_9.pt", "last.pt", "best.pt"}


def test_train_loss_and_skipped_count_do_not_depend_on_where_the_run_was_interrupted(byte_data, tmp_path,
                                                                                      monkeypatch):
    flags = [*QUIET, "--steps", "8", "--log-every", "4"]
    nan_at_step(monkeypatch, 5)  # a skipped step inside the window that the stop cuts
    assert trainer(byte_data, tmp_path / "straight", *flags) == 0
    monkeypatch.undo()

    nan_at_step(monkeypatch, 5)
    sigterm_at_batch(monkeypatch, 7)  # stops inside step 7: saved after step 6, mid-window (5..8)
    assert trainer(byte_data, tmp_path / "resumed", *flags) == EXIT_STOPPED
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 6
    assert trainer(byte_data, tmp_path / "resumed", *flags) == 0

    straight, resumed = events(tmp_path / "straight", "train"), events(tmp_path / "resumed", "train")
    assert [e["step"] for e in resumed] == [e["step"] for e in straight] == [4, 8]
    for key in ("loss", "last_loss", "lr", "grad_norm", "tokens", "skipped_steps"):
        assert [e[key] for e in resumed] == [e[key] for e in straight], key  # identical, not merely close
    assert resumed[-1]["skipped_steps"] == 1
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["skipped_steps"] == b["skipped_steps"] == 1


def without_lr(flags: list[str]) -> list[str]:
    i = flags.index("--lr")
    return flags[:i] + flags[i + 2:]


def test_writing_a_default_out_is_the_same_run_and_overwrite_says_why_it_resumes(byte_data, tmp_path, monkeypatch,
                                                                                capsys):
    from pretrain.train.loop import main

    out = tmp_path / "r"
    base = ["--data", str(byte_data), "--out-dir", str(out), *without_lr(FAST), *QUIET, "--steps", "4"]
    # What the launcher prints: every default written out (tiny adamw: lr 6e-4, beta2 0.95, min-lr lr/10).
    explicit = ["--lr", "6e-4", "--beta2", "0.95", "--min-lr", "6e-5", "--n-kv-head", "4"]
    sigterm_at_batch(monkeypatch, 3)
    assert main([*base, *explicit]) == EXIT_STOPPED
    monkeypatch.undo()
    capsys.readouterr()
    # The same run typed by hand, leaving the defaults out; --overwrite cannot wipe a run a rerun must continue.
    assert main([*base, "--overwrite"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "--overwrite" in line]
    assert len(said) == 1 and "ignored" in said[0] and "--resume never --overwrite" in said[0]
    assert [e["step"] for e in events(out, "resume")] == [2]
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3, 4]


def test_a_new_batch_split_of_the_same_global_batch_is_recorded(byte_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    sigterm_at_batch(monkeypatch, 3)
    assert trainer(byte_data, out, *QUIET, "--steps", "4") == EXIT_STOPPED  # --batch-size 4 --grad-accum 1
    monkeypatch.undo()
    assert trainer(byte_data, out, *QUIET, "--steps", "4", "--batch-size", "2", "--grad-accum", "2") == 0
    change = {"batch_size": [4, 2], "grad_accum": [1, 2], "world_size": [1, 1]}
    assert [e.get("batch_change") for e in events(out, "resume")] == [change]
    words = "--batch-size 4 x --grad-accum 1 x 1 rank(s) -> 2 x 2 x 1 (global batch 4 sequences, unchanged)"
    assert words in capsys.readouterr().out
    resumes = (out / "summary.md").read_text().split("## Resumes", 1)[1].split("##", 1)[0]
    assert words in resumes
