"""The tables bench/train_step.py prints: the GEMM floor per precision (and its --ref summary), throughput per
configuration, and the checkpoint stall. Formatting only: every figure is measured by train_step.py's children."""

from __future__ import annotations

import statistics
from typing import Any


def print_floor(res: dict[str, Any]) -> None:
    accum = f", {res['grad_accum']} micro-batches per step" if res.get("grad_accum", 1) > 1 else ""
    print(f"GEMM floor, preset {res['preset']} {res['batch']} x {res['seq_len']}{accum}, host ISA: {res['isa']}")
    for r in res["rows"]:
        fl = r["floor"]
        print(f"  {r['precision']}: step {r['cpu_s']:.3f} CPU-s ({r['step_s']:.3f} s wall), GEMM floor "
              f"{fl['cpu_s']:.3f} CPU-s ({fl['wall_s']:.3f} s wall), {fl['flops'] / 1e9:.1f} GFLOP: "
              f"step at {fl['cpu_s'] / r['cpu_s']:.1%} of its GEMM floor by CPU time "
              f"({fl['wall_s'] / r['step_s']:.1%} wall), non-GEMM {r['cpu_s'] - fl['cpu_s']:.3f} CPU-s, "
              f"{r['tok_s']:.0f} tok/s, {r['faults']:.0f} page faults/step, load {r['load']:.1f}")
        if "best_cpu_s" in r and "best_cpu_s" in fl:  # a --ref checkout's bench may predate them
            print(f"    medians above (step and each GEMM); best against best: step {r['best_cpu_s']:.3f} CPU-s, "
                  f"floor {fl['best_cpu_s']:.3f}: {fl['best_cpu_s'] / r['best_cpu_s']:.1%} by CPU time "
                  f"({fl['best_wall_s'] / r['best_step_s']:.1%} wall)")
        if "paired" in fl:
            paired = fl["paired"]
            walls = fl.get("paired_wall")  # a --ref checkout's bench may predate it
            wall_s = f" ({statistics.median(walls):.1%} wall, {min(walls):.1%}-{max(walls):.1%})" if walls else ""
            print(f"    paired (each step beside one run of its GEMMs): {statistics.median(paired):.1%} of its GEMM "
                  f"floor by CPU time, the median of {len(paired)} ({min(paired):.1%}-{max(paired):.1%}){wall_s}")
        if "passes" in r:
            ps = r["passes"]
            each = ", ".join(f"{x['name']} {x['cpu_s'] * 1e3:.1f}" for x in ps["rows"])
            print(f"    passes no step skips, each alone (bench/pass_floor.py): {each} CPU-ms = {ps['cpu_s']:.3f} "
                  f"CPU-s; with the GEMM floor, a ceiling of {fl['cpu_s'] / (fl['cpu_s'] + ps['cpu_s']):.1%} of the "
                  f"floor by CPU time ({fl['wall_s'] / (fl['wall_s'] + ps['wall_s']):.1%} wall)")
        for g in fl["rows"]:
            forms = g.get("forms", {})  # several where a GEMM is timed in more than one form: each one's median
            alt = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in forms.items()) if len(forms) > 1 else ""
            alt = f"  (median of one run: {alt} CPU-ms)" if alt else ""
            print(f"      {g['name']:<16}{g['shape']:>18} x{g['count']:<3}{g['cpu_s'] * 1e3:>8.1f} CPU-ms "
                  f"{g['flops'] / g['cpu_s'] / 1e9 if g['cpu_s'] else 0:>7.0f} GFLOP/CPU-s{alt}")
        if "profile" in r:
            print(r["profile"])


def print_floor_summary(by_code: dict[str, list[dict[str, Any]]]) -> None:
    """--ref: per precision, the median over rounds of each checkout's GEMM-floor ratio and tok/s, and the median
    of every round's paired ratios (each step beside one run of its GEMMs), by CPU time and by wall time (with
    several threads some VMs' process CPU clock lags the other threads' time: bench/README.md, eleventh pass)."""
    isa = next(iter(by_code.values()))[0]["isa"]
    print(f"summary over {len(by_code['this'])} alternating rounds (medians), host ISA: {isa}")
    for code, results in by_code.items():
        for name in [r["precision"] for r in results[0]["rows"]]:
            rows = [r for res in results for r in res["rows"] if r["precision"] == name]
            ratio = statistics.median(r["floor"]["cpu_s"] / r["cpu_s"] for r in rows)
            wall = statistics.median(r["floor"]["wall_s"] / r["step_s"] for r in rows)
            paired = [p for r in rows for p in r["floor"].get("paired", [])]  # a --ref bench may predate pairing
            walls = [p for r in rows for p in r["floor"].get("paired_wall", [])]
            wall_s = f", wall {statistics.median(walls):.1%}" if walls else ""
            paired_s = f" (paired: {statistics.median(paired):.1%}{wall_s}, the median of {len(paired)} steps)" \
                if paired else ""
            print(f"  {code:<5}{name:<11} step {statistics.median(r['cpu_s'] for r in rows):.3f} CPU-s "
                  f"({statistics.median(r['step_s'] for r in rows):.3f} s wall), {ratio:.1%} of its GEMM floor by "
                  f"CPU time, {wall:.1%} wall{paired_s}, {statistics.median(r['tok_s'] for r in rows):.0f} "
                  f"tok/s, {statistics.median(r['faults'] for r in rows):.0f} page faults/step")


def print_throughput(rows: list[dict[str, Any]]) -> None:
    head = (f"{'preset':<7}{'params':>8} {'B x T':>8} {'ckpt':>5} {'compile':>8} {'1st step s':>11} "
            f"{'compile s':>10} {'step s':>7} {'tok/s':>6} {'GFLOP/s':>8} {'of fp32 mm':>11} {'of bf16 mm':>11} "
            f"{'CPU-time':>9} {'faults':>8} {'RSS MB':>7} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        achieved = r["flops_per_token"] * r["tok_s"]
        step_flops = r["flops_per_token"] * r["batch"] * r["seq_len"]
        peak_dtype = "bf16" if r["amp"] else "fp32"
        by_cpu = step_flops / r["cpu_s"] / r["peak"][f"{peak_dtype}_cpu"]
        compile_s = f"{r['first_s'] - r['step_s']:.1f}" if r["compile"] else "-"
        of = {d: f"{achieved / r['peak'][d]:.1%}" if d in r["peak"] else "-" for d in ("fp32", "bf16")}
        print(f"{r['preset']:<7}{r['params'] / 1e6:>7.1f}M {r['batch']:>3} x {r['seq_len']:<4}"
              f"{'yes' if r['gc'] else 'no':>5} {'yes' if r['compile'] else 'no':>8} {r['first_s']:>11.2f} "
              f"{compile_s:>10} {r['step_s']:>7.2f} {r['tok_s']:>6.0f} {achieved / 1e9:>8.2f} "
              f"{of['fp32']:>11} {of['bf16']:>11} {by_cpu:>9.1%} {r['faults']:>8.0f} "
              f"{r['rss_mb']:>7.0f} {r['load']:>5.1f}")
    for dtype in ("fp32", "bf16"):
        wall = [r["peak"][dtype] / 1e9 for r in rows if dtype in r["peak"]]
        cpu = [r["peak"][f"{dtype}_cpu"] / 1e9 for r in rows if dtype in r["peak"]]
        if wall:
            print(f"{dtype} 2048^3 matmul peak per process: {min(wall):.0f}-{max(wall):.0f} GFLOP/s "
                  f"({min(cpu):.0f}-{max(cpu):.0f} GFLOP per CPU-second)")
    print("CPU-time: the step's FLOPs per CPU-second over the matmul's (autocast dtype); time-slicing by other "
          "processes does not enter it. faults: minor page faults per steady step.")


def print_stall(results: list[dict[str, Any]]) -> None:
    head = (f"{'preset':<7}{'ckpt MB':>8} {'mode':<6}{'plain step ms':>14} {'save() ms':>10} {'next step ms':>13} "
            f"{'tail ms':>8} {'write s':>8} {'stall ms':>9} {'step+save ms':>13}")
    print(head)
    print("-" * len(head))
    for res in results:
        for r in res["rows"]:
            stall = r["save_s"] + r["tail_s"]
            if r["mode"] == "async":  # only then does a write overlap the next step
                stall += max(0.0, r["next_s"] - res["plain_s"])
            print(f"{res['preset']:<7}{res['ckpt_mb']:>8.0f} {r['mode']:<6}{res['plain_s'] * 1e3:>14.0f} "
                  f"{r['save_s'] * 1e3:>10.0f} {r['next_s'] * 1e3:>13.0f} {r['tail_s'] * 1e3:>8.0f} "
                  f"{r['write_s']:>8.2f} {stall * 1e3:>9.0f} {(res['plain_s'] + stall) * 1e3:>13.0f}")
