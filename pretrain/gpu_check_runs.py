"""The trainer as `make gpu-check` runs it: a child process run to its end or stopped by SIGTERM, and what the
check reads back from its run directory (resume exactness, compile counts, per-phase speed and memory)."""

from __future__ import annotations

import hashlib
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.track.runlog import JSONL_NAME, median_tok_s, read_jsonl

RUN_TIMEOUT_S = 1800.0  # one trainer process; a hung one is killed and reported, not waited for forever


def trainer_argv(args: list[str]) -> list[str]:
    """The trainer as the launcher runs it: the repo's script, or the installed package's module."""
    from pretrain.plan.launch import TRAINER

    return [sys.executable, *([str(TRAINER)] if TRAINER.is_file() else ["-m", "pretrain.train"]), *args]


def run(argv: list[str], run_dir: Path, log: Path, stop_after_step: int | None = None) -> tuple[int, float | None]:
    """Run the trainer to its end, or until it logs step `stop_after_step`, then SIGTERM it.
    Returns (exit code, seconds from the signal to the process's exit or None)."""
    jsonl = run_dir / JSONL_NAME
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t_start, latency = time.monotonic(), None
        try:
            while proc.poll() is None:
                if time.monotonic() - t_start > RUN_TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                    return -9, None
                if stop_after_step is not None and latency is None and any(
                        e.get("type") == "train" and e.get("step", 0) >= stop_after_step for e in read_jsonl(jsonl)):
                    t_sig = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    code = proc.wait(timeout=RUN_TIMEOUT_S)
                    return code, time.monotonic() - t_sig
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, latency


def model_digest(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """(hash of last.pt's model tensors, its progress: step, tokens, data position), or (None, {})."""
    import torch

    path = run_dir / "last.pt"
    if not path.is_file():
        return None, {}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state["model"]):
        t = state["model"][k]
        h.update(k.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest(), {k: state.get(k) for k in ("step", "tokens", "sampler")}


def compare_resume(ref: Path, resumed: Path, bitwise: bool) -> tuple[str, bool]:
    """Did the stopped-and-resumed run end where the uninterrupted one did? (cell text, passed)."""
    a = {e["step"]: e.get("loss") for e in read_jsonl(ref / JSONL_NAME) if e.get("type") == "train"}
    b = {e["step"]: e.get("loss") for e in read_jsonl(resumed / JSONL_NAME) if e.get("type") == "train"}
    if not a or set(a) != set(b):
        return f"DIFFERS: steps logged {sorted(b)} vs {sorted(a)}", False
    (ha, pa), (hb, pb) = model_digest(ref), model_digest(resumed)
    if ha is None or hb is None:
        return "DIFFERS: no last.pt", False
    if pa != pb:
        return "DIFFERS: step, tokens or data position", False
    if ha == hb and all(a[s] == b[s] for s in a):
        return "exact", True
    gap = max((abs(a[s] - b[s]) / max(abs(a[s]), 1e-9) for s in a if a[s] is not None and b[s] is not None),
              default=math.inf)
    if bitwise:
        return f"DIFFERS: loss rel. {gap:.1e}, weights differ", False
    # CUDA kernels (atomics in backward) are not bitwise reproducible even without a stop: close is the bar.
    return (f"close ({gap:.0e}, CUDA)", True) if gap <= 1e-3 else (f"DIFFERS: loss rel. {gap:.1e}", False)


def compile_counts(*run_dirs: Path) -> dict[str, int] | None:
    """Largest graphs / recompiles / eager fallbacks of the runs' `end` events (None when the trainer does not
    report them)."""
    found = [e["compile"] for d in run_dirs for e in read_jsonl(d / JSONL_NAME)
             if e.get("type") == "end" and isinstance(e.get("compile"), dict)]
    if not found:
        return None
    return {k: max(int(c.get(k) or 0) for c in found) for k in ("frames", "recompiles", "eager_fallbacks")}


def measured_phases(run_dir: Path, cut: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Per phase of the check: median tok/s and MFU (without the phase's first step, which compiles) and the
    peak memory of its train events, next to the plan's estimates for that phase."""
    events = [e for e in read_jsonl(run_dir / JSONL_NAME) if e.get("type") == "train"]
    out = []
    for c, p in zip(cut, plan["phases"]):
        mine = [e for e in events if c["start_step"] < e.get("step", 0) <= c["end_step"]]
        warm = mine[1:] or mine
        mfus = sorted(v for e in warm if isinstance(v := e.get("mfu"), int | float))
        mem = [v for e in mine for k in ("mem_peak_gb", "mem_rss_gb") if isinstance(v := e.get(k), int | float)]
        cuda = any("mem_peak_gb" in e for e in mine)
        out.append({"seq_len": c["seq_len"], "tokens": p["tokens"], "tok_s": median_tok_s(warm),
                    "tok_s_plan": p["tokens_per_second"], "mfu": mfus[len(mfus) // 2] if mfus else None,
                    "mem_bytes": max(mem) * 1024**3 if mem else None, "mem_kind": "cuda" if cuda else "rss",
                    # CUDA: max_memory_allocated is tensors only, as the estimate before its allowance for the
                    # context and allocator (the --probe comparison, docs/tiers.md); CPU: the process's RSS,
                    # as the cpu plan's peak with its allowance for the Python process.
                    "mem_plan": p["tensor_peak_bytes"] if cuda else p["peak_memory_bytes"]})
    return out


def overall_rate(phases: list[dict[str, Any]], key: str) -> float | None:
    """Tokens per second over the whole planned run if each phase ran at its `key` rate."""
    if any(not p[key] for p in phases):
        return None
    return sum(p["tokens"] for p in phases) / sum(p["tokens"] / p[key] for p in phases)
