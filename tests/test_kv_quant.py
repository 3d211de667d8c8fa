"""Quantized KV caches (issue 21.6): the q8_0 / q4_0 / nf4 block quantizers against a float64 reference, the
bytes a cache really holds, decoding through each cache, and the user's path: generate --kv-cache,
python -m pretrain.evals.infer_bench --kv-cache and compare --measure showing bytes, decode tok/s and val-loss change
per setting (and a point per setting on the quality-vs-KV plot)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import plots_unrendered

from model import GPT, ModelConfig
from model.kv_formats import parse_kv_setting, parse_kv_settings
from model.kv_quant import NF4_LEVELS, QuantKVCache, block_layout, dequantize, quantize
from pretrain.errors import run_cli
from pretrain.evals.infer_bench import main as bench_main
from pretrain.evals.kv_quality import decode_loss
from pretrain.generate import main as generate_main
from pretrain.track.compare import main as compare_main
from pretrain.track.kv_plot import quality_kv_points
from pretrain.track.runlog import read_jsonl
from pretrain.train.loop import main as train_main

SMALL = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
         "--batch-size", "4", "--grad-accum", "1", "--train-seq-len", "32", "--steps", "6", "--eval-iters", "2",
         "--eval-every", "3", "--log-every", "1", "--save-every", "0", "--save-minutes", "0", "--live", "off",
         "--val-frac", "0.05", "--no-compile", "--no-grad-checkpoint", "--param-dtype", "fp32", "--device", "cpu"]


def _blocks_of(x: torch.Tensor, fmt: str) -> torch.Tensor:
    qb, pad = block_layout(fmt, x.shape[-1])
    return torch.nn.functional.pad(x, (0, pad - x.shape[-1])).unflatten(-1, (-1, qb))


@pytest.mark.parametrize("dim", [64, 40, 7])
def test_quantizers_stay_within_half_a_step_of_float64(dim):
    torch.manual_seed(dim)
    x = torch.randn(3, 2, 5, dim, dtype=torch.float64) * torch.logspace(-3, 2, 5, dtype=torch.float64).view(1, 1, 5, 1)
    x[0, 0, 0] = 0.0  # an all-zero row: scale 0 must not divide by zero
    x[1, 1, 1, 0] = 1e3  # an outlier widens its own block only
    # Half the widest gap between neighbouring NF4 levels: the farthest any value can be from its level.
    nf4_half_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False)) / 2
    for fmt, bound in (("q8_0", 0.5), ("q4_0", 0.5), ("nf4", nf4_half_gap)):
        codes, scale = quantize(x, fmt)
        assert scale.dtype == torch.float16 and codes.dtype == (torch.int8 if fmt == "q8_0" else torch.uint8)
        back = dequantize(codes, scale, fmt, dim, torch.float64)
        assert back.shape == x.shape and torch.all(back[0, 0, 0] == 0)
        err = _blocks_of((back - x).abs(), fmt).amax(-1)  # per block
        s = scale.double()
        assert torch.all(err <= s * bound * (1 + 1e-6) + 1e-300), (fmt, (err / s).max())
        # The steps really are absmax / 127 (q8_0), absmax / 7 (q4_0), absmax (nf4), up to fp16 rounding.
        amax = _blocks_of(x.abs(), fmt).amax(-1)
        div = {"q8_0": 127, "q4_0": 7, "nf4": 1}[fmt]
        torch.testing.assert_close(s, amax / div, rtol=2e-3, atol=1e-7)
    # Values on each format's grid come back exactly (nibble packing and code offsets round-trip).
    for fmt, grid in (("q8_0", torch.arange(-127, 128, 8, dtype=torch.float64) / 16),  # absmax 127/16: step 1/16
                      ("q4_0", torch.arange(-7, 8, dtype=torch.float64).repeat(3)[:32] / 4),  # step 1/4
                      ("nf4", (torch.tensor(NF4_LEVELS) * 3).double().repeat(2))):  # levels x scale, in fp32
        c, sc = quantize(grid.view(1, -1), fmt)
        assert torch.equal(dequantize(c, sc, fmt, grid.numel(), torch.float64).view(-1), grid), fmt


def test_settings_parse_and_name_themselves():
    assert parse_kv_setting("q4_0:residual=64").name == "q4_0:residual=64"
    s = parse_kv_setting("sem=q4_0/geo=q8_0/v=q4_0")
    assert (s.k, s.v, s.sem, s.geo) == ("bf16", "q4_0", "q4_0", "q8_0") and parse_kv_setting(s.name) == s
    assert [x.name for x in parse_kv_settings("bf16, q8_0,q8_0,nf4")] == ["bf16", "q8_0", "nf4"]
    for bad in ("q3", "q8_0:window=4", "x=q8_0", "q4_0:residual=-1"):
        with pytest.raises(ValueError):
            parse_kv_setting(bad)


def _tiny(attn: str, dtype: torch.dtype = torch.float32, sharpen: float = 0.0) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", attn=attn, vocab_size=256)).to(dtype).eval()
    if sharpen:  # larger projections: attention far from uniform, so the cache's errors show in the loss
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "wte" not in name:
                    p.normal_(0.0, sharpen)
    return model


@pytest.mark.parametrize("attn", ["baseline", "gqa", "decoupled"])
def test_cache_bytes_are_the_tensors_held(attn):
    """Exact bytes per token of the tiny shapes (2 layers, 4 heads of 16; gqa 1 kv head; decoupled keys 8 + 8):
    q8_0 = 1 byte a value + a 2-byte scale a block, 4-bit = half a byte + the scale, the ring in the dtype."""
    model = _tiny(attn, torch.bfloat16)
    kv_heads = 1 if attn == "gqa" else 4
    # per kv head and token: bytes of keys + values
    per_head = {"bf16": 64, "q8_0": 36, "q4_0": 20, "nf4": 20}
    if attn == "decoupled":  # keys are two 8-wide halves, each its own block
        per_head = {"bf16": 64, "q8_0": (8 + 2) * 2 + 18, "q4_0": (4 + 2) * 2 + 10, "nf4": (4 + 2) * 2 + 10}
    for fmt, bytes_ in per_head.items():
        caches = model.new_caches(1, 10, parse_kv_setting(fmt))
        assert sum(c.nbytes() for c in caches) == 2 * kv_heads * bytes_ * 10, fmt
    ring = model.new_caches(1, 10, parse_kv_setting("q4_0:residual=4"))
    assert sum(c.nbytes() for c in ring) == 2 * kv_heads * (per_head["q4_0"] * 10 + 4 * 32 * 2)
    if attn == "decoupled":
        mixed = model.new_caches(1, 10, parse_kv_setting("sem=q4_0/geo=q8_0/v=q4_0"))
        assert sum(c.nbytes() for c in mixed) == 2 * kv_heads * ((4 + 2) + (8 + 2) + 10) * 10


@pytest.mark.parametrize("attn", ["baseline", "decoupled"])
def test_decoding_through_the_caches(attn):
    model = _tiny(attn, torch.bfloat16)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(idx)

        def decoded(setting):
            caches = model.new_caches(2, 24, setting)
            return torch.cat([model.lm_head(model.hidden_states(idx[:, t:t + 1], caches))[..., :256]
                              for t in range(24)], dim=1), caches

        own, caches = decoded(parse_kv_setting("bf16"))
        assert type(caches[0]).__name__ == "KVCache"  # the model's own cache, not a copy through a store
        torch.testing.assert_close(own.float(), full.float(), atol=2e-2, rtol=0)
        # A window as long as the text keeps everything in bf16: exactly the model's own cache.
        windowed, caches = decoded(parse_kv_setting("q4_0:residual=24"))
        assert isinstance(caches[0], QuantKVCache) and torch.equal(windowed, own)
        q4 = decoded(parse_kv_setting("q4_0"))[0]
        assert not torch.equal(q4, own)
    # A shorter window: the newest tokens come back exact, the older ones as the quantizer returns them.
    cache = QuantKVCache(1, 2, 12, 16, 16, torch.device("cpu"), torch.float32, parse_kv_setting("q8_0:residual=3"))
    k, v = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    cache.append(k[:, :, :7], v[:, :, :7])
    got_k, got_v = cache.append(k[:, :, 7:], v[:, :, 7:])
    assert torch.equal(got_k[:, :, 9:], k[:, :, 9:]) and torch.equal(got_v[:, :, 9:], v[:, :, 9:])
    assert torch.equal(got_k[:, :, :9], dequantize(*quantize(k[:, :, :9], "q8_0"), "q8_0", 16, torch.float32))


@pytest.mark.parametrize("attn", ["baseline", "decoupled"])
def test_q8_0_costs_little_val_loss_and_q4_0_more(attn):
    model = _tiny(attn, sharpen=0.15)
    tokens = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(1))
    ref = decode_loss(model, tokens, None)
    delta = {f: decode_loss(model, tokens, parse_kv_setting(f)) - ref for f in ("fp32", "q8_0", "q4_0")}
    assert delta["fp32"] == 0.0
    assert abs(delta["q8_0"]) < 5e-4 and abs(delta["q8_0"]) < abs(delta["q4_0"]), delta


@pytest.fixture(scope="module")
def runs(made_bytes, tmp_path_factory):
    """A tiny baseline and a tiny decoupled run of the made-up byte data."""
    root = tmp_path_factory.mktemp("kvq") / "runs"
    with pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # compare measures the checkpoints and draws its own plots
        for attn in ("baseline", "decoupled"):
            assert train_main(["--data", str(made_bytes), "--attn", attn, "--out-dir", str(root / attn), *SMALL]) == 0
    return root


def test_compare_measure_shows_kv_settings(runs, capsys):
    out = runs.parent / "cmp.png"
    assert compare_main([str(runs), "--measure", "--measure-lengths", "32", "--decode-tokens", "2", "--out", str(out),
                         "--kv-cache", "bf16,q8_0,q4_0,sem=q4_0/geo=q8_0/v=q4_0", "--quality-tokens", "128"]) == 0
    text = capsys.readouterr().out
    table = text.split("KV cache settings")[1].splitlines()[2:]
    header = text.split("KV cache settings")[1].splitlines()[1]
    assert "B/tok" in header and "dec tok/s" in header and "Δ val" in header
    lines = {(ln.split()[0], ln.split()[2]): ln.split() for ln in table if ln.strip() and not ln.startswith("val")}
    assert lines[("baseline", "q8_0")][3] == "288.0" and lines[("baseline", "q4_0")][3] == "160.0"
    assert lines[("baseline", "bf16")][3] == "512.0" and lines[("baseline", "bf16")][-1] == "+0.0000"
    # This decoupled run's heads: semantic keys 1 wide, geometric 2, values 3; each block pays a 2-byte scale,
    # 4-bit blocks are padded to even: sem 1 + 2, geo 2 + 2, v 2 + 2 bytes per head, 4 heads, 2 layers.
    assert lines[("decoupled", "k=bf16/v=q4_0/sem=q4_0/geo=q8_0")][3] == f"{(3 + 4 + 4) * 4 * 2:.1f}"
    for run in ("baseline", "decoupled"):
        infer = [e for e in read_jsonl(runs / run / "train.jsonl") if e["type"] == "infer"][-1]
        formats = infer["kv_formats"]
        assert list(formats) == ["bf16", "q8_0", "q4_0", "k=bf16/v=q4_0/sem=q4_0/geo=q8_0"]
        assert formats["bf16"]["val_loss_delta"] == 0.0 and formats["q8_0"]["quality_tokens"] == 128
        assert all(f["decode_tok_s@32"] > 0 and f["val_loss"] > 0 for f in formats.values())
    assert out.with_name("cmp_kv.png").is_file()
    assert compare_main([str(runs), "--json", "--no-plot"]) == 0
    points = quality_kv_points(json.loads(capsys.readouterr().out))
    runs_, settings = [p for p in points if p["of"] is None], [p for p in points if p["of"]]
    assert len(runs_) == 2 and len(settings) == 8 and {p["tag"] for p in settings} >= {"q8_0", "q4_0"}


def test_generate_and_bench_take_kv_cache(runs, capsys):
    run = str(runs / "decoupled")
    outs = []
    for setting in ([], ["--kv-cache", "fp32"], ["--kv-cache", "sem=nf4/geo=q8_0/v=q8_0:residual=4"]):
        assert generate_main([run, "--prompt", "The king", "--max-new-tokens", "12", "--temperature", "0",
                              *setting]) == 0
        captured = capsys.readouterr()
        outs.append(captured.out)
    assert outs[0] == outs[1]  # the model's own fp32 cache, named
    assert "KV cache k=bf16/v=q8_0/sem=nf4/geo=q8_0:residual=4" in captured.err
    assert bench_main(["--preset", "tiny", "--variants", "gqa", "--lengths", "16", "--decode-tokens", "1",
                       "--kv-cache", "nf4,q8_0:residual=8"]) == 0
    text = capsys.readouterr().out
    assert "KV nf4" in text and "40.0 B/token (0.312x)" in text and "KV q8_0:residual=8" in text


def test_bad_kv_cache_is_one_line_exit_2(runs, capsys):
    run = str(runs / "baseline")
    for main, args in ((bench_main, ["--preset", "tiny", "--kv-cache", "q3"]),
                       (generate_main, [run, "--prompt", "a", "--kv-cache", "q8_0:window=3"]),
                       (compare_main, [run, "--measure", "--kv-cache", "k=q8_0/x=nf4"]),
                       (bench_main, [run, "--quality-tokens", "-1"])):
        before = (runs / "baseline" / "train.jsonl").read_text()
        assert run_cli(main, args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --") and err.count("\n") == 1, err
        assert (runs / "baseline" / "train.jsonl").read_text() == before
