"""Fused gate/up and q/k/v projections vs separate ones: CPU-time ratio and GEMM count at config S (issue 23.5).

    .venv/bin/python bench/fused_proj.py            # fp32 and bf16 autocast (where native), 2048 x 384 input

Forward + backward of SwiGLU(384, 1024) on config S's micro-batch (8 x 256 rows), fused (model/gpt.py) against
the same weights as two nn.Linear; and of attention's q/k/v projection (d 384, 6 heads, baseline), one
qkv_proj (model/attention.py) against the same weights as three nn.Linear. Alternating, best of --reps, in CPU
seconds of this process (time-slicing by other processes stays out), with aten::mm/addmm counts from
torch.profiler.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm_floor import host_isa, native_bf16  # noqa: E402
from model.gpt import SwiGLU  # noqa: E402


class TwoProj(nn.Module):
    """SwiGLU with gate and up apart (the layout before the fusion), sharing the fused module's weights."""

    def __init__(self, fused: SwiGLU) -> None:
        super().__init__()
        gate, up = fused.gate_up_proj.weight.detach().chunk(2)
        self.gate_proj, self.up_proj = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        self.gate_proj.weight, self.up_proj.weight = nn.Parameter(gate.clone()), nn.Parameter(up.clone())
        self.down_proj = fused.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QKV(nn.Module):
    """q + k + v from one fused weight (rows [q; k; v], as model/attention.py) or from three Linears sharing its
    rows; the sum stands in for attention so both run the same ops after the projections."""

    def __init__(self, fused: nn.Linear | None = None, widths: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.widths = widths
        if fused is not None:
            self.qkv_proj = fused
        else:
            self.parts = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        else:
            q, k, v = (p(x) for p in self.parts)
        return q + k + v

    @staticmethod
    def apart(fused: QKV) -> QKV:
        three = QKV()
        for w in fused.qkv_proj.weight.detach().split(fused.widths):
            lin = nn.Linear(1, 1, bias=False)
            lin.weight = nn.Parameter(w.clone())
            three.parts.append(lin)
        return three


def fwd_bwd(mlp: nn.Module, x: torch.Tensor, amp: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = mlp(x)
    y.float().sum().backward()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    fused = SwiGLU(384, 1024)
    two = TwoProj(fused)
    x = torch.randn(8, 256, 384, requires_grad=True)
    print(f"host ISA: {host_isa()}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    qkv = QKV(nn.Linear(384, 3 * 384, bias=False), (384, 384, 384))
    pairs = {"gate/up": (fused, two, "two"), "q/k/v": (qkv, QKV.apart(qkv), "three")}
    for what, (one, apart, label) in pairs.items():
        for amp in (False, True) if native_bf16() else (False,):
            best = {"fused": float("inf"), label: float("inf")}
            for _ in range(args.reps):
                for name, mod in (("fused", one), (label, apart)):
                    c0 = time.process_time()
                    fwd_bwd(mod, x, amp)
                    best[name] = min(best[name], time.process_time() - c0)
            kernels = {}
            for name, mod in (("fused", one), (label, apart)):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fwd_bwd(mod, x, amp)
                kernels[name] = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
            print(f"{what} {'bf16 autocast' if amp else 'fp32'}: fused {best['fused'] * 1e3:.1f} CPU-ms, {label} "
                  f"projections {best[label] * 1e3:.1f} CPU-ms: fused/{label} = {best['fused'] / best[label]:.2f}; "
                  f"GEMMs fwd+bwd {kernels['fused']} vs {kernels[label]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
