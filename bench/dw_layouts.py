"""The step's weight-gradient GEMMs in the floor's operand layout against the layouts the step has (issue 23.1).

    .venv/bin/python bench/dw_layouts.py                      # config S, native precision, all threads
    .venv/bin/python bench/dw_layouts.py --threads 1 --rounds 5

bench/gemm_floor.py times each dW = dY^T X with dY^T a contiguous matrix. The step has dY row-major (rows x out):
autograd's linear backward multiplies dY^T as a transposed view, and the LM head's bf16 weight gradient runs in the
CPU kernels' GEMM where it is built (model/csrc/cpu_lm_head.cpp, fp32 out; the floor times it too), else as h^T g
into a d x vocab buffer (model/loss_eager.py cpu_weight_grad; h^T is a 1.5 MB copy at config S). Each form here is
the same product; torch's differ in how oneDNN reads the operands (a transposed A, or a wide B to repack). This
prints every dW GEMM in each form, the forms alternating within each round, medians of wall time: how much of a
step's distance from its floor sits inside its GEMMs, in their operands' layout, rather than outside them. The
floor keeps the contiguous form (bench/README.md, fifteenth and sixteenth passes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm_floor import Forms, Gemm, host_isa, native_bf16, step_gemms  # noqa: E402
from bench.train_step import model_config  # noqa: E402
from model import cpu_gemms  # noqa: E402
from model.loss_eager import lm_head_kernel_applies  # noqa: E402

FORMS = ("floor: dY^T contiguous", "dY^T a view", "X^T dY (out transposed)", "the LM head's kernel")


def step_form(g: Gemm, dtype: torch.dtype) -> int:
    """The index in FORMS of the form the step runs for the dW GEMM `g`: autograd's linear backward multiplies dY^T as
    a view, as does the fp32 loss (model/loss_chunk.py backprop_chunk); the bf16 loss's runs the CPU kernels' GEMM
    where the step takes it (model/loss_eager.py lm_head_kernel_applies: not on an AMX host), else h^T g
    (cpu_weight_grad)."""
    if not g.name.startswith("lm_head") or dtype == torch.float32:
        return 1
    rows_of = (torch.empty(0, g.m, dtype=dtype), torch.empty(0, g.n, dtype=dtype))  # the step's question, no rows
    return 3 if lm_head_kernel_applies(*rows_of) else 2


def _forms(g: Gemm, dtype: torch.dtype) -> list[Callable[[], torch.Tensor]]:
    """g's dW, (N x M) @ (M x K), in each of FORMS that applies, from a row-major dY (M x N) and X (M x K): the
    kernel's for the LM head where it is built (fp32 out), on an AMX host too, where the step leaves it to oneDNN."""
    n, m, k = g.m, g.k, g.n
    dy, x = torch.randn(m, n, dtype=dtype), torch.randn(m, k, dtype=dtype)
    dy_t = dy.t().contiguous()
    forms = [lambda: torch.mm(dy_t, x), lambda: torch.mm(dy.t(), x), lambda: torch.mm(x.t().contiguous(), dy).t()]
    if g.name.startswith("lm_head") and cpu_gemms.lm_head_grad_applies(dy, x):
        valid, out = torch.ones(m, dtype=torch.bool), torch.empty(n, k)
        forms.append(lambda: cpu_gemms.lm_head_weight_grad(dy, x, valid, out))
    return forms


def measure(preset: str, batch: int, seq_len: int, dtype: torch.dtype, rounds: int) -> list[dict]:
    """Per dW GEMM of the step: its name, count and each form's median wall seconds over `rounds` (times count)."""
    rows = []
    for g in step_gemms(model_config(preset), batch, seq_len):
        if not g.name.endswith(" dW"):
            continue
        forms = _forms(g, dtype)
        outs = [f() for f in forms]  # each form is the same product
        for out in outs[1:]:
            torch.testing.assert_close(out.float(), outs[0].float(), rtol=2e-2, atol=2e-2 * outs[0].abs().max().item())
        timer = Forms(forms)
        for _ in range(rounds):
            timer.run()
        rows.append({"name": g.name, "count": g.count, "step": step_form(g, dtype),
                     "s": [statistics.median(w for w, _ in runs) * g.count for runs in timer.runs]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="S", help="S (config S, default) or a model preset (e.g. tiny)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="default: the host's native one (bf16 where it multiplies bf16 natively)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "bf16" and not native_bf16():
        print("dw_layouts.py: --precision bf16 needs a host that multiplies bf16 natively (AVX-512-BF16 or AMX); "
              "use --precision fp32 here", file=sys.stderr)
        return 2
    precision = args.precision or ("bf16" if native_bf16() else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows = measure(args.preset, args.batch, args.seq_len, dtype, args.rounds)
    print(f"dW GEMMs by operand layout, preset {args.preset} {args.batch} x {args.seq_len}, {precision}, "
          f"{torch.get_num_threads()} threads, host ISA: {host_isa()}; medians of {args.rounds}, wall ms a step")
    print(f"  {'GEMM':<14}" + "".join(f"{f:>26}" for f in FORMS[:max(len(r["s"]) for r in rows)]))
    for r in rows:
        print(f"  {r['name']:<14}" + "".join(f"{s * 1e3:>26.2f}" for s in r["s"]))
    floor = sum(r["s"][0] for r in rows)
    step = sum(r["s"][r["step"]] for r in rows)
    head = FORMS[3] if any(r["step"] == 3 for r in rows) else "the LM head's X^T dY"
    runs = "the view" + (f"; {head}" if dtype != torch.float32 else "")
    print(f"  the floor's form {floor * 1e3:.2f} ms; the forms the step runs ({runs}) {step * 1e3:.2f} ms "
          f"({(step - floor) * 1e3:+.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
