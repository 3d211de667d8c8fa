"""Chaos in the checkpoint writer: a save that fails part-way (full disk, a crashing serializer) keeps the previous
save and training goes on, a stop or final save that failed is never claimed as saved, and a checkpoint whose
tensor bytes rotted on disk is never resumed from. Configuration and tools: chaos_run.py."""

from __future__ import annotations

import errno
import os
import signal
from typing import Any

import pytest
from chaos_run import STEPS, TMP_PREFIX, argv, assert_matches_reference, events, run_inprocess

import pretrain.train.checkpoint as ck
from pretrain.errors import run_cli
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.loop import main


# ------------------------------------------------------------------------------------------- write failures
@pytest.mark.parametrize("failure", ["enospc", "exception"])
def test_failed_checkpoint_write_keeps_previous_and_training_goes_on(
        byte_data, tmp_path, chaos_reference, monkeypatch, capfd, failure) -> None:
    real = ck._write_payload
    seen: dict[str, Any] = {}
    out = tmp_path / "run"

    def flaky(f, state):
        if state["step"] == 4:  # the second save fails part-way through
            f.write(b"\0" * 4096)
            if failure == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise RuntimeError("serializer crashed")
        if state["step"] == 6:  # the next save: what did the failure leave behind?
            seen["last_step"] = load_checkpoint(out / "last.pt")["step"]
            seen["temps"] = len(list(out.glob(f"{TMP_PREFIX}*")))  # only this write's own
            seen["step_4"] = (out / "step_4.pt").exists()
        real(f, state)

    monkeypatch.setattr(ck, "_write_payload", flaky)
    steps = STEPS if failure == "enospc" else 8  # one full run is enough for the reference comparison
    result = run_inprocess(byte_data, out, "--steps", str(steps))
    err = capfd.readouterr().err
    assert result["status"] == "completed"
    assert seen == {"last_step": 2, "temps": 1, "step_4": False}, "the failed write damaged the previous save"
    message = "No space left on device" if failure == "enospc" else "serializer crashed"
    warning = [line for line in err.splitlines() if "step 4" in line and message in line]
    assert len(warning) == 1 and warning[0].startswith("warning:") and "training goes on" in warning[0]
    assert load_checkpoint(out / "last.pt")["step"] == steps  # later saves succeed
    if steps == STEPS:
        assert_matches_reference(out, chaos_reference)  # a failed save does not perturb training either


@pytest.mark.parametrize("when", ["signal", "final"])
def test_run_does_not_claim_a_save_that_failed(byte_data, tmp_path, monkeypatch, capfd, when) -> None:
    """The stop/finish save fails: the trainer must not report it as saved (message, exit code)."""
    from pretrain.data import loader as data_mod

    out = tmp_path / "run"
    steps = 6
    real_write, real_next = ck._write_payload, data_mod.Prefetcher.next
    calls = {"n": 0}

    def failing_from_step_3(f, state):
        if state["step"] >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(f, state)

    def next_then_signal(self, batch_size, seq_len):
        calls["n"] += 1
        if when == "signal" and calls["n"] == 2 * 3 + 1:  # first micro-batch of step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self, batch_size, seq_len)

    monkeypatch.setattr(ck, "_write_payload", failing_from_step_3)
    monkeypatch.setattr(data_mod.Prefetcher, "next", next_then_signal)
    code = run_cli(main, argv(byte_data, out, "--steps", str(steps)))
    err = capfd.readouterr().err
    on_disk = load_checkpoint(out / "last.pt")["step"]
    assert on_disk == 2 and "no space left" in err.lower()
    stopped_at = 3 if when == "signal" else steps
    assert f"saved step {stopped_at}" not in err, f"claims step {stopped_at} was saved, but last.pt holds {on_disk}"
    assert code != 0, f"exit code 0 although the {when} checkpoint (step {stopped_at}) was never written"


# ------------------------------------------------------------------------------------------------ bit rot
def test_bit_flip_in_tensor_data_is_not_loaded(byte_data, tmp_path, capfd) -> None:
    """A checkpoint whose tensor bytes were damaged (bad disk, torn network copy) must not be resumed from.

    torch.load does not verify the CRC-32s torch.save writes for every zip member, so a flipped byte inside
    a tensor loads silently as a slightly different weight.
    """
    import zipfile

    out = tmp_path / "run"
    run_inprocess(byte_data, out, "--steps", "4")
    last = out / "last.pt"
    with zipfile.ZipFile(last) as z:  # the largest tensor record: embedding weights or an Adam moment
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(last, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x40]))
    capfd.readouterr()
    run_inprocess(byte_data, out, "--steps", "6")
    resumed = events(out, "resume")[-1]["step"]
    assert resumed != 4, "resumed from a last.pt whose tensor data is corrupt (CRC mismatch not detected)"
