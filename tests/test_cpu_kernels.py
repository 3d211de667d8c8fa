"""The fused CPU kernels (model/cpu_kernels.py): the values of the torch ops they replace, through the model and the
trainer, and the fallback when they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig, cpu_gemms, cpu_kernels, loss_eager
from model.fused import residual_add, rms_norm, swiglu, swiglu_reference
from model.loss_eager import PendingWeightGrad, chunk_loss_and_logit_grad_eager_
from model.rope import apply_rotary

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="no C++ compiler on this host")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def torch_ops(monkeypatch):
    """Inside: the callers take their torch ops, as without the library."""
    def off() -> None:
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    return off


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def threads(request):
    """torch's (and so the kernels') thread count while inside: 3 splits these tests' row counts unevenly, and the
    RMSNorm backward's weight gradient is then a sum of per-thread partial sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _lm_head_kernel_runs() -> bool:
    """Whether a bf16 step here takes the LM head's GEMM (the step's own rule, asked of operands with no rows)."""
    return loss_eager.lm_head_kernel_applies(*(torch.empty(0, 64, dtype=torch.bfloat16) for _ in range(2)))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of a's dtype's spacing at b (bf16: 2^-7 relative)."""
    eps = torch.finfo(a.dtype).eps
    return (a.double() - b.double()).abs() / (b.double().abs() * eps).clamp_min(torch.finfo(a.dtype).tiny)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_logit_gradient_equal_the_torch_path_and_float64(dtype, torch_ops, threads):
    """Ignored rows, padded columns, a few rows whose target probability underflows fp32 (CE > 87): the summed CE
    within 1e-5 of float64's, the gradient within one rounding of torch's softmax path, padded columns 0."""
    g = torch.Generator().manual_seed(0)
    n, V, vocab = 37, 544, 530
    logits = (4 * torch.randn(n, V, generator=g)).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[::5] = -100
    logits[3, target[3]] = -120.0  # p(target) ~ e^-120: below fp32's smallest normal
    x64 = logits[:, :vocab].double()
    valid = target != -100
    want = F.cross_entropy(x64[valid], target[valid], reduction="sum")
    grad64 = torch.softmax(x64, -1) - F.one_hot(torch.where(valid, target, 0), vocab) * valid[:, None]

    got = logits.clone()
    ce, _ = chunk_loss_and_logit_grad_eager_(got, target, vocab, -100, True, 4, torch.empty(4, V), got.__getitem__)
    torch_ops()
    ref = logits.clone()
    ce_ref, _ = chunk_loss_and_logit_grad_eager_(ref, target, vocab, -100, True, 4, torch.empty(4, V),
                                                 ref.__getitem__)
    assert abs(ce.item() - want.item()) <= 1e-5 * want.item()
    assert abs(ce_ref.item() - want.item()) <= 1e-5 * want.item()
    assert torch.equal(got[:, vocab:], torch.zeros(n, V - vocab, dtype=dtype))
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got[valid, :vocab].double(), grad64[valid], atol=tol * 0.02, rtol=tol)
    if dtype == torch.bfloat16:  # torch's path's values but where exp's last fp32 bit decides a rounding
        assert (got[valid] != ref[valid]).float().mean() < 1e-3 and (_ulps(got[valid], ref[valid]) <= 1).all()
    torch.testing.assert_close(got[valid].double(), ref[valid].double(), atol=tol * 0.02, rtol=tol)


def test_a_nan_logit_makes_the_loss_nan():
    logits = torch.randn(4, 64).bfloat16()
    logits[1, 7] = float("nan")
    ce, _ = chunk_loss_and_logit_grad_eager_(logits, torch.arange(4), 60, -100, True, 2, torch.empty(2, 64),
                                            logits.__getitem__)
    assert ce.isnan()


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_values_and_gradient_equal_the_op_by_op_form(dtype, threads):
    torch.manual_seed(0)
    gate_up = (2 * torch.randn(3, 17, 2 * 96)).to(dtype).requires_grad_()
    assert cpu_kernels.swiglu_applies(gate_up)
    dh = torch.randn(3, 17, 96).to(dtype)
    got, want = swiglu(gate_up), swiglu_reference(gate_up)
    (g_got,), (g_want,) = torch.autograd.grad(got, gate_up, dh), torch.autograd.grad(want, gate_up, dh)
    if dtype == torch.bfloat16:  # the same roundings: equal but where exp's last fp32 bit decides one
        assert (got != want).float().mean() < 1e-3 and (_ulps(got, want) <= 1).all()
        assert (g_got != g_want).float().mean() < 1e-3 and (_ulps(g_got, g_want) <= 1).all()
    else:
        torch.testing.assert_close(got, want, rtol=3e-6, atol=1e-7)
        torch.testing.assert_close(g_got, g_want, rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_rms_norm_values_and_gradients_equal_the_torch_form(dtype, out_dtype, torch_ops, threads):
    """As a block's norm runs it (fp32 residual in, the autocast dtype out) and in fp32 or bf16 models: the output,
    dx and dw (with 3 threads, summed from per-thread partial sums) of the torch form's within a rounding."""
    torch.manual_seed(0)
    x = (3 * torch.randn(5, 33, 64)).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(64)).to(dtype).requires_grad_()
    assert cpu_kernels.rms_norm_applies(x, out_dtype)
    dy = torch.randn(5, 33, 64).to(out_dtype)
    got = rms_norm(x, w, 1e-5, out_dtype)
    g_got = torch.autograd.grad(got, (x, w), dy)
    torch_ops()
    want = rms_norm(x, w, 1e-5, out_dtype)
    g_want = torch.autograd.grad(want, (x, w), dy)
    assert got.dtype == out_dtype and g_got[0].dtype == dtype and g_got[1].dtype == dtype
    for a, b in ((got, want), *zip(g_got, g_want, strict=True)):
        if a.dtype == torch.bfloat16:
            assert (a != b).float().mean() < 2e-2 and (_ulps(a, b) <= 1).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_residual_add_of_a_bf16_branch_is_torchs_add_bit_for_bit(threads):
    """The block's x + branch(x) under autocast (fp32 stream, bf16 branch): the values and both gradients of torch's
    mixed-dtype add (x's gradient as it comes, the branch's converted to bf16); other dtypes keep torch's add."""
    torch.manual_seed(0)
    x = (3 * torch.randn(3, 17, 64)).requires_grad_()
    y = torch.randn(3, 17, 64).bfloat16().requires_grad_()
    assert cpu_kernels.residual_add_applies(x, y) and not cpu_kernels.residual_add_applies(x, y.float())
    got, want = residual_add(x, y), x + y
    assert got.grad_fn is not want.grad_fn and type(got.grad_fn) is not type(want.grad_fn)  # the kernel's node
    assert torch.equal(got, want)
    g = torch.randn(3, 17, 64)
    for a, b in zip(torch.autograd.grad(got, (x, y), g), torch.autograd.grad(want, (x, y), g), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_strided_heads_equals_the_torch_form(dtype, torch_ops, threads):
    """q as the model makes it (a head view of the fused projection: rows strided) and its gradient."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 4 * 64).to(dtype)
    q = qkv[..., :256].view(2, 9, 4, 64).transpose(1, 2).requires_grad_()
    pos = torch.arange(9, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, 64, 2) / 64)
    cos, sin = pos.cos(), pos.sin()
    assert cpu_kernels.rotate_applies(q, cos)
    dy = torch.randn(2, 4, 9, 64).to(dtype)
    got = apply_rotary(q, cos, sin)
    (g_got,) = torch.autograd.grad(got, q, dy)
    torch_ops()
    want = apply_rotary(q, cos, sin)
    (g_want,) = torch.autograd.grad(want, q, dy)
    for a, b in ((got, want), (g_got, g_want)):
        if dtype == torch.bfloat16:
            assert (_ulps(a, b) <= 1).all() and (a != b).float().mean() < 1e-2
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_transposed_weight_gradient_equals_torchs_conversion(threads):
    """The LM head's weight gradient from its transposed bf16 GEMM output: into a new fp32 tensor and added into one,
    exactly what torch's copy and add give (bf16 -> fp32 is exact); only shapes of 16 x 16 tiles take it."""
    if not cpu_kernels.built("transpose_to_f32", torch.bfloat16):
        pytest.skip("built only where the compiler targets AVX-512")
    src = torch.randn(80, 50304 + 48).bfloat16()[:, :50304]  # rows strided, as a column slice would be
    assert cpu_kernels.transpose_applies(src) and not cpu_kernels.transpose_applies(src[:, :50300])
    assert torch.equal(cpu_kernels.transpose_to_f32(src, None), src.t().float())
    base = torch.randn(50304, 80)
    got = cpu_kernels.transpose_to_f32(src, base.clone())
    assert torch.equal(got, base + src.t().float())
    scale = torch.tensor(0.37)  # the loss's backward scales in the same pass: the values of a .mul_ after it
    assert torch.equal(cpu_kernels.transpose_to_f32(src, None, scale.item()), src.t().float().mul_(scale))
    got = cpu_kernels.transpose_to_f32(src, base.clone(), scale.item())
    assert torch.equal(got, (base + src.t().float()).mul_(scale))


def test_lm_head_weight_gradient_is_g_transposed_h_summed_in_fp32(threads):
    """The LM head's weight gradient from the row-major logit gradient (csrc/cpu_lm_head.cpp): g^T h over the valid
    rows with each sum within fp32's summation bound of the exact one (no bf16 rounding), added into a gradient
    and scaled as a .mul_ after the sum would be, the same bits at any thread count. Shapes off its tiles: an odd
    row count (the last row's partner is a zero row, not the next row in memory), 65 vocab blocks of 16, d = 80
    (not a whole number of 6-row tiles), rows strided."""
    if not cpu_kernels.built("lm_head_dw", torch.bfloat16):
        pytest.skip("built only where the compiler targets AVX-512-BF16")
    torch.manual_seed(0)
    rows, vocab, d = 81, 1040, 80
    g_mem = torch.randn(rows + 1, vocab + 32).bfloat16()
    g_mem[rows] = float("nan")  # past the last row: never read
    g = g_mem[:rows, :vocab]
    h = torch.randn(rows, d + 16).bfloat16()[:, :d]
    valid = torch.rand(rows) > 0.2
    h[~valid] = float("nan")  # a row that is not valid is left out, whatever it holds
    assert cpu_gemms.lm_head_grad_applies(g, h) and not cpu_gemms.lm_head_grad_applies(g[:, :1032 + 4], h)
    exact = g.double().t() @ torch.where(valid[:, None], h.double(), 0)
    bound = rows * 2.0**-24 * (g.double().abs().t() @ torch.where(valid[:, None], h.double().abs(), 0))
    got = cpu_gemms.lm_head_weight_grad(g, h, valid)
    assert got.dtype == torch.float32 and got.shape == (vocab, d)
    assert ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(cpu_gemms.lm_head_weight_grad(g, h, valid, torch.full((vocab, d), float("nan"))), got)
    base, scale = torch.randn(vocab, d), torch.tensor(0.37)
    summed = cpu_gemms.lm_head_weight_grad(g, h, valid, base.clone(), accumulate=True, scale=scale.item())
    want = (base.double() + exact) * scale.double()
    assert ((summed.double() - want).abs() <= (bound + base.double().abs() * 2.0**-23) * scale.item() * 1.01).all()
    assert torch.equal(cpu_gemms.lm_head_weight_grad(g, h, valid, base.clone(), accumulate=True).mul_(scale), summed)
    torch.set_num_threads(2 if threads == 1 else 1)
    assert torch.equal(cpu_gemms.lm_head_weight_grad(g, h, valid), got)


def test_two_forwards_before_their_backward_keep_each_ones_weight_gradient(monkeypatch):
    """The LM head's bf16 weight gradient waits transposed in the loss's kept buffer for its backward, which scales
    it in the same pass (model/loss_eager.py PendingWeightGrad): a second forward first (two losses summed) moves the
    first one out before reusing the buffer. The gradients are those of one backward after each forward."""
    cfg = ModelConfig(vocab_size=250, block_size=32, n_layer=1, n_head=2, d_model=64, d_ff=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    batches = [(torch.randint(0, 250, (2, 32)), torch.randint(0, 250, (2, 32))) for _ in range(2)]
    monkeypatch.setattr(loss_eager, "KEEP_WEIGHT_BYTES", 0)  # the kept buffer at this size too, as at config S
    pending = []
    scaled = PendingWeightGrad.scaled
    monkeypatch.setattr(PendingWeightGrad, "scaled", lambda self, s: pending.append(self) or scaled(self, s))

    def loss(i: int) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            return model(*batches[i])

    loss(0).backward()
    loss(1).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    (loss(0) + loss(1)).backward()
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want, strict=True))
    # where the LM head's GEMM (AVX-512-BF16, no AMX) or the transposing kernel (AVX-512) runs
    deferred = _lm_head_kernel_runs() or cpu_kernels.built("transpose_to_f32", torch.bfloat16)
    assert len(pending) == (4 if deferred else 0)


@pytest.mark.parametrize("amp", [False, True])
def test_model_loss_and_gradients_equal_the_torch_ops(amp, torch_ops):
    """The whole model (rows of 64 and 128: every kernel applies), fp32 or under bf16 autocast."""
    cfg = ModelConfig(vocab_size=250, block_size=32, n_layer=2, n_head=2, d_model=64, d_ff=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx, tgt = torch.randint(0, 250, (2, 32)), torch.randint(0, 250, (2, 32))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = model(idx, tgt)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run()
    torch_ops()
    loss_ref, grads_ref = run()
    tol = 2e-2 if amp else 1e-5
    torch.testing.assert_close(loss, loss_ref, rtol=tol / 10, atol=0)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())


def _kernels_in_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "from model import cpu_kernels; print(cpu_kernels.kernels() is not None)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)


def test_a_failed_build_warns_once_and_keeps_torchs_ops(tmp_path):
    proc = _kernels_in_subprocess({"CXX": "false", "PRETRAIN_KERNELS_DIR": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip() == "False"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CPU kernels not built" in lines[0] and "PRETRAIN_CPU_KERNELS=0" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_a_damaged_cached_library_is_built_again(tmp_path):
    first = _kernels_in_subprocess({"PRETRAIN_KERNELS_DIR": str(tmp_path)})
    assert first.stdout.strip() == "True", first.stderr
    (lib,) = tmp_path.iterdir()
    lib.write_bytes(b"not a library")
    again = _kernels_in_subprocess({"PRETRAIN_KERNELS_DIR": str(tmp_path)})
    assert again.stdout.strip() == "True" and again.stderr == "" and lib.stat().st_size > 1000


def test_a_target_outside_the_logits_is_refused_not_read():
    """Past the logits, or in the padded columns past the vocab (whose exps the kernel never computes)."""
    logits = torch.randn(3, 32)
    with pytest.raises(IndexError, match=r"target out of range for a vocab of 30 \(32 logits\)"):
        cpu_kernels.ce_and_logit_grad_(logits, torch.tensor([1, 32, 0]), torch.ones(3, dtype=torch.bool), 30, True)
    with pytest.raises(IndexError, match="target out of range for a vocab of 30"):
        cpu_kernels.ce_and_logit_grad_(logits, torch.tensor([1, 30, 0]), torch.ones(3, dtype=torch.bool), 30, True)


def test_built_once_per_host_then_loaded(tmp_path):
    first = _kernels_in_subprocess({"PRETRAIN_KERNELS_DIR": str(tmp_path)})
    assert first.stdout.strip() == "True", first.stderr
    (lib,) = tmp_path.iterdir()
    stamp = lib.stat().st_mtime_ns
    again = _kernels_in_subprocess({"PRETRAIN_KERNELS_DIR": str(tmp_path)})
    assert again.stdout.strip() == "True" and lib.stat().st_mtime_ns == stamp and list(tmp_path.iterdir()) == [lib]
    off = _kernels_in_subprocess({"PRETRAIN_KERNELS_DIR": str(tmp_path / "off"), "PRETRAIN_CPU_KERNELS": "0"})
    assert off.stdout.strip() == "False" and not (tmp_path / "off").exists()


def test_a_training_run_takes_the_kernels_and_trains_as_with_torchs_ops(byte_data, tmp_path, monkeypatch):
    """Through the trainer: the run's meta records the kernels, each kernel is called, and the losses of 4 steps are
    those of a run with torch's ops within the precision's rounding."""
    from pretrain.track.runlog import read_jsonl
    from pretrain.train.config import parse_config
    from pretrain.train.loop import train

    argv = ["--size", "tiny", "--d-model", "64", "--n-head", "2", "--n-layer", "2", "--d-ff", "128", "--block-size",
            "64", "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "1",
            "--log-every", "1", "--device", "cpu", "--live", "off", "--save-minutes", "0", "--steps", "4",
            "--data", str(byte_data)]
    called: set[str] = set()
    fn = cpu_kernels._fn
    for module in (cpu_kernels, cpu_gemms):  # the elementwise kernels' wrappers and the GEMMs'
        monkeypatch.setattr(module, "_fn", lambda name, *dtypes: called.add(name) or fn(name, *dtypes))

    def run(out: Path) -> tuple[dict, list[float]]:
        train(parse_config([*argv, "--out-dir", str(out)]))
        events = read_jsonl(out / "train.jsonl")
        meta = next(e for e in events if e["type"] == "meta")
        return meta, [e["loss"] for e in events if e["type"] == "train"]

    meta, losses = run(tmp_path / "kernels")
    assert meta["host"]["fused_kernels"] is True and len(losses) == 4
    bf16 = meta["host"]["native_bf16"]
    # attention's kernel: bf16 steps (a host with native bf16) and a library built with AVX-512-BF16
    attention = {"attn_fwd", "attn_bwd"} if bf16 and cpu_kernels.built("attn_fwd", torch.bfloat16) else set()
    # the LM head's bf16 weight gradient: its GEMM where the step takes it (AVX-512-BF16, no AMX), else torch's GEMM
    # output turned into fp32 (AVX-512)
    if bf16 and _lm_head_kernel_runs():
        head = {"lm_head_dw"}
    else:
        head = {"transpose_to_f32"} if bf16 and cpu_kernels.built("transpose_to_f32", torch.bfloat16) else set()
    # the blocks' residual adds of bf16 branch outputs: bf16 autocast, the trainer's default on any host (the
    # planner's cpu tier turns it off where bf16 is emulated; this run is the trainer's alone)
    cfg = parse_config([*argv, "--out-dir", str(tmp_path / "unused")])
    autocast_bf16 = cfg.amp and cfg.amp_dtype == "bf16"
    residual = {"add"} if autocast_bf16 else set()
    assert called == {"ce_grad", "swiglu_fwd", "swiglu_bwd", "rotate", "rms_norm_fwd", "rms_norm_bwd", *attention,
                      *head, *residual, "sum_squares",  # the clip's norm (pretrain/train/grad_clip.py)
                      "adamw"}  # the update from the second step on (pretrain/train/cpu_adamw.py)
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    meta_off, losses_off = run(tmp_path / "torch")
    assert meta_off["host"]["fused_kernels"] is False
    assert losses == pytest.approx(losses_off, rel=2e-2 if autocast_bf16 else 1e-4)
