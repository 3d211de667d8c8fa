"""fp32 causal attention on CPU through the library's kernel (model/csrc/cpu_attention_f32.cpp, built for AVX2 + FMA
without AVX-512) instead of SDPA's flash kernel: what an fp32 run (the planner's choice where bf16 is emulated, or
--no-amp) computes.

Held against float64: output and q/k/v gradients as close as SDPA's own fp32 kernel (causal, GQA, one block and
several, narrower v heads), the same bits at any thread count, through the model for every attention variant the
kernel takes, and through the trainer (the run calls it and trains as with SDPA). Where it must not run (a mask, a
cache offset, a length neither one block nor a multiple of it, fake tensors, dispatch modes) attention stays SDPA.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import model.attention as attention
import model.cpu_attention as cpu_attention
from model import GPT, cpu_gemms, cpu_kernels
from model.cpu_attention import causal_attention_cpu, cpu_attention_applies
from tests.test_cpu_attention import _Recorder  # a dispatch mode, as the planner's memory tracker is
from tests.test_model_attention import make_config


@pytest.fixture(autouse=True)
def _kernel_built() -> None:
    """Checked when a test runs, not at collection (which would build the library in every worker first)."""
    if not cpu_kernels.built("attn_fwd", torch.float32):
        pytest.skip("the fp32 attention kernel is built only for AVX2 + FMA without AVX-512")


CASES = {
    # name: (B, H, Hkv, T, head dim, v head dim, scale)
    "mha, 4 query blocks": (2, 4, 4, 256, 64, 64, None),
    "gqa 2 of 6, 2 blocks": (2, 6, 2, 128, 32, 32, None),
    "mqa, one block of 48": (2, 4, 1, 48, 16, 16, None),
    "v narrower, scale 1": (1, 4, 2, 64, 32, 16, 1.0),
}


def _qkv(B: int, H: int, n_kv: int, T: int, hd: int, hd_v: int, seed: int = 0):
    """q contiguous, k and v strided head views of one wider projection output, as a block hands them over."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, hd, generator=g) * 1.5).requires_grad_()
    wide = torch.randn(B, T, n_kv * (hd + hd_v) + 8, generator=g) * 1.5
    k = wide[..., : n_kv * hd].view(B, T, n_kv, hd).transpose(1, 2).detach().requires_grad_()
    v = wide[..., n_kv * hd: n_kv * (hd + hd_v)].view(B, T, n_kv, hd_v).transpose(1, 2).detach().requires_grad_()
    return q, k, v


def _reference(q, k, v, scale, shift: int = 0):
    """float64 causal softmax(q k^T * scale) v (with `shift`, each query also sees that many later keys)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    g, T = q.shape[1] // k.shape[1], q.shape[2]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale
    mask = torch.ones(T, T, dtype=torch.bool).tril(shift)
    return (q, k, v), s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(g, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _errors(fn, q, k, v, go, leaves, ref_y) -> list[float]:
    y = fn(q, k, v)
    y.backward(go)
    errs = [_rel(y, ref_y)] + [_rel(t.grad, r.grad) for t, r in zip((q, k, v), leaves, strict=True)]
    for t in (q, k, v):
        t.grad = None
    return errs


@pytest.mark.parametrize("case", CASES)
def test_as_close_to_float64_as_sdpa(case):
    """Output and gradients no further from float64 than SDPA's fp32 flash kernel (1.5x + 1e-6: both are fp32 sums
    in another order); a key past the diagonal, a wrong scale or head grouping misses by far more (the next test)."""
    B, H, n_kv, T, hd, hd_v, scale = CASES[case]
    q, k, v = _qkv(B, H, n_kv, T, hd, hd_v)
    assert cpu_attention_applies(q, k, v)
    go = torch.randn(B, H, T, hd_v)
    leaves, ref_y = _reference(q, k, v, scale or 1 / math.sqrt(hd))
    ref_y.backward(go.double())
    new = _errors(lambda q, k, v: causal_attention_cpu(q, k, v, None, scale), q, k, v, go, leaves, ref_y)
    sdpa = _errors(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                  enable_gqa=n_kv != H), q, k, v, go, leaves, ref_y)
    for name, got, base in zip(("y", "dq", "dk", "dv"), new, sdpa, strict=True):
        assert got <= 1.5 * base + 1e-6, f"{name}: {got:.2e} vs SDPA {base:.2e}"
    assert type(causal_attention_cpu(q, k, v, None, scale).grad_fn).__name__ == "_KernelAttentionBackward"


def test_the_tolerance_catches_one_key_too_many():
    """Against attention that lets each query see one key past itself, the kernel's output misses by O(1)."""
    q, k, v = _qkv(2, 4, 4, 128, 32, 32)
    _, ref_y = _reference(q, k, v, 1 / math.sqrt(32))
    _, shifted = _reference(q, k, v, 1 / math.sqrt(32), shift=1)
    with torch.no_grad():
        y = causal_attention_cpu(q, k, v, None, None)
    assert _rel(y, ref_y) < 1e-6 < 1e-2 < _rel(y, shifted)


def test_the_same_bits_at_any_thread_count():
    """One task per (batch, k/v head), each summed in one order: 1, 2 and 3 threads give equal bits."""
    q, k, v = _qkv(3, 6, 3, 128, 32, 32)
    go = torch.randn(3, 6, 128, 32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = causal_attention_cpu(q, k, v, None, None)
            y.backward(go)
            results.append([y.detach().clone()] + [t.grad.clone() for t in (q, k, v)])
            for t in (q, k, v):
                t.grad = None
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_a_future_keys_score_never_enters_a_rows_softmax():
    """However large a later key's score, query 0's softmax is over key 0 alone: it returns v[0] exactly, and the
    gradients stay finite (a softmax shifted by the masked key's score would give 0/0)."""
    B, H, T, hd = 1, 2, 64, 16
    q, k = torch.zeros(B, H, T, hd), torch.zeros(B, H, T, hd)
    q[..., 0, :8] = 60.0
    k[..., 5, :8] = 60.0  # a scaled score of 7200
    k[..., 0, 8:] = 1.0
    v = torch.randn(B, H, T, hd)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    y = causal_attention_cpu(q, k, v, None, None)
    assert torch.equal(y[..., 0, :], v[..., 0, :].detach())
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_saves_no_score_matrix_and_gradients_come_in_the_projections_layout():
    """Memory like flash attention's (backward keeps q, k and v, no T x T probabilities), and dq, dk, dv laid out
    (B, T, heads, dim) as the projection outputs their head views are of, so autograd's view backward copies none."""
    q, k, v = _qkv(2, 4, 4, 128, 32, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = causal_attention_cpu(q, k, v, None, None)
    assert saved and all(math.prod(s) <= q.numel() for s in saved), saved
    dq, dk, dv = cpu_gemms.attention_backward(q.detach(), k.detach(), v.detach(), torch.ones_like(y), 0.125)
    assert all(g.transpose(1, 2).is_contiguous() for g in (dq, dk, dv))


def test_only_causal_self_attention_of_plain_tensors_takes_it():
    """A mask (a KV-cache chunk, a null slot), more keys than queries, one query, a length neither one block nor a
    multiple of 64, fake tensors (the planner's trace of the GPU's step) and dispatch modes keep SDPA."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 64, 16, 16))
    assert cpu_attention_applies(q, k, v)
    assert not cpu_attention_applies(q, k, v, torch.ones(64, 64, dtype=torch.bool).tril())
    longer = torch.zeros(1, 2, 80, 16)
    assert not cpu_attention_applies(q, longer, longer)
    assert not cpu_attention_applies(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    odd = torch.zeros(1, 2, 100, 16)
    assert not cpu_attention_applies(odd, odd, odd)
    narrow = torch.zeros(1, 2, 64, 8)
    assert not cpu_attention_applies(narrow, narrow, narrow)
    with FakeTensorMode() as mode:
        assert not cpu_attention_applies(*(mode.from_tensor(t) for t in (q, k, v)))
    with _Recorder():
        assert not cpu_attention_applies(q, k, v)


# Head dims the kernel takes (multiples of 16) for each variant: decoupled's [semantic | geometric] q/k (scale 1).
WIDE_HEADS = {"baseline": {}, "gqa": {}, "bottleneck": {"attn_dim": 64},
              "decoupled": {"attn_dim": 64, "sem_dim": 64, "geo_dim": 64}}


@pytest.mark.parametrize("attn", WIDE_HEADS)
def test_in_the_model_as_close_to_float64_as_sdpa(attn, monkeypatch):
    """An fp32 model's forward + backward with the kernel (128 tokens: two query blocks) is as close to the same
    model in float64 as with SDPA, logits and every parameter's gradient, and the kernel ran in every layer."""
    torch.manual_seed(0)
    model = GPT(make_config(attn, d_model=128, block_size=128, **WIDE_HEADS[attn])).train()
    with torch.no_grad():  # sharp attention
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    x = torch.randint(0, model.config.vocab_size, (2, 128))

    def step(m) -> tuple[torch.Tensor, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        logits = m(x)
        logits.double().logsumexp(-1).mean().backward()
        return logits.double(), torch.cat([p.grad.double().flatten() for p in m.parameters()])

    ref = step(copy.deepcopy(model).double())
    calls = []
    forward = cpu_attention._KernelAttention.forward
    monkeypatch.setattr(cpu_attention._KernelAttention, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))
    got = step(model)
    assert len(calls) == model.config.n_layer
    monkeypatch.setattr(attention, "cpu_attention_applies", lambda *a: False)
    sdpa = step(model)
    assert len(calls) == model.config.n_layer
    for g, s, r in zip(got, sdpa, ref, strict=True):
        assert _rel(g, r) <= 1.5 * _rel(s, r) + 1e-6


def test_an_fp32_training_run_calls_it_and_trains_as_with_sdpa(byte_data, tmp_path, monkeypatch):
    """Through the trainer (--no-amp, what the planner's cpu tier picks where bf16 is emulated): the run calls the
    fp32 kernel both ways, and its 4 losses are those of the run with SDPA within fp32 rounding."""
    from pretrain.track.runlog import read_jsonl
    from pretrain.train.config import parse_config
    from pretrain.train.loop import train

    argv = ["--size", "tiny", "--d-model", "64", "--n-head", "2", "--n-layer", "2", "--d-ff", "128", "--block-size",
            "64", "--batch-size", "4", "--train-seq-len", "64", "--val-frac", "0.05", "--eval-iters", "1",
            "--log-every", "1", "--device", "cpu", "--live", "off", "--save-minutes", "0", "--steps", "4",
            "--no-amp", "--data", str(byte_data)]
    called: list[tuple] = []
    fn = cpu_gemms._fn
    monkeypatch.setattr(cpu_gemms, "_fn", lambda name, *dtypes: called.append((name, *dtypes)) or fn(name, *dtypes))

    def losses(out: str) -> list[float]:
        train(parse_config([*argv, "--out-dir", str(tmp_path / out)]))
        return [e["loss"] for e in read_jsonl(tmp_path / out / "train.jsonl") if e["type"] == "train"]

    with_kernel = losses("kernel")
    assert {("attn_fwd", torch.float32), ("attn_bwd", torch.float32)} <= set(called)
    monkeypatch.setattr(attention, "cpu_attention_applies", lambda *a: False)
    called.clear()
    with_sdpa = losses("sdpa")
    assert not any(c[0].startswith("attn") for c in called)
    assert len(with_kernel) == 4 and with_kernel == pytest.approx(with_sdpa, rel=1e-5)
