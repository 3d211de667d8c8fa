"""The original paper's attention instruments (issue 21.5): each metric against a numpy reference on constructed
attention, then through the trainer (--analysis-every): the diag keys in train.jsonl, attn_maps/*.npz + heatmap,
diagnostics.png and summary.md's links, compare's columns; bad map flags are one line and exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.errors import run_cli
from pretrain.evals import paper_metrics as pm
from pretrain.track.compare import main as compare_main
from pretrain.track.runlog import read_jsonl, to_metrics
from pretrain.train.loop import main as train_main

T = 12


def causal_uniform(t: int) -> np.ndarray:
    """Row q spreads its mass evenly over keys 0..q."""
    return np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]


def heads(*mats: np.ndarray) -> torch.Tensor:
    """(1, H, T, S) probabilities from H (T, S) matrices."""
    return torch.tensor(np.stack(mats)[None], dtype=torch.float32)


def test_topk_mass_is_k_over_t_for_uniform_rows_and_one_for_one_hot():
    p = heads(np.full((T, T), 1 / T), np.eye(T))
    assert pm.topk_mass(p, 8).tolist() == pytest.approx([8 / T, 1.0])
    assert pm.topk_mass(p, 100).tolist() == pytest.approx([1.0, 1.0])  # k past the keys: the whole row


@pytest.mark.parametrize("null_slot", [False, True])
def test_local_mass_counts_keys_q_minus_w_to_q(null_slot):
    w = 3
    a = causal_uniform(T)
    ref = np.mean([min(q, w) + 1 for q in range(T)] / np.arange(1, T + 1))  # (min(q,w)+1)/(q+1) per row
    if null_slot:  # half of every row on the null slot: never local
        a = np.concatenate([np.full((T, 1), 0.5), a / 2], axis=1)
        ref /= 2
    assert pm.local_mass(heads(a), w, null_slot).item() == pytest.approx(ref, rel=1e-6)
    assert pm.local_mass(heads(np.eye(T)), 0).item() == pytest.approx(1.0)


def test_attention_rank_and_effective_rank_match_numpy_svd():
    rng = np.random.default_rng(0)
    noisy = causal_uniform(T) * rng.uniform(0.5, 1.5, (T, T))
    mats = [np.eye(T), np.full((T, T), 1 / T), causal_uniform(T), noisy / noisy.sum(1, keepdims=True)]
    rank, erank = pm.rank_and_erank(torch.tensor(np.stack(mats), dtype=torch.float32))
    assert rank.tolist() == [T, 1, T, T]
    assert rank.tolist() == [np.linalg.matrix_rank(m.astype(np.float32)) for m in mats]
    for m, got in zip(mats, erank.tolist(), strict=True):
        s = np.linalg.svd(m, compute_uv=False)
        s = s[s > 0] / s.sum()
        assert got == pytest.approx(math.exp(-(s * np.log(s)).sum()), rel=1e-4)
    # corner(): the first sequence, null column dropped (or kept for maps), at most `tokens` rows and keys
    p = torch.rand(2, 3, 5, 6)
    assert torch.equal(pm.corner(p, True, tokens=4), p[0, :, :4, 1:5])
    assert torch.equal(pm.corner(p, True, tokens=4, keep_null=True), p[0, :, :4, :5])


def test_stable_rank_matches_numpy_svd():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    assert pm.stable_rank(w).item() == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-5)
    assert pm.stable_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(7))).item() == pytest.approx(1.0, rel=1e-5)
    assert pm.stable_rank(torch.eye(6)).item() == pytest.approx(6.0, rel=1e-6)


def test_share_sem_msq_is_the_originals_mean_squared_logit_ratio_without_the_null_slot():
    g = torch.Generator().manual_seed(2)
    sem, geo = torch.randn(2, 3, 5, 6, generator=g), 2 * torch.randn(2, 3, 5, 6, generator=g)
    sem[..., 0] = 100.0  # the null column: not a token pair, left out
    e_sem, e_geo = (sem[..., 1:] ** 2).mean(), (geo[..., 1:] ** 2).mean()
    assert pm.share_msq(sem, geo, True).item() == pytest.approx((e_sem / (e_sem + e_geo)).item(), rel=1e-5)


TINY = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "96", "--block-size", "64",
        "--batch-size", "2", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "1", "--log-every", "2",
        "--device", "cpu", "--live", "off", "--save-minutes", "0", "--steps", "2", "--eval-every", "2",
        "--exp", "paper_decoupled", "--analysis-every", "2"]


@pytest.fixture(scope="module")
def mapped_run(byte_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "maps"
    # top-k past the 33 keys (32 + null) -> mass 1; a window over every key -> local mass = 1 - null mass
    assert run_cli(train_main, ["--data", str(byte_data), "--out-dir", str(out), *TINY, "--analysis-topk", "64",
                                "--analysis-local-window", "64", "--attn-map-layers", "0,-1",
                                "--attn-map-heads", "0,3"]) == 0
    return out


def test_trainer_logs_the_paper_instruments_under_diag(mapped_run):
    diags = [e for e in read_jsonl(mapped_run / "train.jsonl") if e["type"] == "diagnostics"]
    assert [d["step"] for d in diags] == [0, 2]
    for row in diags[-1]["layer"].values():
        assert row["topk_mass"] == pytest.approx(1.0, abs=1e-5)
        assert row["local_mass"] == pytest.approx(1 - row["null_mass"], abs=1e-5)
        assert 1 <= row["attn_erank"] <= row["attn_rank"] <= 32
        assert 0 < row["share_sem_msq"] < 1
        stable = {k for k in row if k.startswith("stable_rank_")}
        assert stable == {f"stable_rank_{n}" for n in ("q_sem", "q_geo", "v", "o")}  # paper_decoupled ties k to q
        assert all(1 <= row[k] <= 64 for k in stable)
    assert len(diags[-1]["head"]["01"]["topk_mass"]) == 4
    metrics = to_metrics("diag", diags[-1])  # what Session.emit sends to wandb / TensorBoard
    assert {"diag/mean/topk_mass", "diag/mean/share_sem_msq", "diag/layer/01/stable_rank_o",
            "diag/head/00/attn_rank/h3"} <= set(metrics)
    assert diags[-1]["attn_map"] == "attn_maps/step_000002.png"


def test_attention_maps_are_small_npz_files_whose_rows_sum_to_one(mapped_run):
    maps = mapped_run / "attn_maps"
    assert sorted(p.name for p in maps.iterdir()) == ["step_000000.npz", "step_000000.png",
                                                      "step_000002.npz", "step_000002.png"]
    with np.load(maps / "step_000002.npz") as z:
        assert sorted(z.files) == ["L0_H0", "L0_H3", "L1_H0", "L1_H3", "null_slot"] and int(z["null_slot"]) == 1
        for name in ("L0_H0", "L1_H3"):
            a = z[name]
            assert a.dtype == np.float16 and a.shape == (32, 33)  # 32 queries x (null slot + 32 keys)
            assert np.allclose(a.astype(np.float32).sum(-1), 1.0, atol=5e-3)
            assert np.all(np.triu(a[:, 1:], 1) == 0)  # causal: nothing on future keys
    assert (maps / "step_000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnostics_figure_is_drawn_and_linked_from_summary(mapped_run):
    assert (mapped_run / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (mapped_run / "summary.md").read_text()
    assert "(diagnostics.png)" in summary
    assert "![attention maps](attn_maps/step_000002.png)" in summary and "top-k mass" in summary


@pytest.mark.parametrize("flags,words", [
    (["--attn-map-layers", "0,5"], ["--attn-map-layers", "layer 5"]),
    (["--attn-map-layers", "0", "--attn-map-heads", "x"], ["--attn-map-heads", "'x'"]),
    (["--attn-map-layers", "0", "--analysis-every", "0"], ["--analysis-every N"]),
])
def test_bad_attention_map_flags_are_one_line_exit_2(byte_data, tmp_path, capsys, flags, words):
    out = tmp_path / "r"
    assert run_cli(train_main, ["--data", str(byte_data), "--out-dir", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()


def test_compare_shows_the_last_diagnostics_per_run(mapped_run, capsys):
    assert compare_main([str(mapped_run), "--no-plot", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["diag:topk_mass"] == pytest.approx(1.0, abs=1e-5)  # --analysis-topk 64 covers every key
    assert 1 < row["diag:stable_rank"] <= 64 and 0 < row["diag:share_sem_msq"] < 1
    assert compare_main([str(mapped_run), "--no-plot"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "top-k mass" in header and "sem share msq" in header and "stable rank" in header
