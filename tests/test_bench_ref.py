"""bench/train_step.py --floor --ref: another checkout's step timed with this bench, alternating processes, and the
medians side by side (the before/after of issue 23.1 in one run); page faults and tok/s per precision; with
--grad-accum, bf16 with --bf16-weight-cache beside plain bf16."""

from __future__ import annotations

import subprocess

from conftest import ROOT

from bench import train_step
from bench.gemm_floor import native_bf16


def test_ref_times_both_checkouts_and_prints_the_summary(tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "model", "pretrain", "bench"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
    assert train_step.main(["--presets", "tiny", "--floor", "--iters", "1", "--tiny-batch", "1", "--seq-len", "16",
                            "--threads", "1", "--grad-accum", "2", "--ref", str(ref)]) == 0
    out = capsys.readouterr().out
    # With accumulation, the bf16 step with the trainer's weight cache is timed beside plain bf16 (where bf16 is
    # native), for both checkouts.
    assert out.count("2 micro-batches per step") >= 2
    assert (out.count("  bf16+cache: step ") >= 2) == native_bf16()
    assert f"[ref: {ref}]" in out and "[this: this checkout]" in out
    assert "summary over 1 alternating rounds (medians), host ISA:" in out
    assert out.count("  ref  fp32") == 1 and out.count("  this fp32") == 1
    # Both checkouts' benches pair each step with one run of its GEMMs: the summary pools the pairs of each.
    assert [line.count("(paired: ") for line in out.splitlines() if line.startswith(("  ref  fp32", "  this fp32"))] \
        == [1, 1]
    assert "the median of 1 steps)" in out
    # by CPU time and by wall time (the one to read where a VM's CPU clock lags a second thread), paired and not
    summary = [line for line in out.splitlines() if line.startswith(("  ref  ", "  this "))]
    assert summary and all("of its GEMM floor by CPU time, " in line and "% wall (paired: " in line
                           and "%, wall " in line and " s wall)" in line for line in summary)
    assert "page faults/step" in out and "tok/s" in out
