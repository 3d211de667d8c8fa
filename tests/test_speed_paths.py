"""The CUDA fast-path decisions, each checked on CPU: static-shape per-block compile without graph breaks,
FlexAttention for null-attn (equal to SDPA), backward outside autocast, local-device RNG and pinning,
DDP bucket views, NCCL bytes in the plan, expandable segments, fused AdamW, the reused loss buffers and no chunk-sized
loss temporaries, and the device the run records."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import model.attention as attention
from model import GPT, ModelConfig, cpu_kernels
from model.gpt import LossWorkspace, chunked_cross_entropy
from pretrain.plan import memory
from pretrain.plan.fit import step_peak_bytes
from pretrain.track.runlog import read_jsonl
from pretrain.train import device, distributed, host_blas, resume, speed
from pretrain.train.config import TrainConfig, parse_config
from pretrain.train.loop import train
from pretrain.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
        "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "1", "--log-every", "1",
        "--device", "cpu", "--live", "off", "--save-minutes", "0"]


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 256, "block_size": 64, "n_layer": 1, "n_head": 4, "d_model": 32,
                          "d_ff": 64, **kw})


def test_block_compiles_without_graph_breaks_across_lengths():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    block = model.blocks[0]
    # dynamic=None: dynamo marks T dynamic at the second length; `T > 1` in attention used to break the graph.
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for T in (32, 64):
        x = torch.randn(2, T, 32)
        torch.testing.assert_close(compiled(x), block(x))
    torch._dynamo.reset()


def test_trainer_compiles_blocks_with_static_shapes(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    speed.compile_blocks(GPT(tiny(n_layer=2)), "max-autotune")
    assert seen == [{"mode": "max-autotune", "dynamic": False}] * 2


def test_attention_backend_choice():
    assert attention.attention_backend("cuda", True, True) == "flex"
    assert attention.attention_backend("cuda", True, False) == "sdpa"  # eager flex materialises all scores
    assert attention.attention_backend("cuda", False, True) == "sdpa"  # plain causal: SDPA flash
    assert attention.attention_backend("cpu", True, True) == "sdpa"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attn", ["baseline", "gqa", "decoupled"])
def test_null_attn_flex_equals_sdpa(monkeypatch, attn):
    torch.manual_seed(0)
    dims = {"sem_dim": 8, "geo_dim": 16} if attn == "decoupled" else {}
    model = GPT(tiny(attn=attn, null_attn=True, n_kv_head=2 if attn == "gqa" else None, **dims)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref, ref_gen = model(idx), model.generate(idx[:, :8], 6, temperature=0)
        monkeypatch.setattr(attention, "attention_backend", lambda *a: "flex")
        flex, flex_gen = model(idx), model.generate(idx[:, :8], 6, temperature=0)  # also with a KV cache
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(flex_gen, ref_gen)


def test_backward_runs_outside_autocast(monkeypatch, byte_data, tmp_path):
    states = []
    original = torch.Tensor.backward

    def spy(self, *a, **kw):
        states.append(torch.is_autocast_enabled("cpu"))
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "backward", spy)
    train(parse_config(["--data", str(byte_data), "--out-dir", str(tmp_path / "run"), *FAST, "--steps", "2",
                        "--grad-accum", "2", "--amp"]))
    assert states == [False] * 4


def test_rng_state_touches_only_the_local_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(device) or torch.ones(2))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU touched"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    state = resume.rng_state()
    assert calls == ["cuda"] and len(state["cuda"]) == 1 and state["cuda_device"] == 1  # "cuda" = current device


def test_prefetch_thread_sets_its_cuda_device(monkeypatch):
    from pretrain.data.loader import Prefetcher

    class Sampler:
        epoch = 0

        def next_batch(self, b, t):
            return torch.zeros(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)

        def state_dict(self):
            return {}

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append((d, threading.current_thread().name)))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    pf = Prefetcher(Sampler(), torch.device("cuda", 1))
    assert pf._pin  # batches for a CUDA device are pinned, so the host-to-device copy overlaps compute
    stop, q = threading.Event(), __import__("queue").Queue(1)
    thread = threading.Thread(target=pf._produce, args=((1, 4), stop, q), name="batch-prefetch")
    thread.start()
    q.get(timeout=10)
    stop.set()
    thread.join()
    assert seen == [(torch.device("cuda", 1), "batch-prefetch")]


def test_cuda_choices_fused_adamw_flash_static_compile(monkeypatch):
    """What the trainer builds: fused AdamW on CUDA, SDPA without a mask (flash / cuDNN eligible) unless
    null-attn, and --compile as one static-shape graph per block."""
    cuda = torch.device("cuda")
    assert build_optimizer(GPT(tiny()), TrainConfig(), cuda).defaults["fused"] is True
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: masks.append((kw.get("attn_mask"), kw.get("is_causal"))) or sdpa(*a, **kw))
    GPT(tiny())(torch.zeros(1, 8, dtype=torch.long))
    assert masks and all(m is None and causal for m, causal in masks)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    # torch's own patch, not monkeypatch: undoing a monkeypatch on dynamo's config module can hide the key.
    with torch._dynamo.config.patch(suppress_errors=torch._dynamo.config.suppress_errors):
        speed.build_model(tiny(n_layer=2), TrainConfig(compile=True), torch.device("cpu"))
    assert compiled == [("Block", {"mode": None, "dynamic": False})] * 2


def test_ddp_uses_gradient_bucket_views():
    assert distributed.ddp_options(torch.device("cuda", 3)) == {"device_ids": [3], "gradient_as_bucket_view": True}
    assert distributed.ddp_options(torch.device("cpu"))["device_ids"] is None


def test_plan_counts_nccl_not_a_bucket_copy():
    # Accumulating: DDP's buckets are the gradients' own memory (bucket views); at accumulation 1 they are not
    # (test_plan_fit.py::test_ddp_gradient_buckets_are_counted_where_they_add_memory).
    mcfg, cfg = tiny(), TrainConfig(device="cuda", batch_size=2, grad_accum=2)
    one, est = step_peak_bytes(mcfg, cfg, 32, 1)
    two, _ = step_peak_bytes(mcfg, cfg, 32, 2)
    assert two - one == memory.NCCL_BYTES
    assert memory.comm_bytes(2, "cpu") == 0


def test_expandable_segments_by_default():
    assert speed.cuda_alloc_conf(None) == "expandable_segments:True"
    assert speed.cuda_alloc_conf("max_split_size_mb:128") == "max_split_size_mb:128,expandable_segments:True"
    assert speed.cuda_alloc_conf("expandable_segments:False") == "expandable_segments:False"  # the user's choice


def test_chunked_loss_reuses_its_buffers_and_matches_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(70, 16, requires_grad=True)
    t = torch.randint(0, 64, (40,))
    t[3] = -100
    ws = LossWorkspace()
    got = chunked_cross_entropy(h, w, t, 64, chunk_rows=16, workspace=ws)
    got.backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((ref_h @ ref_w.t())[:, :64], t)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(h.grad, ref_h.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)
    first = {k: v.data_ptr() for k, v in ws._buffers.items()}
    chunked_cross_entropy(h, w, t, 64, chunk_rows=16, workspace=ws).backward()
    assert {k: v.data_ptr() for k, v in ws._buffers.items()} == first  # the second step allocates no logits


def test_checkpoint_staging_buffer_is_reused_and_cpu_snapshots_unchanged():
    from pretrain.train.staging import HostStaging, snapshot

    host = HostStaging(64)  # pinning needs CUDA; the streaming logic is the same in ordinary memory
    live = torch.arange(60.0)
    first = host.copy(live)
    buf = host.buffer()
    live += 1
    second = host.copy(live)
    assert host.buffer().data_ptr() == buf.data_ptr() and torch.equal(second, live) and not torch.equal(first, live)
    snap = snapshot({"w": live}, "", {})  # CPU tensors: plain copies, as before
    assert snap["w"].data_ptr() != live.data_ptr() and torch.equal(snap["w"], live)


LOSS_STEP = """
import resource, torch
from model.gpt import LossWorkspace, chunked_cross_entropy
torch.manual_seed(0)
rows, vocab, d = 2048, 8192, 64  # one 64 MiB chunk of fp32 logits: far above glibc's mmap threshold
h = torch.randn(rows, d, requires_grad=True)
w = torch.randn(vocab, d, requires_grad=True)
t = torch.randint(0, vocab, (rows,))
ws = LossWorkspace()

def step():
    h.grad = w.grad = None
    chunked_cross_entropy(h, w, t, vocab, chunk_rows=rows, workspace=ws).backward()

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc maps and unmaps large blocks per allocation")
def test_chunked_loss_allocates_no_chunk_sized_temporary_per_step():
    """torch.logsumexp allocated a chunk-sized temporary (412 MB at config S) every step: glibc mmaps a block that
    size, so each step faulted and zero-filled it afresh (~100K page faults). Nothing that size may be allocated."""
    done = subprocess.run([sys.executable, "-c", LOSS_STEP], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    chunk_pages = 2048 * 8192 * 4 // resource.getpagesize()
    assert float(done.stdout.split()[-1]) < chunk_pages / 4


def test_run_meta_records_the_cpu_it_ran_on(byte_data, tmp_path):
    out = tmp_path / "run"
    train(parse_config([*FAST, "--data", str(byte_data), "--steps", "1", "--out-dir", str(out)]))
    meta = next(e for e in read_jsonl(out / "train.jsonl") if e["type"] == "meta")
    assert meta["host"] == {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "threads": torch.get_num_threads(), "native_bf16": device.cpu_has_fast_bf16(),
                            "fused_kernels": cpu_kernels.kernels() is not None,
                            "mkl_on_amd": host_blas.mkl_on_amd()}  # on AMD, True: conftest.py loads it
