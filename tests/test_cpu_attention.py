"""bf16 attention on CPU through GEMMs + fused softmax (model/cpu_attention.py) instead of SDPA's flash kernel.

Held against float64: outputs and q/k/v gradients at least as close as SDPA's own bf16 kernel is (causal, GQA,
null slot, KV-cache masks, more than one query block); through the model, every registered variant and option
gives SDPA's outputs and parameter gradients within bf16 rounding. Where it must not run (fake tensors and the
memory tracker's dispatch modes, fp32, compiled graphs, other devices) attention stays SDPA, so the planner's
traced CUDA memory is unchanged; and what it saves for backward holds no T x S tensor.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.attention as attention
import model.cpu_attention as cpu_attention
from model import GPT, cpu_kernels
from model.cpu_attention import causal_attention_cpu, cpu_attention_applies
from tests.test_model_attention import CASES, make_config, make_model


@pytest.fixture
def native_bf16(monkeypatch):
    """Run the CPU path whatever the host: without native bf16 it is only slower (oneDNN emulates), not different."""
    monkeypatch.setattr(cpu_attention, "native_bf16", lambda: True)


def _kernel_built() -> bool:
    return cpu_kernels.built("attn_fwd", torch.bfloat16)


@pytest.fixture(params=["amx", "blocks", "kernel"])
def either_host(request, native_bf16, monkeypatch):
    """Each host's path on every host: with AMX tiles the forward is SDPA's flash kernel and the score GEMMs plain
    fp32 (cpu_attention.amx_tiles); without, the library's attention kernel where it applies (causal, head dims
    multiples of 16; built only for AVX-512-BF16: model/csrc/cpu_attention.cpp), else the blocked forward and
    oneDNN's bf16 mode. The first two run anywhere."""
    monkeypatch.setattr(cpu_attention, "amx_tiles", lambda: request.param == "amx")
    if request.param == "blocks":
        monkeypatch.setattr(cpu_attention, "attention_applies", lambda q, k, v: False)
    elif request.param == "kernel" and not _kernel_built():
        pytest.skip("the attention kernel is built only where the compiler targets AVX-512-BF16")
    return request.param


def _qkv(B: int, H: int, n_kv: int, T: int, S: int, hd: int, hd_v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, hd, generator=g) * 1.5).bfloat16().requires_grad_()
    k = (torch.randn(B, n_kv, S, hd, generator=g) * 1.5).bfloat16().requires_grad_()
    # v as a block hands it over: a strided view into a wider projection output
    wide = torch.randn(B, S, n_kv * (hd_v + 5), generator=g).bfloat16()
    v = wide[..., : n_kv * hd_v].view(B, S, n_kv, hd_v).transpose(1, 2).detach().requires_grad_()
    return q, k, v


def _reference(q, k, v, mask, scale):
    """float64 softmax(q k^T * scale, mask) v with each k/v head repeated over its query group."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale
    y = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(g, 1)
    return (q, k, v), y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _errors(fn, q, k, v, go, ref_leaves, ref_y):
    y = fn(q, k, v)
    y.backward(go)
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return [_rel(y, ref_y)] + [_rel(g, r.grad) for g, r in zip(grads, ref_leaves, strict=True)]


KERNEL_CASES = {
    # name: (B, H, Hkv, T, start, null slot, head dim, v head dim, scale)
    "mha, 2 query blocks": (2, 4, 4, 128, 0, False, 32, 32, None),
    "gqa 2 of 4, 2 blocks": (2, 4, 2, 128, 0, False, 32, 32, None),
    "mqa, one block": (2, 6, 1, 24, 0, False, 16, 16, None),
    "null slot, 2 blocks": (2, 4, 4, 128, 0, True, 32, 32, None),
    "kv cache chunk": (2, 4, 2, 64, 40, False, 32, 32, None),
    "decoupled widths, scale 1": (2, 4, 4, 128, 0, False, 12, 8, 1.0),
    "one block of 48, v narrower": (2, 4, 2, 48, 0, False, 32, 16, None),
}
# The cases the library's attention kernel computes (implicit causal mask, head dims multiples of 16); the others
# keep the blocks (a mask, a null slot, a cache offset, narrow heads).
KERNEL_TAKES = {"mha, 2 query blocks", "gqa 2 of 4, 2 blocks", "one block of 48, v narrower"}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_as_close_to_float64_as_sdpa(case, either_host):
    """Output and gradients no further from float64 than SDPA's bf16 flash kernel is (1.5x + a bf16 ulp's worth:
    both round to bf16 at the same places); a wrong mask, scale or head grouping misses by O(1)."""
    B, H, n_kv, T, start, null, hd, hd_v, scale = KERNEL_CASES[case]
    S = start + T + (1 if null else 0)
    q, k, v = _qkv(B, H, n_kv, T, S, hd, hd_v)
    mask = attention.causal_mask(T, start + T, start, torch.device("cpu"), null_slot=null)
    go = torch.randn(B, H, T, hd_v).bfloat16()
    leaves, ref_y = _reference(q, k, v, mask, scale or 1 / math.sqrt(hd))
    ref_y.backward(go.double())
    implicit_causal = start == 0 and not null  # the model passes no mask then
    new = _errors(lambda q, k, v: causal_attention_cpu(q, k, v, None if implicit_causal else mask, scale),
                  q, k, v, go, leaves, ref_y)
    sdpa = _errors(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if implicit_causal else mask, is_causal=implicit_causal, scale=scale,
        enable_gqa=n_kv != H), q, k, v, go, leaves, ref_y)
    for name, got, base in zip(("y", "dq", "dk", "dv"), new, sdpa, strict=True):
        assert got <= 1.5 * base + 2e-3, f"{name}: {got:.2e} vs SDPA {base:.2e}"
        assert got < 1e-2
    node = type(causal_attention_cpu(q, k, v, None if implicit_causal else mask, scale).grad_fn).__name__
    assert (node == "_KernelAttentionBackward") == (either_host == "kernel" and case in KERNEL_TAKES), node


@pytest.mark.parametrize("attn,option", CASES)
def test_model_as_close_to_float64_as_sdpa_every_variant(attn, option, either_host, monkeypatch):
    """The trainer's forward + backward (bf16 autocast) with the CPU path is as close to the same model in float64
    as with SDPA (logits and every parameter's gradient), for every registered variant and option; the path did
    run in that model, once per layer. (Heads of 8 or less here: the library's kernel never takes them.)"""
    model = make_model(attn, option).train()
    _model_as_close_to_float64_as_sdpa(model, torch.randint(0, model.config.vocab_size, (2, 24)), monkeypatch)


@pytest.mark.parametrize("attn", ["baseline", "gqa"])
def test_kernel_in_the_model_as_close_to_float64_as_sdpa(attn, monkeypatch, native_bf16):
    """The library's attention kernel through the model (heads of 32, 64 tokens: one query block; GQA 2 of 4
    heads): as close to float64 as SDPA, and it ran in every layer."""
    if not _kernel_built():
        pytest.skip("the attention kernel is built only where the compiler targets AVX-512-BF16")
    monkeypatch.setattr(cpu_attention, "amx_tiles", lambda: False)
    torch.manual_seed(0)
    model = GPT(make_config(attn, d_model=128, block_size=64)).train()
    with torch.no_grad():  # sharp attention, as make_model's
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    kernel_calls = []
    forward = cpu_attention._KernelAttention.forward
    monkeypatch.setattr(cpu_attention._KernelAttention, "forward",
                        staticmethod(lambda ctx, *a: kernel_calls.append(1) or forward(ctx, *a)))
    _model_as_close_to_float64_as_sdpa(model, torch.randint(0, model.config.vocab_size, (2, 64)), monkeypatch)
    assert len(kernel_calls) == model.config.n_layer


def test_kernel_gradients_reach_the_projection_without_copies(native_bf16):
    """dq, dk, dv come out of the kernel (dq and dk through the rotary backward) laid out as the fused projection's
    output: autograd's head-view backward copies none of them (config S: 18 activation copies a step otherwise)."""
    if not _kernel_built():
        pytest.skip("the attention kernel is built only where the compiler targets AVX-512-BF16")
    torch.manual_seed(0)
    model = GPT(make_config("baseline", d_model=128, block_size=64)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randint(0, model.config.vocab_size, (2, 64))).float().logsumexp(-1).mean()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    cfg = model.config
    heads = [2, 64, cfg.n_head, cfg.d_model // cfg.n_head]  # (B, T, heads, head dim): a head view's memory
    copies = [e for e in prof.events() if e.name in ("aten::clone", "aten::copy_") and e.input_shapes
              and list(e.input_shapes[0]) == heads]
    assert not copies
    # the same trace sees them where they are made: the projection's gradient from the three, per layer
    assert sum(e.name == "aten::cat" for e in prof.events()) >= cfg.n_layer


def _model_as_close_to_float64_as_sdpa(model: GPT, x: torch.Tensor, monkeypatch) -> None:
    def step(m, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = m(x)
        logits.double().logsumexp(-1).mean().backward()
        return logits.double(), {n: p.grad.double() for n, p in m.named_parameters()}

    calls = []
    monkeypatch.setattr(attention, "causal_attention_cpu", lambda *a: calls.append(1) or causal_attention_cpu(*a))
    ref_logits, ref_grads = step(copy.deepcopy(model).double(), autocast=False)  # float64: SDPA's math, no CPU path
    assert not calls
    got_logits, got_grads = step(model, autocast=True)
    assert len(calls) == model.config.n_layer
    monkeypatch.setattr(attention, "cpu_attention_applies", lambda *a: False)
    sdpa_logits, sdpa_grads = step(model, autocast=True)
    assert len(calls) == model.config.n_layer
    assert _rel(got_logits, ref_logits) <= 1.5 * _rel(sdpa_logits, ref_logits) + 2e-3
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])
    assert _rel(flat(got_grads), flat(ref_grads)) <= 1.5 * _rel(flat(sdpa_grads), flat(ref_grads)) + 2e-3
    for name, ref in ref_grads.items():  # each parameter too; a few scalars (log_temp) are noisy sums, so looser
        if ref.norm() > 0:
            got, base = _rel(got_grads[name], ref), _rel(sdpa_grads[name], ref)
            assert got <= 3 * base + 1e-2, f"{name}: {got:.2e} vs SDPA {base:.2e}"


def test_mask_offset_would_be_caught(either_host):
    """The kernel test's tolerance is not loose: attending one key further (an off-by-one mask) misses it."""
    q, k, v = _qkv(2, 4, 4, 128, 128, 32, 32)
    mask = torch.ones(128, 128, dtype=torch.bool).tril()
    leaves, ref_y = _reference(q, k, v, mask, 1 / math.sqrt(32))
    with torch.no_grad():
        wrong = causal_attention_cpu(q, k, v, torch.ones(128, 128, dtype=torch.bool).tril(1), None)
        right = causal_attention_cpu(q, k, v, None, None)
    assert _rel(right, ref_y) < 1e-2 < _rel(wrong, ref_y)


def test_a_future_keys_score_never_enters_a_rows_softmax(either_host):
    """However large a later key's score, an earlier query's softmax is over its own keys: with query 0 aligned to
    key 5 (a scaled score of ~4000) and orthogonal to key 0, query 0 still gives exactly v[0], and its gradients
    stay finite. A softmax shifted by the masked key's score would underflow every weight to 0 and return NaN."""
    B, H, T, hd = 1, 2, 64, 16
    q, k = torch.zeros(B, H, T, hd), torch.zeros(B, H, T, hd)
    q[..., 0, :8] = 16.0
    k[..., 5, :8] = 16.0
    k[..., 0, 8:] = 1.0
    v = torch.randn(B, H, T, hd)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    y = causal_attention_cpu(q, k, v, None, None)
    assert torch.equal(y[..., 0, :], v[..., 0, :].detach())
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_saves_no_score_matrix(either_host):
    """Memory like flash attention's: what backward keeps is q, k, v (no T x S probabilities)."""
    q, k, v = _qkv(2, 4, 4, 128, 128, 32, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        causal_attention_cpu(q, k, v, None, None)
    assert saved and all(math.prod(s) <= q.numel() for s in saved), saved


@pytest.mark.parametrize("case", ["mha, 2 query blocks", "gqa 2 of 4, 2 blocks", "null slot, 2 blocks",
                                  "kv cache chunk"])
def test_amx_forward_is_sdpa_bit_for_bit_and_elsewhere_no_flash(case, native_bf16, monkeypatch):
    """The kernel choice per host (amx_tiles): with AMX the forward is SDPA's own output, bit for bit (what the model
    computed before this path existed), and its backward is the blocks' (no flash backward op runs); without AMX the
    forward runs no flash kernel at all (the blocks: faster there)."""
    B, H, n_kv, T, start, null, hd, hd_v, scale = KERNEL_CASES[case]
    q, k, v = _qkv(B, H, n_kv, T, start + T + (1 if null else 0), hd, hd_v)
    mask = None if start == 0 and not null else attention.causal_mask(T, start + T, start, torch.device("cpu"),
                                                                        null_slot=null)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=n_kv != H)
    for amx in (True, False):
        monkeypatch.setattr(cpu_attention, "amx_tiles", lambda amx=amx: amx)
        with _Recorder() as rec:
            got = causal_attention_cpu(q, k, v, mask, scale)
            got.backward(torch.ones_like(got))
        flash = [op for op in rec.ops if "flash" in op]
        assert not any("backward" in op for op in flash), flash
        assert q.grad is not None and k.grad is not None and v.grad is not None
        for t in (q, k, v):
            t.grad = None
        if amx:
            assert flash and torch.equal(got, want)
        else:
            assert not flash and not torch.equal(got, want)  # the blocks round differently: truly the other path
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fake_tensors_and_dispatch_modes_keep_sdpa(native_bf16):
    """The planner traces a step on fake CPU tensors under a memory tracker (a dispatch mode) to model CUDA memory:
    there, under any dispatch mode (also selective checkpointing's), for one query and for a length that
    is neither one block nor a multiple of it (its scores would not be bounded by a block), attention stays SDPA."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 64, 64, 16, 16))
    assert cpu_attention_applies(q, k, v)
    # fp32 is the fp32 kernel's where it is built (tests/test_cpu_attention_f32.py), else SDPA's
    assert cpu_attention_applies(q.float(), k.float(), v.float()) == cpu_kernels.built("attn_fwd", torch.float32)
    assert not cpu_attention_applies(q[:, :, :1], k, v)
    assert cpu_attention_applies(q[:, :, :24], k[:, :, :24], v[:, :, :24])
    long = torch.zeros(1, 2, 100, 16, dtype=torch.bfloat16)
    assert not cpu_attention_applies(long, long, long)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert not cpu_attention_applies(fq, fk, fv)
    model = make_model("baseline", "plain").bfloat16()
    idx = torch.randint(0, model.config.vocab_size, (1, 24))
    with _Recorder() as rec:
        assert not cpu_attention_applies(q, k, v)
        model(idx)
    assert any("flash_attention" in op for op in rec.ops)
    assert not any("bmm" in op for op in rec.ops)


@pytest.mark.parametrize("amx", [True, False])
def test_score_gemms_use_onednn_bf16_mode_only_without_amx(amx, monkeypatch):
    """Without AMX the fp32 score GEMMs run in oneDNN's bf16 mode (~3x plain fp32 there); with AMX plain fp32, which
    is faster there (the mode converts the operands per call). Either way the setting is restored after."""
    monkeypatch.setattr(cpu_attention, "amx_tiles", lambda: amx)
    before = torch.backends.mkldnn.matmul.fp32_precision
    with cpu_attention._exact_bf16_products():
        inside = torch.backends.mkldnn.matmul.fp32_precision
    assert inside == (before if amx else "bf16")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
