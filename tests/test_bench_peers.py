"""bench/peers.py: this project's step against its peers' (a nanoGPT checkout, the v29 research trainer), each in
its own processes with its own model and optimizer step, and the lead over each as the ratio of the medians.

The peers here are stand-ins written by the test with their real interfaces (nanoGPT's GPT/GPTConfig/
configure_optimizers, v29's GPT/ModelConfig returning (logits, caches)); each records every forward it runs and the
config it was built with, so the test sees that the bench ran the peer's own step at the stated shape."""

from __future__ import annotations

import re
import textwrap

from bench import peers
from bench.gemm_floor import native_bf16

_RECORD = """
import json, os, torch
from dataclasses import dataclass
from pathlib import Path
_LOG = Path(__file__).with_name("calls.jsonl")


class _Tiny(torch.nn.Module):
    def __init__(self, vocab, d, record):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.record = record

    def logits(self, idx):
        with _LOG.open("a") as f:
            f.write(json.dumps({**self.record, "shape": list(idx.shape),
                                "autocast": torch.is_autocast_enabled("cpu")}) + "\\n")
        return self.wte(idx) @ self.wte.weight.t()
"""

NANOGPT = _RECORD + """
@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class GPT(_Tiny):
    def __init__(self, config):
        super().__init__(config.vocab_size, config.n_embd, {"peer": "nanogpt", "n_layer": config.n_layer,
                                                          "n_embd": config.n_embd, "block": config.block_size})

    def forward(self, idx, targets=None):
        logits = self.logits(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        print("using fused AdamW: False")  # nanoGPT prints; the bench keeps its own stdout for its result
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
"""

V29 = _RECORD + """
@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    d_ff: int = 2048
    embed_dim: int = 512
    attn_mode: str = "bottleneck"
    attn_dim: int = 512
    rope: bool = True
    mlp: str = "swiglu"


class GPT(_Tiny):
    def __init__(self, cfg):
        super().__init__(cfg.vocab_size, cfg.d_model, {"peer": "v29", "n_layer": cfg.n_layer, "n_embd": cfg.d_model,
                                                       "block": cfg.block_size, "attn_mode": cfg.attn_mode})

    def forward(self, idx, *, caches=None, pos_offset=0):
        return self.logits(idx), None
"""


def _calls(path):
    import json

    return [json.loads(line) for line in (path / "calls.jsonl").read_text().splitlines()]


def test_peers_run_their_own_steps_and_the_lead_is_the_ratio_of_medians(tmp_path, capsys):
    nano, v29 = tmp_path / "nanogpt", tmp_path / "dba"
    nano.mkdir()
    v29.mkdir()
    (nano / "model.py").write_text(textwrap.dedent(NANOGPT))
    (v29 / "v29.py").write_text(textwrap.dedent(V29))
    assert peers.main(["--nanogpt", str(nano), "--v29", str(v29 / "v29.py"), "--config", "tiny", "--rounds", "2",
                       "--iters", "2", "--warmup", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    tiny = peers.CONFIGS["tiny"]
    for peer_dir, name in ((nano, "nanogpt"), (v29, "v29")):
        calls = _calls(peer_dir)
        # Two rounds, each a fresh process running 1 warm-up + 2 timed steps of the peer's own forward, at tiny's
        # shape, under bf16 autocast exactly where the host multiplies bf16 natively.
        assert len(calls) == 2 * 3
        assert {c["peer"] for c in calls} == {name}
        assert all(c["shape"] == [tiny["batch"], tiny["T"]] and c["n_layer"] == tiny["layers"]
                   and c["n_embd"] == tiny["d"] and c["autocast"] == native_bf16() for c in calls)
    assert {c["attn_mode"] for c in _calls(v29)} == {"standard"}
    assert "using fused AdamW" not in out  # the peer's prints go to stderr, not into the bench's result lines
    assert out.count("  round ") == 2 * 3 and "host ISA: " in out
    tok = {m[0]: float(m[1]) for m in re.findall(r"^  (this|nanogpt|v29) .* (\d+) tok/s", out, re.M)}
    leads = dict(re.findall(r"^  (nanogpt|v29) .*this project ([\d.]+)x$", out, re.M))
    assert set(leads) == {"nanogpt", "v29"}
    for peer, lead in leads.items():
        assert abs(float(lead) - tok["this"] / tok[peer]) <= 0.01 + 0.01 * float(lead)
    # The stand-ins' size: one tied vocab x d embedding.
    assert f"{tiny['vocab'] * tiny['d'] / 1e6:.1f} M params" in out


def test_a_missing_checkout_is_one_line_and_exit_2(tmp_path, capsys):
    assert peers.main(["--nanogpt", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.py not found" in err and "--nanogpt" in err
    assert peers.main([]) == 2
    assert "no peer named" in capsys.readouterr().err


def test_a_file_that_is_not_the_peer_is_one_line_and_exit_2(tmp_path, capfd):
    wrong = tmp_path / "not_v29.py"
    wrong.write_text("x = 1\n")  # no GPT, no ModelConfig
    assert peers.main(["--v29", str(wrong), "--config", "tiny", "--rounds", "1", "--iters", "1", "--warmup", "0",
                       "--threads", "1"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"--v29 {wrong}" in lines[0] and "AttributeError" in lines[0]
    assert "pass the v29 trainer file" in lines[0]
