"""prepare_fineweb.py under faults: group signals at random moments, a dead tokenizer worker, a full disk,
a source whose content is wrong, no network, no sched_getaffinity (macOS). Each ends quickly with one line
(or exit 130 for a signal), leaves only complete shards on disk, and the rerun gives identical bytes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ROOT, sample_parquet_dir, sample_texts

from pretrain.data import entry as prepare_fineweb
from pretrain.data.prepare import prepare
from pretrain.errors import run_cli

SAMPLE = sample_parquet_dir()
ARGS = ["--tokens", "300K", "--shard-tokens", "40K", "--source", str(SAMPLE)]


def hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.npy"))}


def cli(*argv: object) -> int:
    return run_cli(prepare_fineweb.main, [str(a) for a in argv])


def one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def consistent(d: Path) -> dict:
    """Every listed shard is whole on disk; no temp file or unlisted shard is left behind."""
    m = json.loads((d / "manifest.json").read_text())
    for s in m["shards"]:
        assert len(np.load(d / s["file"], mmap_mode="r")) == s["tokens"]
        assert s["max_token_id"] == int(np.load(d / s["file"]).max())
    assert {f.name for f in d.iterdir()} == {"manifest.json"} | {s["file"] for s in m["shards"]}
    return m


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ref") / "ds"
    prepare(300_000, d, [str(SAMPLE)], shard_tokens=40_000, workers=1, progress="none")
    return hashes(d)


def left_in_group(pgid: int, wait: float = 3.0) -> list[int]:
    """Live (non-zombie) processes still in prepare's process group after `wait` seconds at most."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def spawn(out: Path, slow: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_prepare.py"), str(slow), *ARGS, "--output",
                             str(out), "--workers", "2", "--progress", "plain"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_group_signals_at_random_moments_end_quickly_and_rerun_is_identical(tmp_path, reference):
    """As a terminal's Ctrl-C (or a container stop) does: the signal reaches prepare and its workers."""
    out, rng = tmp_path / "ds", random.Random(12)
    for trial in range(5):
        proc = spawn(out, slow=0.3)
        assert proc.stderr is not None and proc.stderr.readline().strip() == "started"
        time.sleep(rng.uniform(0.0, 2.7))  # argument parsing, forkserver, tokenizing, writing or between shards
        sig = (signal.SIGINT, signal.SIGTERM)[trial % 2]
        t0 = time.monotonic()
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"trial {trial}: prepare still running 10 s after {sig.name} to its process group")
        assert proc.returncode in (130, 0), (trial, proc.returncode, err)
        assert "Traceback" not in err.split("interrupted")[-1], err
        assert time.monotonic() - t0 < 5
        assert not left_in_group(proc.pid), f"trial {trial}: processes of prepare outlived it"
        if out.exists() and (out / "manifest.json").exists():
            consistent(out)
    assert cli(*ARGS, "--output", out, "--workers", 2) == 0
    assert hashes(out) == reference


def test_stopped_while_writing_its_first_manifest_the_same_command_starts_it(tmp_path, reference):
    """A group signal between the first manifest's temp write and its rename left a directory the rerun refused
    as "not a dataset"."""
    out = tmp_path / "ds"
    out.mkdir()
    (out / ".manifest.json.tmp").write_text('{"shards": [')
    assert cli(*ARGS, "--output", out, "--workers", 2) == 0
    assert hashes(out) == reference
    consistent(out)
    (other := tmp_path / "other").mkdir()
    (other / "notes.txt").write_text("mine")  # anything else is still refused, and kept
    assert cli(*ARGS, "--output", other) == 2 and (other / "notes.txt").read_text() == "mine"


def test_killed_tokenizer_worker_is_one_line_within_seconds(tmp_path, reference):
    """kill -9 of one worker (what the OOM killer does): Pool waited forever for its lost batch."""
    out = tmp_path / "ds"
    proc = spawn(out, slow=0.5)
    deadline = time.monotonic() + 30
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.05)
    while time.monotonic() < deadline and len(workers) < 2:  # the tokenizer processes, forked by the forkserver
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if c.ppid() != proc.pid and c.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    assert workers, "no tokenizer worker found"
    workers[0].kill()
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("prepare hung after a tokenizer worker died")
    assert proc.returncode == 2 and time.monotonic() - t0 < 5 and "Traceback" not in err, err
    one_error_line(err.strip().splitlines()[-1] + "\n", "tokenizer worker", "killed by signal 9",
                   "rerun the same command")
    assert not left_in_group(proc.pid)
    consistent(out)
    assert cli(*ARGS, "--output", out, "--workers", 2) == 0
    assert hashes(out) == reference


def test_full_disk_is_one_line_keeps_complete_shards_and_rerun_is_identical(tmp_path, reference, monkeypatch,
                                                                            capsys):
    out, real_save, calls = tmp_path / "ds", np.save, []

    def save_until_full(f, arr, **kw):
        calls.append(1)
        if len(calls) == 3:  # the third shard: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, arr, **kw)

    monkeypatch.setattr(np, "save", save_until_full)
    assert cli(*ARGS, "--output", out, "--workers", 2) == 2
    one_error_line(capsys.readouterr().err, "disk full", "free at least", "rerun the same command")
    assert len(consistent(out)["shards"]) == 2
    monkeypatch.setattr(np, "save", real_save)
    assert cli(*ARGS, "--output", out, "--workers", 2) == 0
    assert hashes(out) == reference


def test_wrong_source_content_writes_nothing_so_the_corrected_command_runs(tmp_path, capsys):
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"body": f"document {i} " * 50}) + "\n" for i in range(200)))
    out = tmp_path / "out"
    flags = ["--tokens", "20K", "--shard-tokens", "10K", "--val-tokens", "2K", "--source", jl, "--output", out]
    assert cli(*flags, "--workers", 1) == 2  # the field is "body", not the default "text"
    one_error_line(capsys.readouterr().err, "no 'text' field", "--text-column")
    assert not out.exists()
    assert cli(*flags, "--text-column", "body", "--workers", 1) == 0  # was refused as "a different source"

    bad, out2 = tmp_path / "bad.jsonl", tmp_path / "out2"
    bad.write_text("not json\n" + jl.read_text().replace('"body"', '"text"'))
    assert cli("--tokens", "20K", "--shard-tokens", "10K", "--val-tokens", "2K", "--source", bad, "--output", out2,
               "--workers", 2) == 2
    one_error_line(capsys.readouterr().err, "line 1 is not valid JSON")
    assert not out2.exists()
    bad.write_text(json.dumps({"text": 12345}) + "\n")  # a number where the text should be
    assert cli("--tokens", "20K", "--source", bad, "--output", out2, "--workers", 1) == 2
    one_error_line(capsys.readouterr().err, "'text' is a int, not text")
    assert not out2.exists()


def test_existing_single_file_of_another_tokenizer_is_refused(tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.arange(60_000, dtype=np.uint32))
    Path(f"{x}.meta").write_text("tokens: 60000\nencoding: cl100k_base\nvocab_size: 100277\nformat: npy\n")
    assert cli("--tokens", "50K", "--source", SAMPLE, "--output", x, "--workers", 1) == 2
    one_error_line(capsys.readouterr().err, "cl100k_base", "choose a new --output")


def test_no_network_fails_once_within_seconds_with_offline_hint(tmp_path, monkeypatch, capsys):
    """huggingface_hub retries each request itself (~25 s); prepare adds no second layer of retries."""
    import datasets

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    t0 = time.monotonic()
    assert cli("--tokens", "10K", "--output", tmp_path / "o", "--workers", 1) == 2
    assert time.monotonic() - t0 < 5 and len(calls) == 1
    one_error_line(capsys.readouterr().err, "cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE=1", "--source")
    assert not (tmp_path / "o").exists()


def test_default_workers_without_sched_getaffinity(tmp_path, monkeypatch):
    """macOS has no os.sched_getaffinity: the default worker count comes from os.cpu_count()."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    out = tmp_path / "ds"
    assert cli("--tokens", "30K", "--shard-tokens", "10K", "--source", SAMPLE, "--output", out,
               "--progress", "none") == 0
    assert consistent(out)["complete"]


def test_full_disk_while_joining_a_single_file_output(tmp_path, monkeypatch, capsys):
    """x.npy is joined from finished shards at the end; a full disk there (once a SIGBUS under a memmap)
    is one line, leaves no partial x.npy, and the rerun only redoes the join."""
    x = tmp_path / "x.npy"
    real = np.lib.format.write_array_header_1_0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.npy.tmp"))

    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", full)
    flags = ["--tokens", "50K", "--shard-tokens", "20K", "--source", SAMPLE, "--output", x, "--workers", 1]
    assert cli(*flags) == 2
    one_error_line(capsys.readouterr().err, "disk full")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.npy.parts"]
    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", real)
    assert cli(*flags) == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.npy", "x.npy.meta"] and len(np.load(x)) == 50_000


def test_a_signal_while_the_interpreter_exits_does_not_turn_a_finished_run_into_a_death_by_signal():
    """The group test above caught this: prepare done, Ctrl-C lands during shutdown -> exit -2, no message."""
    code = ("import os, signal, sys\n"
            "from pretrain.errors import script_exit_code\n"
            "code = script_exit_code(lambda argv: 0)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"  # what arrives after main returned: ignored, not fatal
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


# ------------------------------------------------------------------- issue 19.3: one output, one prepare, one line
def test_two_prepares_into_one_output_one_wins_the_other_is_one_line(tmp_path):
    """Different sources 0.2 s apart: both exited 0 and the dataset was one of them (or a mix)."""
    jl = tmp_path / "other.jsonl"
    jl.write_text("".join(json.dumps({"text": f"other document {i}. " * 40}) + "\n" for i in range(400)))
    out = tmp_path / "ds"
    procs = []
    for source in (SAMPLE, jl):
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "prepare_fineweb.py"), "--tokens", "100K",
                                       "--shard-tokens", "20K", "--source", str(source), "--output", str(out),
                                       "--workers", "1", "--progress", "none"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
        time.sleep(0.2)
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    codes = [code for code, _ in results]
    one_error_line(results[codes.index(2)][1], str(out))
    m = consistent(out)
    winner = (SAMPLE, jl)[codes.index(0)]
    assert m["complete"] and m["source"]["files"][0].startswith(str(winner.resolve())), m["source"]


def test_fewer_tokens_after_an_interrupted_prepare_is_refused_and_deletes_nothing(tmp_path, monkeypatch, capsys):
    """It re-planned for the smaller --tokens: finished train shards deleted, the old 10% validation kept (50%)."""
    import pretrain.data.prepare as prep

    out, real, calls = tmp_path / "ds", prep._save_shard, []

    def interrupted_after_four(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(prep, "_save_shard", interrupted_after_four)
    assert cli(*ARGS, "--output", out, "--workers", 1) == 130
    monkeypatch.setattr(prep, "_save_shard", real)
    capsys.readouterr()
    before = hashes(out)
    assert len(before) == 4 and not consistent(out)["complete"]
    assert cli("--tokens", "60K", "--shard-tokens", "40K", "--source", SAMPLE, "--output", out, "--workers", 1) == 2
    one_error_line(capsys.readouterr().err, str(out), "--tokens 300,000", "new --output")
    assert hashes(out) == before


def test_a_single_txt_source_says_exactly_what_to_do_and_that_works(tmp_path, capsys):
    """One .txt is one document: it straddles the validation cut and is dropped, so no --val-tokens could help."""
    from pretrain.data.dataset import open_dataset

    txt = tmp_path / "book.txt"
    txt.write_text("\n\n".join(sample_texts(200_000)))
    out = tmp_path / "book"
    assert cli("--tokens", "20K", "--source", txt, "--output", out, "--workers", 1) == 2
    err = capsys.readouterr().err
    one_error_line(err, f"--output {out}.npy", "--val-frac")
    assert cli("--tokens", "20K", "--source", txt, "--output", f"{out}.npy", "--workers", 1) == 0
    ds = open_dataset(f"{out}.npy", val_frac=0.05)
    assert ds.train_tokens + ds.val_tokens == 20_000


@pytest.mark.parametrize("where", ["footer", "row group"])
def test_a_corrupt_parquet_is_one_line_naming_the_file(tmp_path, capsys, where):
    """A 27-line pyarrow traceback without the file's name."""
    src = sorted(SAMPLE.glob("*.parquet"))[0]
    bad = tmp_path / "src" / src.name
    bad.parent.mkdir()
    data = bytearray(src.read_bytes())
    if where == "footer":
        data = data[: len(data) // 2]
    else:  # the first row group's pages: the footer (and check()) stay fine, reading the text fails
        data[100:20_000] = b"\xff" * 19_900
    bad.write_bytes(bytes(data))
    assert cli("--tokens", "30K", "--source", bad, "--output", tmp_path / "ds", "--workers", 1) == 2
    one_error_line(capsys.readouterr().err, str(bad), "corrupt")


def test_a_prepare_that_finished_meanwhile_is_not_overwritten(tmp_path, monkeypatch, capsys):
    """The other order of the race above: the first prepare ends between the second's look at --output (empty)
    and its first write; the second must not delete the first's shards as "leftovers"."""
    import pretrain.data.prepare as prep

    jl = tmp_path / "other.jsonl"
    jl.write_text("".join(json.dumps({"text": f"other document {i}. " * 40}) + "\n" for i in range(400)))
    out, real = tmp_path / "ds", prep.tokenized

    def another_prepare_first(*args, **kwargs):
        monkeypatch.setattr(prep, "tokenized", real)
        prepare(60_000, out, [str(jl)], shard_tokens=20_000, workers=1, progress="none")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(prep, "tokenized", another_prepare_first)
    assert cli("--tokens", "60K", "--shard-tokens", "20K", "--source", SAMPLE, "--output", out, "--workers", 1) == 2
    one_error_line(capsys.readouterr().err, "another prepare wrote", str(out))
    m = consistent(out)
    assert m["complete"] and m["source"]["files"] == [str(jl.resolve())]
