"""--mirror: checkpoints that outlive the machine, against a real S3 API (moto's server on localhost, through
s3fs) and a local path: a killed run whose run dir is gone resumes bit-identical from the mirror, a failing or
hanging mirror never touches training, and a half-uploaded or damaged checkpoint is never resumed from."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pretrain.errors import UserError
from pretrain.track.runlog import read_jsonl
from pretrain.train import mirror as mirror_lib
from pretrain.train import mirror_store
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.loop import train

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "mirror-test"
STEPS = 16
FLAGS = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
         "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "1",
         "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--live", "off", "--save-minutes", "0",
         "--steps", str(STEPS), "--save-every", "4", "--keep-last", "2", "--eval-every", "8"]


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint on loopback (moto's server), reached through s3fs with dummy credentials via the
    standard AWS_ENDPOINT_URL, which the trainer (also as a subprocess) picks up like any S3-compatible store."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(data: Path, out: Path, *flags: str) -> dict:
    return train(parse_config(["--data", str(data), "--out-dir", str(out), *FLAGS, *flags]))


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["last_loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"}


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def listing(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(prefix))
    except FileNotFoundError:
        return []


def mirror_keeps_up(monkeypatch) -> None:
    """Each save first waits (bounded) for the mirror to finish the upload before it: a mirror faster than
    training, so which checkpoints reach it is the same on a loaded machine (where a slow upload would have the
    next save supersede it, as it should in production)."""
    original = mirror_lib.Mirror.push

    def push(self, step: int, best: bool) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._job is None and not self._busy, timeout=60)
        original(self, step, best)

    monkeypatch.setattr(mirror_lib.Mirror, "push", push)


@pytest.fixture(scope="module")
def straight(byte_data, tmp_path_factory) -> Path:
    """The same run without a mirror and without interruption: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(byte_data, out)
    return out


def test_kill9_delete_run_dir_and_resume_from_s3_bit_identical(s3, byte_data, straight, tmp_path, capfd,
                                                               monkeypatch):
    out, url = tmp_path / "run", f"s3://{BUCKET}/kill"
    remote = f"{BUCKET}/kill/run"
    cmd = [sys.executable, str(ROOT / "train_v29.py"), "--data", str(byte_data), "--out-dir", str(out), *FLAGS,
           "--mirror", url]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and "step_8.json" not in listing(s3, remote) and proc.poll() is None:
        time.sleep(0.05)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert running, f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
    assert "step_8.json" in listing(s3, remote)

    shutil.rmtree(out)  # the machine, and its disk, are gone
    mirror_keeps_up(monkeypatch)
    result = run(byte_data, out, "--mirror", url)  # the same command on a new machine
    assert result["status"] == "completed" and result["step"] == STEPS
    pulled = [e for e in read_jsonl(out / "train.jsonl") if e["type"] == "resume"]
    assert pulled and pulled[-1]["step"] >= 8
    assert "mirror: pulled step" in capfd.readouterr().err
    assert losses(out) == losses(straight)
    assert same_weights(out, straight)

    # The mirror kept --keep-last 2 good steps (the newest being the final one), best.pt and the files.
    names = listing(s3, remote)
    assert [n for n in names if n.startswith("step_")] == ["step_12.json", "step_12.pt", "step_16.json", "step_16.pt"]
    assert {"best.pt", "best.json", "train.jsonl", "summary.md"} <= set(names)
    assert "newest step 16" in (out / "summary.md").read_text()


def test_mirror_failing_mid_upload_leaves_training_alone_and_the_next_resume_correct(
        s3, byte_data, straight, tmp_path, monkeypatch, capfd):
    """The final checkpoint's upload dies half-way every time (a dropped connection after half the bytes)."""
    out, url, remote = tmp_path / "run", f"s3://{BUCKET}/fail", f"{BUCKET}/fail/run"
    monkeypatch.setattr(mirror_lib, "BACKOFF_S", (0.01, 0.01))
    original = mirror_store._upload

    def dies_half_way(fs, src, path):
        if path.endswith(f"step_{STEPS}.pt"):
            data = src.read()
            fs.pipe_file(path, data[: len(data) // 2])  # what a broken multi-part or a mounted dir leaves
            raise ConnectionError("connection reset by peer")
        return original(fs, src, path)

    monkeypatch.setattr(mirror_store, "_upload", dies_half_way)
    mirror_keeps_up(monkeypatch)
    result = run(byte_data, out, "--mirror", url)
    assert result["status"] == "completed" and result["saved"]
    assert losses(out) == losses(straight) and same_weights(out, straight)
    err = capfd.readouterr().err
    assert f"upload of step {STEPS}" in err and "retrying" in err and "gave up" in err
    summary = (out / "summary.md").read_text()
    assert "newest step 12" in summary and "1 failed (last: ConnectionError" in summary
    names = listing(s3, remote)
    assert f"step_{STEPS}.pt" in names and f"step_{STEPS}.json" not in names  # half a file, no marker

    monkeypatch.setattr(mirror_store, "_upload", original)
    shutil.rmtree(out)
    result = run(byte_data, out, "--mirror", url)
    assert result["status"] == "completed"
    assert "mirror: pulled step 12" in capfd.readouterr().err  # never the half-uploaded step 16
    assert losses(out) == losses(straight) and same_weights(out, straight)


def test_a_hanging_mirror_never_holds_up_training(s3, byte_data, straight, tmp_path, monkeypatch, capfd):
    out, url, remote = tmp_path / "run", f"s3://{BUCKET}/hang", f"{BUCKET}/hang/run"
    release, stuck, hanging = threading.Event(), set(), [True]
    original = mirror_store._upload

    def hangs(fs, src, path):
        me = threading.current_thread()
        if hanging[0]:  # the mirror stops answering (the first run's upload thread), then times out
            stuck.add(me)
        if me in stuck:
            release.wait(60)
            raise TimeoutError("read timed out")
        return original(fs, src, path)

    monkeypatch.setattr(mirror_store, "_upload", hangs)
    monkeypatch.setattr(mirror_lib, "FINAL_WAIT_S", 0.5)
    monkeypatch.setattr(mirror_lib, "FILES_WAIT_S", 0.5)
    try:
        result = run(byte_data, out, "--mirror", url)
        assert result["status"] == "completed" and result["saved"]
        assert losses(out) == losses(straight) and same_weights(out, straight)
        summary = (out / "summary.md").read_text()
        assert "0 checkpoint(s) copied" in summary and f"step {STEPS} NOT mirrored" in summary
        assert "skipped for a newer one" in summary  # steps 8 and 12 waited behind the hung upload of step 4
        assert f"step {STEPS} is not on" in capfd.readouterr().err

        # The mirror answers again; the run is extended: it first uploads the step it resumed from.
        hanging[0] = False
        monkeypatch.undo()  # the real waits again: the extension's last upload must be awaited
        monkeypatch.setattr(mirror_store, "_upload", hangs)  # the first run's thread stays hung
        mirror_keeps_up(monkeypatch)
        result = run(byte_data, out, "--mirror", url, "--steps", str(STEPS + 4))
    finally:
        release.set()
    assert result["step"] == STEPS + 4
    names = listing(s3, remote)
    assert [n for n in names if n.startswith("step_")] == [f"step_{STEPS}.json", f"step_{STEPS}.pt",
                                                          f"step_{STEPS + 4}.json", f"step_{STEPS + 4}.pt"]


def test_local_path_mirror_prunes_skips_a_damaged_checkpoint_and_refuses_a_fresh_start(byte_data, tmp_path, capfd,
                                                                                       monkeypatch):
    out, mirror = tmp_path / "run", tmp_path / "mounted"
    mirror_keeps_up(monkeypatch)
    short = ["--steps", "8", "--save-every", "2"]
    run(byte_data, out, "--mirror", str(mirror), *short)
    names = sorted(p.name for p in (mirror / "run").iterdir())
    assert names == ["best.json", "best.pt", "step_6.json", "step_6.pt", "step_8.json", "step_8.pt",
                     "summary.md", "train.jsonl"]
    marker = json.loads((mirror / "run" / "step_8.json").read_text())
    assert marker["size"] == (out / "last.pt").stat().st_size

    # The newest mirrored checkpoint is damaged after its upload (same size, other bytes): its hash no longer
    # matches, so a new machine takes step 6 and continues from there.
    data = bytearray((mirror / "run" / "step_8.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (mirror / "run" / "step_8.pt").write_bytes(bytes(data))
    shutil.rmtree(out)
    capfd.readouterr()
    result = run(byte_data, out, "--mirror", str(mirror), "--steps", "10", "--save-every", "2")
    err = capfd.readouterr().err
    assert "skipping step 8" in err and "do not match its marker" in err and "mirror: pulled step 6" in err
    assert result["step"] == 10
    steps = [e["step"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"]
    assert steps == list(range(1, 11))  # the mirrored train.jsonl came back with the checkpoint

    # A rollback to step 8 abandons step 10 on the mirror too: a new machine must never pull the abandoned branch.
    run(byte_data, out, "--mirror", str(mirror), "--steps", "9", "--save-every", "2", "--resume",
        str(out / "step_8.pt"))
    assert sorted(p.name for p in (mirror / "run").iterdir() if p.name.startswith("step_")) == \
        ["step_8.json", "step_8.pt", "step_9.json", "step_9.pt"]

    # A fresh start over a mirrored run would replace it: refused in one line, nothing on the mirror touched.
    before = sorted(p.name for p in (mirror / "run").iterdir())
    with pytest.raises(UserError, match="holds checkpoints of a run.*--overwrite"):
        run(byte_data, tmp_path / "other" / "run", "--mirror", str(mirror), "--resume", "never")
    assert sorted(p.name for p in (mirror / "run").iterdir()) == before


def test_launcher_passes_mirror_on_and_shows_it_in_the_plan(tmp_path, capsys):
    from pretrain.errors import run_cli
    from pretrain.plan import launch

    root = ["--vram", "cpu", "--steps", "5", "--run-root", str(tmp_path / "runs")]
    assert launch.main([*root, "--mirror", "s3://bucket/pretrain"]) == 0
    out = capsys.readouterr().out
    command = out.split("command:")[1].split()
    assert command[command.index("--mirror") + 1] == "s3://bucket/pretrain"
    name = command[command.index("--out-dir") + 1].rsplit("/", 1)[-1]
    assert f"mirror: every checkpoint, train.jsonl and summary.md copied in the background to " \
           f"s3://bucket/pretrain/{name} " in out
    assert run_cli(launch.main, [*root, "--mirror", "nosuch://bucket/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --mirror nosuch://bucket/x: Protocol not known") and "\n" not in err
