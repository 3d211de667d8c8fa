"""Fused gate/up projection (issue 23.5): one GEMM per block for SwiGLU's gate and up, split on export.

The fused MLP computes down(silu(x Wg^T) * (x Wu^T)) with Wg, Wu the two halves of its weight; a forward runs
one linear fewer per block; the Llama export writes the halves as gate_proj / up_proj and --init-from fuses
them back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from model import GPT, ModelConfig
from model.gpt import SwiGLU
from pretrain.export import main as export_main
from pretrain.llama import from_llama, to_llama

CFG = ModelConfig(vocab_size=250, block_size=64, n_layer=2, n_head=4, d_model=64, d_ff=96)


def test_fused_mlp_equals_the_two_projection_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(64, 96)
    w_gate, w_up = mlp.gate_up_proj.weight.detach().split(96)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    mlp = mlp.double()
    want = mlp.down_proj(F.silu(x @ w_gate.double().T) * (x @ w_up.double().T))
    torch.testing.assert_close(mlp(x), want, rtol=0, atol=1e-12)


def test_a_forward_runs_one_linear_per_projection_group():
    model = GPT(CFG).eval()
    idx = torch.randint(0, 250, (2, 16))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(idx)
    linears = sum(e.count for e in prof.key_averages() if e.key == "aten::linear")
    # qkv, o, gate_up, down per block, plus the LM head (was 7 per block with q, k, v and gate, up apart)
    assert linears == 4 * CFG.n_layer + 1


def test_llama_export_splits_gate_and_up_and_init_from_fuses_them_back(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = GPT(CFG)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "model_config": CFG.to_dict(), "train_config": {}, "step": 1},
               run / "last.pt")
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    tensors = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        tensors |= load_file(str(f))
    fused = model.state_dict()["blocks.1.mlp.gate_up_proj.weight"]
    assert torch.equal(tensors["model.layers.1.mlp.gate_proj.weight"], fused[:96])
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"], fused[96:])
    back = from_llama(to_llama(model.state_dict(), CFG), CFG, model.state_dict(), "test")
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
