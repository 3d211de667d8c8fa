"""prepare_fineweb.py / pretrain.data.prepare: exact tokens from parquet, jsonl, json and txt; resume after
kill -9; extension; Hub streaming path (offline, via the parquet builder) with retries; CLI errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import GPT2_RANKS, ROOT, sample_parquet_dir

from pretrain.data import entry as prepare_fineweb
from pretrain.data.dataset import open_dataset
from pretrain.data.prepare import prepare
from pretrain.data.sources import HubDataset
from pretrain.data.tokenizer import resolve_tokenizer
from pretrain.errors import UserError, run_cli

ENC = resolve_tokenizer("gpt2").build()
EOT = 50256
FINEWEB_SAMPLE = sample_parquet_dir()  # written from the repo's data/sample, no ../shared needed
PARQUET = sorted(str(p) for p in FINEWEB_SAMPLE.glob("*.parquet"))
TEXTS = [t for f in PARQUET for t in pq.read_table(f, columns=["text"]).column(0).to_pylist()]


def expected(texts: list[str], total: int, val: int) -> tuple[list[int], list[int]]:
    """The documented stream: [EOT]+tokens per non-empty document; val = first `val` tokens; the
    document straddling the end of val is dropped; train takes the next total - val tokens."""
    stream, starts = [], []
    for t in texts:
        if t:
            starts.append(len(stream))
            stream += [EOT] + ENC.encode_ordinary(t)
    train_start = min(s for s in starts + [len(stream)] if s >= val)
    return stream[:val], stream[train_start: train_start + total - val]


def read_split(d: Path, split: str) -> list[int]:
    m = json.loads((d / "manifest.json").read_text())
    return [int(x) for s in m["shards"] if s["split"] == split for x in np.load(d / s["file"])]


def hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.npy"))}


def cli(*argv: str) -> int:
    try:
        return run_cli(prepare_fineweb.main, [*map(str, argv)])
    except SystemExit as e:  # argparse reports bad flags itself (one line, exit 2)
        return int(e.code)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Uninterrupted 300K-token run of the parquet sample with 40K-token shards, 2 worker processes."""
    d = tmp_path_factory.mktemp("ref") / "ds"
    assert cli("--tokens", "300K", "--shard-tokens", "40K", "--source", FINEWEB_SAMPLE, "--output", d,
               "--tokenizer", GPT2_RANKS, "--workers", 2) == 0
    return d


def test_parquet_sample_equals_direct_tiktoken(reference):
    val, train = expected(TEXTS, 300_000, 30_000)
    assert read_split(reference, "val") == val and read_split(reference, "train") == train
    m = json.loads((reference / "manifest.json").read_text())
    assert [s["tokens"] for s in m["shards"]] == [30_000] + [40_000] * 6 + [30_000]
    assert m["complete"] and m["dtype"] == "uint16" and m["tokenizer"] == "gpt2" and m["vocab_size"] == 50257
    assert sum(s["documents"] for s in m["shards"]) == (val + train).count(EOT)
    ds = open_dataset(reference)
    assert (ds.train_tokens, ds.val_tokens, ds.eot_id, ds.dtype) == (270_000, 30_000, EOT, "uint16")


def test_jsonl_json_txt_sources_equal_direct_tiktoken(tmp_path):
    docs = TEXTS[:120] + [None, ""] + TEXTS[120:200]  # rows without text keep numbering, add nothing
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n\n" for i, t in enumerate(docs[:100])))
    (tmp_path / "b.json").write_text(json.dumps([{"body": t} for t in docs[100:]]))
    out = tmp_path / "out"
    assert cli("--tokens", "80K", "--shard-tokens", "25K", "--val-tokens", "10K", "--source", jl,
               tmp_path / "b.json", "--text-column", "body", "--output", out, "--workers", 1) == 0
    val, train = expected([d or "" for d in docs], 80_000, 10_000)
    assert read_split(out, "val") == val and read_split(out, "train") == train

    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(TEXTS[:60]):
        (txt / f"doc{i:03d}.txt").write_text(t)
    out2 = tmp_path / "out2"
    assert cli("--tokens", "30K", "--shard-tokens", "8K", "--source", str(txt / "*.txt"), "--output", out2,
               "--workers", 1, "--progress", "rich") == 0
    val, train = expected(TEXTS[:60], 30_000, 3_000)
    assert read_split(out2, "val") == val and read_split(out2, "train") == train


def test_output_independent_of_workers_and_extension_keeps_shards(tmp_path, reference):
    d = tmp_path / "grow"
    prepare(170_000, d, [str(FINEWEB_SAMPLE)], shard_tokens=40_000, val_tokens=30_000, workers=1,
            progress="none")
    first = hashes(d)
    prepare(300_000, d, [str(FINEWEB_SAMPLE)], shard_tokens=40_000, workers=1, progress="none")
    full = [n for n, s in zip(sorted(first), json.loads((d / "manifest.json").read_text())["shards"])]
    assert {n: first[n] for n in full if n != "train_000003.npy"}.items() <= hashes(d).items()
    assert hashes(d) == hashes(reference)  # == one uninterrupted run with 2 workers


def test_kill9_mid_prepare_then_rerun_is_identical(tmp_path, reference):
    d = tmp_path / "killed"
    argv = [sys.executable, str(ROOT / "tests" / "slow_prepare.py"), "0.5", "--tokens", "300K", "--shard-tokens",
            "40K", "--source", str(FINEWEB_SAMPLE), "--output", str(d), "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {}
        if len(m.get("shards", [])) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its tokenizer workers, mid-shard
    proc.wait()
    m = json.loads((d / "manifest.json").read_text())
    assert 3 <= len(m["shards"]) < 8 and not m["complete"]
    assert cli("--tokens", "300K", "--shard-tokens", "40K", "--source", FINEWEB_SAMPLE, "--output", d,
               "--workers", 1) == 0
    assert hashes(d) == hashes(reference)
    assert not [f for f in d.iterdir() if f.name.endswith(".tmp")]


def test_hub_streaming_path_resumes_from_state_hints(tmp_path, reference):
    """The datasets-streaming source (offline, parquet builder) gives the same shards; cutting the
    manifest back to 3 shards and rerunning resumes through the stored IterableDataset state."""
    src = HubDataset("parquet", None, "train", "text", data_files=PARQUET)
    d = tmp_path / "hub"
    prepare(300_000, d, src, shard_tokens=40_000, workers=1, progress="none")
    assert hashes(d) == hashes(reference)
    for keep in (3, 1):  # resume mid-train, and right after the val split
        m = json.loads((d / "manifest.json").read_text())
        assert any(s["end"]["hint"] for s in m["shards"][1:])
        m["shards"], m["complete"] = m["shards"][:keep], False
        (d / "manifest.json").write_text(json.dumps(m))
        (d / "train_000003.npy").unlink()
        prepare(300_000, d, src, shard_tokens=40_000, workers=1, progress="none")
        assert hashes(d) == hashes(reference)


class FlakyHub(HubDataset):
    """A network error after `ok_docs` documents, `fails` times; with down=True the network then
    stays down (every later connection fails at once)."""

    def __init__(self, fails: int, ok_docs: int = 150, down: bool = False) -> None:
        super().__init__("parquet", None, "train", "text", data_files=PARQUET, sleep=lambda s: None)
        self.fails, self.ok_docs, self.down, self.loads = fails, ok_docs, down, 0

    def _load(self):
        ds, outer = super()._load(), self
        outer.loads += 1
        fail_at = 0 if self.down and self.loads > 2 else self.ok_docs  # load 1 is check()

        class Wrapped:
            def __iter__(self):
                for i, ex in enumerate(ds):
                    if i == fail_at and outer.fails:
                        outer.fails -= 1
                        raise ConnectionError("connection reset by peer")
                    yield ex

            def __getattr__(self, name):
                return getattr(ds, name)
        return Wrapped()


def test_network_errors_are_retried_then_reported(tmp_path, reference, capsys):
    d = tmp_path / "flaky"
    prepare(300_000, d, FlakyHub(fails=3), shard_tokens=40_000, workers=1, progress="none")
    assert hashes(d) == hashes(reference)
    assert capsys.readouterr().err.count("retry") == 3
    with pytest.raises(UserError, match="failed 5 times.*complete shards are saved.*rerun the same command"):
        prepare(300_000, tmp_path / "down", FlakyHub(fails=10**9, ok_docs=400, down=True), shard_tokens=40_000,
                workers=1, progress="none")
    assert json.loads((tmp_path / "down" / "manifest.json").read_text())["shards"]  # progress kept


def test_missing_or_gated_hub_dataset_is_a_clear_error(monkeypatch, tmp_path):
    import datasets

    def not_found(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'someone/private' is a gated dataset on the Hub.")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(UserError, match="not found on the Hugging Face Hub or gated.*hf auth login"):
        prepare(1000, tmp_path / "o", ["someone/private"], workers=1, progress="none")
    assert not (tmp_path / "o").exists()


def test_legacy_single_file_output(tmp_path):
    x = tmp_path / "x.npy"
    assert cli("--tokens", "50K", "--shard-tokens", "20K", "--source", PARQUET[0], "--output", x,
               "--workers", 1) == 0
    _, train = expected(pq.read_table(PARQUET[0], columns=["text"]).column(0).to_pylist(), 50_000, 0)
    assert np.load(x).tolist() == train and not (tmp_path / "x.npy.parts").exists()
    ds = open_dataset(x, val_frac=0.1)
    assert (ds.vocab_size, ds.train_tokens + ds.val_tokens) == (50257, 50_000)
    assert cli("--tokens", "50K", "--source", PARQUET[0], "--output", x) == 0  # already there


@pytest.mark.parametrize("argv,pattern", [
    (["--tokens", "abc"], "'abc' is not a number"),
    (["--tokens", "-5"], "must be a positive number"),
    (["--source", "nope/missing.parquet"], "no such file"),
    (["--output", "{file}"], "not a directory"),
    (["--output", "{junk}"], "not a dataset"),
    (["--tokenizer", "/nonexistent/gpt2.tiktoken"], "does not exist"),
    (["--tokenizer", "nosuch"], "unknown tokenizer"),
    (["--text-column", "body"], "no column 'body'"),
    (["--source", "HuggingFaceFW/fineweb-edu"], "offline"),
    (["--val-tokens", "1M"], "must be below --tokens"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, pattern):
    (tmp_path / "file").write_text("x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    base = {"--tokens": "20K", "--source": str(FINEWEB_SAMPLE), "--output": str(tmp_path / "out")}
    flags = dict(zip(argv[::2], argv[1::2]))
    merged = [str(x) for k, v in {**base, **flags}.items() for x in (k, v.format(file=tmp_path / "file",
                                                                                  junk=tmp_path / "junk"))]
    assert cli(*merged, "--workers", 1) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and pattern in err, err
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_changed_settings_on_rerun_are_refused(tmp_path, capsys):
    d = tmp_path / "ds"
    assert cli("--tokens", "30K", "--shard-tokens", "10K", "--source", PARQUET[0], "--output", d, "--workers", 1) == 0
    before = hashes(d)
    assert cli("--tokens", "60K", "--shard-tokens", "20K", "--source", PARQUET[0], "--output", d) == 2
    assert "--shard-tokens" in capsys.readouterr().err
    assert cli("--tokens", "60K", "--shard-tokens", "10K", "--source", PARQUET[1], "--output", d) == 2
    assert "--source" in capsys.readouterr().err
    assert hashes(d) == before
