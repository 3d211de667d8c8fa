"""bench/train_step.py --floor (issue 23.1): the step against its own GEMMs, each timed alone at its shape.

The GEMM list must be the step's: its FLOPs equal ModelConfig.flops_per_token (6N + attention, no causal
halving) for every variant it covers, and the bench prints the floor ratio per precision with the host's ISA.
"""

from __future__ import annotations

import pytest
import torch

from bench import train_step
from bench.gemm_floor import native_bf16, step_gemms
from model import ModelConfig, cpu_gemms, cpu_kernels


@pytest.mark.parametrize("fields", [dict(attn="baseline"), dict(attn="gqa", n_kv_head=2),
                                    dict(attn="bottleneck", attn_dim=64), dict(attn="baseline", null_attn=True),
                                    dict(attn="baseline", tie_qk=True)])
def test_gemm_list_flops_are_the_model_flops_of_a_step(fields):
    cfg = ModelConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, d_model=128, d_ff=256, **fields)
    batch, seq_len = 3, 64
    listed = sum(g.flops for g in step_gemms(cfg, batch, seq_len))
    assert listed == pytest.approx(cfg.flops_per_token(seq_len) * batch * seq_len, rel=1e-12)


@pytest.mark.parametrize("isa", [None, "avx2"])
def test_floor_mode_prints_the_ratio_per_precision_with_the_isa(isa, capsys):
    """--isa avx2 runs the step as an AVX2-only host would on any x86 host: torch's AVX2 kernels, bf16 emulated,
    so fp32 alone (its native precision)."""
    assert train_step.main(["--presets", "tiny", "--floor", "--iters", "1", "--tiny-batch", "1",
                            "--seq-len", "32", "--threads", "1", *(["--isa", isa] if isa else [])]) == 0
    out = capsys.readouterr().out
    assert "host ISA:" in out
    if isa:
        assert "torch's kernels AVX2, bf16 emulated, capped by ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in out
    precisions = ("fp32", "bf16") if native_bf16() and not isa else ("fp32",)
    for p in precisions:
        assert f"  {p}: step " in out and "of its GEMM floor by CPU time" in out
    assert out.count("lm_head dW") == len(precisions)
    # The ratio is median against median; the best step against each GEMM's best run is printed beside it.
    assert out.count("medians above (step and each GEMM); best against best: step ") == len(precisions)
    paired = [line for line in out.splitlines() if line.startswith("    paired (each step beside one run of its GEMMs")]
    assert len(paired) == len(precisions) and all("% wall, " in line for line in paired)  # wall beside CPU time
    # Beside the floor, the passes no step skips and the ceiling they leave (bench/pass_floor.py), per precision;
    # bf16 adds the weights' casts.
    passes = [line for line in out.splitlines() if line.startswith("    passes no step skips")]
    assert len(passes) == len(precisions) and all("a ceiling of " in line for line in passes)
    assert [("weights to bf16" in line or "bf16 casts" in line) for line in passes] == [p == "bf16" for p in precisions]


def test_each_timed_step_is_paired_with_one_run_of_its_gemms_right_after_it(monkeypatch):
    """On a host whose speed moves 2x within minutes, a step is set against the run of its GEMMs next to it in
    time: one paired ratio per timed step, that step's CPU time against the GEMM run right after it."""
    import bench.gemm_floor as gf

    log: list[str] = []
    step_cpu: dict[str, list[float]] = {}
    step_wall: dict[str, list[float]] = {}
    real_run, real_step = gf.FloorTimer.run, train_step.Step.__call__

    def run(self):
        log.append("gemms")
        real_run(self)

    def step(self):
        log.append("step")
        wall = real_step(self)
        step_cpu.setdefault("bf16" if self.amp else "fp32", []).append(self.cpu_s)
        step_wall.setdefault("bf16" if self.amp else "fp32", []).append(wall)
        return wall

    monkeypatch.setattr(gf.FloorTimer, "run", run)
    monkeypatch.setattr(train_step.Step, "__call__", step)
    res = train_step.child_floor({"preset": "tiny", "batch": 1, "seq_len": 32, "iters": 3, "warmup": 0})
    n = len(res["rows"])
    assert log == ["step"] * n + ["step", "gemms"] * 3 * n  # untimed first steps, then neighbours
    for row in res["rows"]:
        fl, cpus, walls = row["floor"], step_cpu[row["precision"]][1:], step_wall[row["precision"]][1:]
        assert fl["paired"] == pytest.approx([f / c for f, c in zip(fl["runs_cpu_s"], cpus, strict=True)])
        # and by wall time: each step's seconds against its GEMMs' seconds, not CPU time's
        assert fl["paired_wall"] == pytest.approx([f / w for f, w in zip(fl["runs_wall_s"], walls, strict=True)])


def test_a_gemm_wider_than_the_lm_heads_blocks_is_timed_in_its_faster_form(monkeypatch):
    """The floor times the LM head's forward whole and in the column blocks the product runs it in, and counts the
    form with the lower median: a floor whole-only would be easier to approach than what the GEMMs can do."""
    import bench.gemm_floor as gf

    calls: list[tuple[int, ...]] = []
    real_mm = torch.mm

    def mm(a, b, out):
        calls.append(tuple(b.shape))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(gf, "VOCAB_BLOCK", 48)
    monkeypatch.setattr(gf.torch, "mm", mm)
    t = gf.time_gemm(gf.Gemm("lm_head fwd", 1, 16, 8, 100, 1), torch.float32, reps=3)
    assert calls.count((8, 100)) == 4 and calls.count((8, 48)) == 8 and calls.count((8, 4)) == 4  # warm-up + 3
    assert 0 <= t["best_cpu_s"] <= t["cpu_s"] and 0 < t["best_wall_s"] <= t["wall_s"]


def test_the_lm_heads_bf16_weight_gradient_is_also_timed_as_the_step_runs_it(monkeypatch):
    """Where the CPU kernels' LM-head GEMM is built (model/csrc/cpu_lm_head.cpp) the step's bf16 weight gradient runs
    there, so the floor times it too and counts the faster form: a floor of torch's forms alone could be slower than
    the GEMM the step runs. Only that GEMM: the kernel is no form of any other product."""
    import bench.gemm_floor as gf

    if not cpu_kernels.built("lm_head_dw", torch.bfloat16):
        pytest.skip("the kernel is built only where the compiler targets AVX-512-BF16")
    calls: list[tuple[int, ...]] = []
    real = cpu_gemms.lm_head_weight_grad
    monkeypatch.setattr(cpu_gemms, "lm_head_weight_grad",
                        lambda g, h, *a, **kw: calls.append(g.shape) or real(g, h, *a, **kw))
    t = gf.time_gemm(gf.Gemm("lm_head dW", 1, 96, 32, 48, 1), torch.bfloat16, reps=3)
    assert calls == [(32, 96)] * 4 and set(t["forms"]) == {"whole", "lm_head_kernel"}  # warm-up + 3
    assert t["cpu_s"] == min(t["forms"].values())
    for name in ("lm_head fwd", "qkv dW"):
        assert set(gf.time_gemm(gf.Gemm(name, 1, 96, 32, 48, 1), torch.bfloat16, reps=1)["forms"]) == {"whole"}
    assert set(gf.time_gemm(gf.Gemm("lm_head dW", 1, 96, 32, 48, 1), torch.float32, reps=1)["forms"]) == {"whole"}


def test_pass_floor_times_each_unskippable_pass_over_the_whole_step(monkeypatch):
    """The softmax pass covers every row of the logits in cache-sized blocks (the last one partial), once per run;
    AdamW and the norm are timed in both precisions, and bf16 adds the weights' casts and gradient conversions."""
    import bench.pass_floor as pf

    calls: list[int] = []
    real = pf.softmax_in_place
    monkeypatch.setattr(pf, "softmax_in_place", lambda x: (calls.append(x.shape[0]), real(x)))
    monkeypatch.setattr(pf, "softmax_rows_per_block", lambda vocab: 8)
    shapes = [torch.Size([64, 16]), torch.Size([16]), torch.Size([32, 16])]
    fp32 = pf.pass_floor(shapes, rows=100, vocab=64, bf16=False, reps=3)
    assert calls == ([8] * 12 + [4]) * 4  # 100 rows a run: the warm-up and 3 timed runs
    # The trainer's update: on CPU with the kernels one pass (pretrain/train/cpu_adamw.py), which with bf16 GEMMs
    # writes the weights' casts too; otherwise torch's fused AdamW and a cast pass of their own.
    one_pass = cpu_kernels.kernels() is not None
    assert [r["name"] for r in fp32["rows"]] == ["loss softmax", "AdamW (one pass)" if one_pass else "AdamW (fused)",
                                                 "grad norm"]
    bf16 = pf.pass_floor(shapes, rows=100, vocab=64, bf16=True, reps=3)
    assert [r["name"] for r in bf16["rows"]] == (
        ["loss softmax", "AdamW + bf16 casts (one pass)", "grad norm", "weight grads to fp32"] if one_pass else
        ["loss softmax", "AdamW (fused)", "grad norm", "weights to bf16", "weight grads to fp32"])
    for res in (fp32, bf16):
        assert all(r["wall_s"] > 0 for r in res["rows"])
        assert res["cpu_s"] == pytest.approx(sum(r["cpu_s"] for r in res["rows"]))


def test_precision_times_that_precision_alone(capsys):
    """--precision fp32: only fp32's step and floor are timed and printed (bf16 alone makes --ref rounds shorter)."""
    assert train_step.main(["--presets", "tiny", "--floor", "--iters", "1", "--tiny-batch", "1", "--seq-len", "32",
                            "--threads", "1", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "  fp32: step " in out and "  bf16: step " not in out
    assert out.count("lm_head dW") == 1


def test_precision_bf16_without_native_bf16_is_refused_in_one_line(capsys):
    assert train_step.main(["--presets", "tiny", "--floor", "--precision", "bf16", "--isa", "avx2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--precision bf16" in err and "--precision fp32" in err


def test_precision_without_floor_is_refused_in_one_line(capsys):
    """The sweep has its own precision switch (--no-amp): --precision there would be ignored, so it is refused."""
    assert train_step.main(["--presets", "tiny", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--floor" in err and "--no-amp" in err


def test_dw_layouts_prints_each_weight_gradient_gemm_in_each_form(capsys):
    """bench/dw_layouts.py: every dW GEMM of the step in the floor's layout and the step's two, and their sums."""
    from bench import dw_layouts

    assert dw_layouts.main(["--preset", "tiny", "--batch", "1", "--seq-len", "32", "--rounds", "1", "--threads", "1",
                            "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "fp32, 1 threads, host ISA: " in lines[0]
    names = [g.name for g in step_gemms(train_step.model_config("tiny"), 1, 32) if g.name.endswith(" dW")]
    rows = {line.split()[0]: [float(v) for v in line.split()[2:]] for line in lines[2:-1]}
    assert list(rows) == [n.split()[0] for n in names] and all(len(v) == 3 for v in rows.values())
    floor = float(lines[-1].split("the floor's form ")[1].split(" ms")[0])
    assert floor == pytest.approx(sum(v[0] for v in rows.values()), abs=0.01 * len(rows))
    # In fp32 every dW the step runs, the LM head's too (model/loss_chunk.py backprop_chunk), takes dY^T as a view.
    step = float(lines[-1].split("the forms the step runs (the view) ")[1].split(" ms")[0])
    assert step == pytest.approx(sum(v[1] for v in rows.values()), abs=0.01 * len(rows))


def test_dw_layouts_forms_are_one_product(monkeypatch):
    """Each form must compute the same dW: a form that multiplies the wrong operands stops the bench."""
    from bench import dw_layouts

    real = dw_layouts._forms
    monkeypatch.setattr(dw_layouts, "_forms", lambda g, dtype: [*real(g, dtype)[:2], lambda: torch.zeros(g.m, g.n)])
    with pytest.raises(AssertionError):
        dw_layouts.measure("tiny", 1, 32, torch.float32, 1)


def test_dw_layouts_refuses_bf16_without_native_bf16_in_one_line(monkeypatch, capsys):
    from bench import dw_layouts

    monkeypatch.setattr(dw_layouts, "native_bf16", lambda: False)
    assert dw_layouts.main(["--preset", "tiny", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--precision fp32" in err


def test_dw_layouts_times_the_lm_heads_kernel_as_the_bf16_step_runs_it(capsys):
    """In bf16, where the kernel is built, the LM head's row has a fourth form, the kernel's, and the step's sum takes
    it there and the view elsewhere."""
    from bench import dw_layouts

    if not (native_bf16() and cpu_kernels.built("lm_head_dw", torch.bfloat16)):
        pytest.skip("a host with native bf16 and the kernel built")
    assert dw_layouts.main(["--preset", "tiny", "--batch", "1", "--seq-len", "32", "--rounds", "1", "--threads", "1",
                            "--precision", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: [float(v) for v in line.split()[2:]] for line in lines[2:-1]}
    assert len(rows.pop("lm_head")) == 4 and all(len(v) == 3 for v in rows.values())
    head = [float(v) for v in next(ln for ln in lines if ln.split()[0] == "lm_head").split()[2:]]
    step = float(lines[-1].split("the forms the step runs (the view; the LM head's kernel) ")[1].split(" ms")[0])
    assert step == pytest.approx(sum(v[1] for v in rows.values()) + head[3], abs=0.01 * (len(rows) + 1))
