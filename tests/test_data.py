"""Loader tests: opening/validating datasets, sampler determinism, resume, rank slices, val, prefetch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.dataset import open_dataset
from pretrain.data.loader import Prefetcher, TrainSampler, ValWindows
from pretrain.data.manifest import FORMAT, MANIFEST, VERSION, atomic_write_json, shard_name
from pretrain.data.permutation import FeistelPermutation
from pretrain.errors import UserError, run_cli

VOCAB = 60000  # > token count, so every token value is unique


def make_dataset(d: Path, train_sizes=(5000, 3001, 2000), val_sizes=(1500,), dtype="uint16",
                 vocab=VOCAB) -> Path:
    """Shards whose tokens are (global position % vocab), so a window's content reveals its position."""
    d.mkdir(parents=True, exist_ok=True)
    shards, pos = [], 0
    for split, sizes in (("val", val_sizes), ("train", train_sizes)):
        for i, n in enumerate(sizes):
            arr = (np.arange(pos, pos + n) % vocab).astype(dtype)
            pos += n
            np.save(d / shard_name(split, i), arr)
            shards.append({"file": shard_name(split, i), "split": split, "tokens": n, "documents": 1,
                           "max_id": int(arr.max())})
    atomic_write_json(d / MANIFEST, {
        "format": FORMAT, "version": VERSION, "tokenizer": "test", "vocab_size": vocab, "eot_id": vocab - 1,
        "dtype": dtype, "shards": shards})
    return d


@pytest.fixture
def ds_dir(tmp_path):
    return make_dataset(tmp_path / "ds")


def batches(sampler, schedule):
    return [sampler.next_batch(b, t) for b, t in schedule]


def test_open_reports_facts_and_windows_are_shifted_pairs(ds_dir):
    ds = open_dataset(ds_dir)
    assert (ds.vocab_size, ds.eot_id, ds.tokenizer, ds.dtype) == (VOCAB, VOCAB - 1, "test", "uint16")
    assert (ds.train_tokens, ds.val_tokens) == (10001, 1500)
    x, y = TrainSampler(ds, seed=1).next_batch(4, 16)
    assert x.dtype == torch.int64 and x.shape == (4, 16) and y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # consecutive positions (mod vocab), and the first token of a window is on the 16-token grid
    assert torch.all((y - x) % VOCAB == 1)
    starts = (x[:, 0] - 1500) % VOCAB  # train starts right after 1500 val tokens
    assert all(int(s) % 16 in (0, 5000 % 16, 8001 % 16) for s in starts)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4097])
def test_permutation_is_a_bijection(n):
    out = FeistelPermutation(n, seed=3, epoch=2)(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 17:
        assert out.tolist() != list(range(n))


def test_same_seed_same_batches_different_seed_differs(ds_dir):
    sched = [(4, 16)] * 5
    a = batches(TrainSampler(open_dataset(ds_dir), seed=7), sched)
    b = batches(TrainSampler(open_dataset(ds_dir), seed=7), sched)  # e.g. another model variant
    c = batches(TrainSampler(open_dataset(ds_dir), seed=8), sched)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))


def test_epoch_visits_every_window_once_then_reshuffles(ds_dir):
    ds = open_dataset(ds_dir)
    t = 50
    n = ds.windows(t)  # 99 + 60 + 39 = 198
    s = TrainSampler(ds, seed=0)
    first = torch.cat([s.next_batch(n // 2, t)[0] for _ in range(2)])
    assert s.epoch == 1 and s.index == 0
    rows = {tuple(r.tolist()) for r in first}
    assert len(rows) == n
    second = torch.cat([s.next_batch(n // 2, t)[0] for _ in range(2)])
    assert {tuple(r.tolist()) for r in second} == rows
    assert not torch.equal(first, second)
    assert s.epoch == 2


def test_two_ranks_concatenated_equal_one_rank_double_batch(ds_dir):
    ds = open_dataset(ds_dir)
    one = TrainSampler(ds, seed=5)
    ranks = [TrainSampler(ds, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in range(40):  # crosses epoch boundaries (198 windows / 6 per step)
        t = 50 if step < 25 else 40
        x1, y1 = one.next_batch(6, t)
        parts = [r.next_batch(3, t) for r in ranks]
        assert torch.equal(x1, torch.cat([p[0] for p in parts]))
        assert torch.equal(y1, torch.cat([p[1] for p in parts]))
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    assert one.epoch >= 1


def test_resume_is_exact_including_through_seq_len_change(ds_dir):
    sched = [(4, 32)] * 7 + [(4, 64)] * 6 + [(2, 64)] * 3 + [(4, 16)] * 40
    ref = batches(TrainSampler(open_dataset(ds_dir), seed=11), sched)
    for cut in (3, 7, 9, 15, 30):
        s = TrainSampler(open_dataset(ds_dir), seed=11)
        batches(s, sched[:cut])
        state = json.loads(json.dumps(s.state_dict()))  # checkpoint-safe: plain ints/strs
        r = TrainSampler(open_dataset(ds_dir), seed=999)
        r.load_state_dict(state)
        got = batches(r, sched[cut:])
        for (x1, y1), (x2, y2) in zip(ref[cut:], got):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_seq_len_change_keeps_epoch_progress(ds_dir):
    s = TrainSampler(open_dataset(ds_dir), seed=0)
    batches(s, [(10, 20)] * 10)  # 100 windows x 20 tokens consumed
    s.next_batch(1, 40)
    assert s.state_dict()["index"] == 100 * 20 // 40 + 1 and s.state_dict()["seq_len"] == 40


def test_val_windows_fixed_and_distinct(ds_dir):
    v1 = ValWindows(open_dataset(ds_dir), seq_len=64, batch_size=4, n_batches=3)
    a, b = list(v1), list(v1)
    c = list(ValWindows(open_dataset(ds_dir), seq_len=64, batch_size=4, n_batches=3))
    assert len(a) == len(v1) == 3
    for (x1, y1), (x2, y2), (x3, _) in zip(a, b, c):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1, x3)
    rows = {tuple(r.tolist()) for x, _ in a for r in x}
    assert len(rows) == 12
    assert all(int(x[0, 0]) < 1500 for x, _ in a)  # all from val tokens (0..1499)
    # asking for more windows than exist gives all of them, in fewer batches
    assert len(ValWindows(open_dataset(ds_dir), seq_len=64, batch_size=4, n_batches=100)) == 5


def test_val_frac_carves_the_tail_deterministically(tmp_path):
    d = make_dataset(tmp_path / "nv", val_sizes=())
    with pytest.raises(UserError, match="--val-frac"):
        open_dataset(d)
    ds = open_dataset(d, val_frac=0.25)
    assert ds.val_tokens == 2500 and ds.train_tokens == 10001 - 2500
    assert int(ds.val[-1][-1]) == (10000 % VOCAB) and len(ds.val) == 2  # spans the last two shards
    assert list(ValWindows(ds, 32, 2, 2))[0][0].tolist() == list(ValWindows(open_dataset(d, 0.25), 32, 2, 2))[0][
        0].tolist()
    assert open_dataset(d, require_val=False).val_tokens == 0


def test_legacy_npy_and_glob(tmp_path):
    arr = (np.arange(3000) % VOCAB).astype(np.uint16)
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(UserError, match="x.npy.meta"):
        open_dataset(tmp_path / "x.npy", val_frac=0.1)
    (tmp_path / "x.npy.meta").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256}))
    ds = open_dataset(tmp_path / "x.npy", val_frac=0.1)
    assert (ds.vocab_size, ds.train_tokens, ds.val_tokens) == (50257, 2700, 300)
    d = make_dataset(tmp_path / "g")
    ds = open_dataset(str(d / "*.npy"))
    assert ds.train_tokens == 10001 and ds.val_tokens == 1500


def test_prefetcher_matches_sampler_and_reports_consumed_state(ds_dir):
    sched = [(4, 32)] * 5 + [(2, 32)] * 3 + [(4, 16)] * 4
    direct = TrainSampler(open_dataset(ds_dir), seed=3)
    loader = Prefetcher(TrainSampler(open_dataset(ds_dir), seed=3), "cpu")
    for i, (b, t) in enumerate(sched):
        x1, y1 = direct.next_batch(b, t)
        x2, y2 = loader.next(b, t)
        assert torch.equal(x1, x2) and torch.equal(y1, y2), i
        assert loader.state_dict() == direct.state_dict()  # never includes prefetched batches
    state = loader.state_dict()
    expect = [direct.next_batch(4, 16) for _ in range(3)]
    fresh = Prefetcher(TrainSampler(open_dataset(ds_dir), seed=0), "cpu")
    fresh.load_state_dict(state)
    for x1, _ in expect:
        assert torch.equal(x1, fresh.next(4, 16)[0])
    loader.close()
    fresh.close()


def test_prefetcher_surfaces_errors(ds_dir):
    loader = Prefetcher(TrainSampler(open_dataset(ds_dir), seed=3), "cpu")
    with pytest.raises(UserError, match="fewer than one batch"):
        loader.next(4, 5000)
    loader.close()


def corrupt(d: Path, how: str) -> None:
    m = json.loads((d / MANIFEST).read_text())
    if how == "json":
        (d / MANIFEST).write_text("{not json")
        return
    if how == "tokens":
        m["shards"][1]["tokens"] += 1
    elif how == "missing":
        (d / m["shards"][1]["file"]).unlink()
    elif how == "dtype":
        np.save(d / m["shards"][1]["file"], np.zeros(m["shards"][1]["tokens"], dtype=np.uint32))
    elif how == "schema":
        del m["vocab_size"]
    (d / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("how,pattern", [
    ("json", "cannot read"), ("tokens", "inconsistent"), ("missing", "missing"),
    ("dtype", "mixes shard dtypes"), ("schema", "vocab_size"),
])
def test_bad_datasets_give_one_line_user_errors(tmp_path, capsys, how, pattern):
    d = make_dataset(tmp_path / how)
    corrupt(d, how)
    assert run_cli(lambda argv: open_dataset(d) and 0, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and pattern in err and "Traceback" not in err


def test_other_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(UserError, match="no .npy files match"):
        open_dataset(str(tmp_path / "empty" / "*.npy"))
    ds = open_dataset(make_dataset(tmp_path / "ok"))
    ds.check_vocab(VOCAB)
    ds.check_vocab(VOCAB + 24)  # padded embedding rows are fine
    with pytest.raises(UserError, match="smaller than the dataset"):
        ds.check_vocab(VOCAB - 1)
    ds.check_enough(1, 4000)  # only the 5000-token shard holds a 4000-token window
    with pytest.raises(UserError, match="fewer than one batch"):
        ds.check_enough(2, 4000)
    with pytest.raises(UserError, match="fewer than one batch"):
        TrainSampler(ds, 0).next_batch(1000, 1000)
    with pytest.raises(UserError, match="fewer than one eval batch"):
        ValWindows(ds, 1000, 4, 1)
    g = make_dataset(tmp_path / "g32", train_sizes=(100,), val_sizes=(), dtype="uint32")
    np.save(tmp_path / "g32" / "train_000001.npy", np.zeros(100, dtype=np.uint16))
    with pytest.raises(UserError, match="mixes shard dtypes"):
        open_dataset(str(g / "train_*.npy"), val_frac=0.1)


ORIGINAL_META = ("tokens: {n}\ndocuments: 97\nencoding: gpt2\nvocab_size: 50257\n"
                 "source: HuggingFaceFW/fineweb-edu\nformat: npy\n")
TINY = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--d-ff", "64", "--block-size", "32",
        "--batch-size", "2", "--train-seq-len", "32", "--eval-iters", "1", "--steps", "2",
        "--device", "cpu", "--live", "off", "--save-minutes", "0", "--val-frac", "0.1"]


def train_cli(data: Path, out: Path, *flags: str) -> int:
    from pretrain.train.loop import main

    return run_cli(main, ["--data", str(data), "--out-dir", str(out), *TINY, *flags])


def sample_tokens(n: int) -> np.ndarray:
    return np.load(Path(__file__).resolve().parents[1] / "data" / "sample" / "train_000000.npy")[:n]


def test_original_code_npy_with_key_value_meta_trains(tmp_path):
    """The original prepare_fineweb.py wrote fineweb_1b.npy + a .meta of `key: value` lines, not JSON."""
    x = tmp_path / "fineweb_1b.npy"
    np.save(x, sample_tokens(20_000))
    Path(f"{x}.meta").write_text(ORIGINAL_META.format(n=20_000))
    assert train_cli(x, tmp_path / "run") == 0
    events = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "train"][-1] == 2 and events[-1]["type"] == "end"
    ds = open_dataset(x, val_frac=0.1)
    assert (ds.tokenizer, ds.vocab_size, ds.eot_id) == ("gpt2", 50257, 50256)


def test_bare_npy_trains_with_vocab_size_and_says_so_without(tmp_path, capsys):
    x = tmp_path / "bare.npy"
    np.save(x, sample_tokens(20_000))
    assert train_cli(x, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--vocab-size" in err, err
    assert not (tmp_path / "run").exists()
    assert train_cli(x, tmp_path / "run", "--vocab-size", "50257") == 0
    assert '"type": "end"' in (tmp_path / "run" / "train.jsonl").read_text()


@pytest.mark.parametrize("meta,pattern", [
    ("tokens 5\n", "neither JSON nor 'key: value'"),
    ("tokens: 5\nencoding: gpt2\n", "no integer vocab_size"),
    ('{"vocab_size": "many"}', "no integer vocab_size"),
])
def test_bad_meta_is_one_line(tmp_path, capsys, meta, pattern):
    x = tmp_path / "x.npy"
    np.save(x, sample_tokens(1000))
    Path(f"{x}.meta").write_text(meta)
    assert run_cli(lambda argv: open_dataset(x, val_frac=0.1) and 0, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and pattern in err, err
