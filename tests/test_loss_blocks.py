"""The chunked loss on CPU (model/loss_eager.py): softmax over blocks of rows in a small fp32 buffer instead of a
chunk-sized fp32 copy, the same values bit for bit as one block per chunk, held against float64; the CE from
p(target) without a max pass (from the logits where p(target) underflows); the weight gradient's GEMM on row-major
operands; and the LM head's bf16 weight cast and weight-gradient GEMM output written into kept buffers, not new
weight-sized blocks each step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.loss_chunk as loss_chunk
import model.loss_eager as loss_eager
from model import GPT, ModelConfig, cpu_kernels
from model.cpu_attention import native_bf16
from model.gpt import LossWorkspace, chunked_cross_entropy

VOCAB, PADDED, D = 100, 128, 32


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(60, D, generator=g)
    w = torch.randn(PADDED, D, generator=g) * 0.5
    t = torch.randint(0, VOCAB, (60,), generator=g)
    t[:6] = -100  # ignored rows, inside the first chunk
    t[40:47] = -100  # a whole chunk of them
    return h, w, t


def _loss_and_grads(h, w, t, workspace, amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = chunked_cross_entropy(h, w, t, VOCAB, chunk_rows=7, workspace=workspace)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _blocks_of(monkeypatch, rows: int) -> None:
    """Softmax blocks of `rows` rows per thread: torch's ops, as without model/cpu_kernels.py's library (with it the
    whole chunk's CE and gradient are one kernel call: tests/test_cpu_kernels.py)."""
    monkeypatch.setattr(loss_eager, "BLOCK_BYTES_PER_THREAD", rows * 4 * PADDED)
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)


@pytest.mark.parametrize("amp", [True, False])
def test_row_blocks_equal_one_block_bit_for_bit(monkeypatch, amp):
    """Blocks of 3 rows per thread (a chunk has 7: several blocks, the last partial) give the values of one block
    per chunk, and of the path without a workspace (other devices' whole-chunk ops; run here on CPU it takes the CE
    from p(target) too), exactly; the workspace keeps a block-sized fp32 buffer, not a chunk's."""
    h, w, t = _inputs()
    runs = []
    for rows in (3, 1000):
        _blocks_of(monkeypatch, rows)
        ws = LossWorkspace()
        for _ in range(2):  # the second step reuses the kept buffers
            got = _loss_and_grads(h, w, t, ws, amp)
        fp32 = [(k[0], tuple(b.shape)) for k, b in ws._buffers.items() if b.dtype == torch.float32
                and k[0] != "logits_mm"]
        runs.append((got, fp32))
    (blocks, blocks_fp32), (whole, _) = runs
    device_path = _loss_and_grads(h, w, t, None, amp)  # no workspace: other devices' form, one op over the chunk
    for a, b, c in zip(blocks, whole, device_path, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert blocks_fp32 == ([("softmax_block_fp32", (min(3 * torch.get_num_threads(), 7), PADDED))] if amp else [])


@pytest.mark.parametrize("kept", [True, False])
def test_bf16_loss_and_gradients_against_float64(monkeypatch, kept):
    """fp32 softmax and loss: the loss within fp32 rounding of float64 cross-entropy over the same bf16 logits; each
    gradient element within a bf16 rounding of the logit gradient and one of the GEMM's output (operands bf16 under
    autocast) of float64's, relative to the sum of its products' magnitudes: on CPU (kept buffers, row blocks) as on
    other devices' path (no workspace)."""
    _blocks_of(monkeypatch, 3)
    h, w, t = _inputs(1)
    loss, gh, gw = _loss_and_grads(h, w, t, LossWorkspace() if kept else None, amp=True)
    h64, w64 = h.bfloat16().double(), w.bfloat16().double()
    logits = (h64 @ w64.t()).bfloat16().double()  # the GEMM writes bf16 logits
    logits[:, VOCAB:] = float("-inf")
    want = F.cross_entropy(logits, t)
    assert abs(loss.item() - want.item()) < 1e-6 * want.item()
    g64 = (logits.softmax(-1) - F.one_hot(t.clamp_min(0), PADDED)) * (t != -100).unsqueeze(1) / (t != -100).sum()
    for got, exact, bound in ((gh, g64 @ w64, g64.abs() @ w64.abs()), (gw, g64.t() @ h64, g64.abs().t() @ h64.abs())):
        assert ((got.double() - exact).abs() <= 2**-7 * bound + 1e-12).all()


class _Allocs(TorchDispatchMode):
    """Ops that return a new tensor (not a view, not an out= or in-place op's) of `shape` and `dtype`."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape, self.dtype, self.seen = shape, dtype, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape and out.dtype == self.dtype
                and not func._schema.is_mutable and not func.is_view):
            self.seen.append(str(func))
        return out


def test_no_new_bf16_weight_sized_blocks_per_step(monkeypatch):
    """A bf16 step of GPT on CPU casts the tied weight and takes its gradient's GEMM output (d x vocab, transposed)
    into buffers kept between steps: 2 weight-sized blocks fewer to map and fault in per step (above glibc's largest
    mmap threshold at a 50K vocab). The fp32 gradient stays a new tensor: it becomes the parameter's .grad."""
    monkeypatch.setattr(loss_eager, "KEEP_WEIGHT_BYTES", PADDED * D * 2)  # this weight's size: kept from there up
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=4, d_model=D, d_ff=48))
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    for _ in range(2):
        with (_Allocs((PADDED, D), torch.bfloat16) as allocs, _Allocs((D, PADDED), torch.bfloat16) as allocs_t,
              torch.autocast("cpu", dtype=torch.bfloat16)):
            loss = model(idx, targets)
        loss.backward()
        grad = model.wte.weight.grad
        model.zero_grad(set_to_none=True)
    assert allocs.seen == [] and allocs_t.seen == []
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0



class _Ops(TorchDispatchMode):
    """Every op with its tensor arguments' (shape, stride)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [(tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor)]
        self.seen.append((func.__name__.split(".")[0], tensors))
        return func(*args, **(kwargs or {}))


def test_cpu_chunk_reads_its_rows_twice_and_runs_its_gemms_on_row_major_operands(monkeypatch):
    """The bf16 CPU loop's work over rows x vocab (loss_eager.py): per block a copy in, the softmax, the target's
    -1 and a copy back, no max pass (the CE is -log p(target)); in fp32 the softmax in place and no copies; and
    the weight gradient's GEMM takes the logit gradient row-major (h^T g), not as a transposed view (g^T h), which
    oneDNN would reorder first."""
    _blocks_of(monkeypatch, 3)
    h, w, t = _inputs()
    with _Ops() as ops:
        _loss_and_grads(h, w, t, LossWorkspace(), amp=True)
    wide = [name for name, args in ops.seen if any(shape[-1:] == (PADDED,) and len(shape) == 2 and shape[0] <= 7
                                                    for shape, _ in args) and name != "mm"]
    blocks = sum(-(-rows // min(3 * torch.get_num_threads(), rows)) for rows in (7,) * 8 + (4,))  # 60 rows, chunks of 7
    assert "amax" not in wide and "logsumexp" not in wide
    assert wide.count("_softmax") == blocks and wide.count("copy_") == 2 * blocks
    mms = [args for name, args in ops.seen if name == "mm"]
    assert not [args for args in mms if any(shape[0] == PADDED and stride == (1, PADDED) for shape, stride in args)]
    assert sum(args[0][0][0] == D and args[1][1] == (PADDED, 1) for args in mms) == 9  # h^T g, one per chunk
    with _Ops() as ops:  # fp32: the softmax in place over the logits, no copy and no max pass either
        _loss_and_grads(h, w, t, LossWorkspace(), amp=False)
    wide = [name for name, args in ops.seen if any(shape[-1:] == (PADDED,) and len(shape) == 2 and shape[0] <= 7
                                                    for shape, _ in args) and name != "mm"]
    assert "amax" not in wide and "logsumexp" not in wide and "copy_" not in wide
    assert wide.count("_softmax") == blocks


@pytest.mark.skipif(not native_bf16(), reason="the LM head's column blocks run where oneDNN has native bf16 only")
def test_bf16_lm_head_forward_runs_in_column_blocks_with_one_gemms_values(monkeypatch):
    """On a CPU with native bf16 the LM head's forward GEMM runs in column blocks (model/loss_chunk.py VOCAB_BLOCK),
    each writing its columns of the kept logits buffer through its row stride: a padded vocab of 128 in blocks of
    48 is 3 GEMMs per chunk (the last 32 wide) on slices of the weight, no copy of a block, and the loss and both
    gradients equal those of one GEMM per chunk bit for bit."""
    h, w, t = _inputs()
    with _Ops():  # as below: torch's ops for the CE (model/cpu_kernels.py stays out of dispatch modes)
        whole = _loss_and_grads(h, w, t, LossWorkspace(), amp=True)
    monkeypatch.setattr(loss_chunk, "VOCAB_BLOCK", 48)
    with _Ops() as ops:
        blocks = _loss_and_grads(h, w, t, LossWorkspace(), amp=True)
    fwd = [args[1][0][1] for name, args in ops.seen if name == "mm" and args[1][0][0] == D and args[1][1] == (1, D)]
    assert fwd == [48, 48, 32] * 9  # 60 rows in chunks of 7
    assert not [args for name, args in ops.seen if name == "copy_" and any(shape[-1:] == (48,) for shape, _ in args)]
    for a, b in zip(blocks, whole, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("amp", [True, False])
def test_ce_of_an_underflowing_target_probability_from_the_logits(amp, kernels, monkeypatch):
    """A target probability below fp32's smallest normal (a CE of ~200 here, where p(target) is 0 in fp32) takes
    the CE from its row's logits, not -log p: finite and within fp32 rounding of float64's, with and without
    gradients; the other rows keep -log p. In bf16 the logits are read from the chunk's buffer; in fp32 the softmax
    ran in place over them, so the row is recomputed from h and the weight."""
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    torch.manual_seed(0)
    h = torch.eye(D)[:8].clone()  # row r's logits are w[:, r]
    w = torch.randn(PADDED, D) * 2
    t = torch.randint(0, VOCAB, (8,))
    w[:, 2] = 0.0
    w[t[2], 2], w[(t[2] + 1) % VOCAB, 2] = -100.0, 100.0
    w[t[5], 5] = -40.0  # CE ~ 45: p(target) ~ 1e-20, still normal
    logits64 = (h.double() @ (w.bfloat16() if amp else w).double().t())
    logits64[:, VOCAB:] = float("-inf")
    want = F.cross_entropy(logits64, t)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = chunked_cross_entropy(h.requires_grad_(grad), w, t, VOCAB, chunk_rows=7, workspace=LossWorkspace())
        assert torch.isfinite(loss) and abs(loss.item() - want.item()) < 1e-6 * want.item()
