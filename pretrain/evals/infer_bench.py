"""Measured inference cost per attention variant: KV-cache bytes, prefill and decode speed, peak memory.

    python -m pretrain.infer_bench runs/base runs/gqa                      # trained runs (their checkpoints)
    python -m pretrain.infer_bench --preset small --variants baseline,gqa   # random weights, no run needed
    python -m pretrain.infer_bench runs/base --lengths 128,512 --decode-tokens 8    # small, for CPU

For each context length L: the model's KV caches are allocated for L + decode tokens and their real
bytes counted (cross-checked against ModelConfig.kv_cache_bytes_per_token: `kv_match`), L random
tokens are prefilled in one forward (prefill tok/s), then tokens are decoded one at a time against the
cache (decode tok/s, the figure KV size decides at long context). Peak memory is the device's peak
allocation (CUDA) or, on CPU, the peak of live tensors traced during one prefill + decode pass.
Lengths may exceed the trained block (RoPE extrapolates; the speed and memory do not depend on quality).
A run's figures are appended to its train.jsonl as an `infer` event (and TensorBoard when the run has
tb/), which `compare` shows; `compare --measure` runs this first.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model import ModelConfig
from model.config import ATTN_VARIANTS, PRESETS
from pretrain.cli import ArgumentParser, UserError, script_exit_code
from pretrain.track.progress import Progress
from pretrain.units import DTYPE_NAMES, torch_dtype

if TYPE_CHECKING:
    import torch

    from model import GPT
# torch and GPT are imported where used, so --help answers without loading them.

DEFAULT_LENGTHS = (1024, 4096, 16384)


def parse_lengths(text: str) -> list[int]:
    """"1024,4k,16K" -> [1024, 4096, 16384]; UserError for anything else."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        try:
            n = int(p[:-1]) * 1024 if p.endswith("k") else int(p)
        except ValueError:
            n = 0
        if n <= 0:
            raise UserError(f"--lengths {text!r}: {part!r} is not a positive length; use e.g. 1024,4096,16384 or 1K,4K")
        if n not in out:
            out.append(n)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _peak_cpu_bytes(model: GPT, length: int, decode_tokens: int) -> int:
    """Peak bytes of live tensors (weights included) over one prefill + a few decode steps, traced on CPU."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        caches = model.new_caches(1, length + decode_tokens)
        x = torch.randint(0, model.config.vocab_size, (1, length))
        h = model.hidden_states(x, caches)
        token = model.lm_head(h[:, -1]).argmax(-1, keepdim=True)
        for _ in range(min(decode_tokens, 2)):  # decode's peak is reached on its first steps
            tracker.reset_mod_stats()  # per-module figures only; the global peak is kept
            token = model.lm_head(model.hidden_states(token, caches)[:, -1]).argmax(-1, keepdim=True)
        del caches, x, h, token
    return int(sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()))


def measure(model: GPT, lengths: Sequence[int], decode_tokens: int = 32, device: torch.device | str = "cpu",
            peak_memory: bool = True) -> list[dict[str, Any]]:
    """One row of measured figures per context length (see the module docstring)."""
    import torch

    with torch.no_grad():
        return _measure(model, lengths, decode_tokens, torch.device(device), peak_memory)


def _measure(model: GPT, lengths: Sequence[int], decode_tokens: int, device: torch.device,
             peak_memory: bool) -> list[dict[str, Any]]:
    import torch

    model.eval()
    mcfg = model.config
    dtype = next(model.parameters()).dtype
    rows = []
    progress = Progress("inference benchmark", len(lengths), "lengths")
    warm = model.new_caches(1, 16)  # first calls pay one-off dispatch/kernel setup: keep them out of the figures
    model.hidden_states(torch.zeros(1, 8, dtype=torch.long, device=device), warm)
    model.hidden_states(torch.zeros(1, 1, dtype=torch.long, device=device), warm)
    for length in lengths:
        slots = length + decode_tokens
        caches = model.new_caches(1, slots)
        held = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in caches)
        per_token = held / slots
        expected = mcfg.kv_cache_bytes_per_token(torch.empty((), dtype=dtype).element_size())
        x = torch.randint(0, mcfg.vocab_size, (1, length), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        token = model.lm_head(model.hidden_states(x, caches)[:, -1]).argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            token = model.lm_head(model.hidden_states(token, caches)[:, -1]).argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            del caches, x, token
            peak = _peak_cpu_bytes(model, length, decode_tokens) if peak_memory else None
        rows.append({
            "length": length, "kv_bytes": held, "kv_bytes_per_token": per_token,
            "kv_bytes_per_token_formula": expected, "kv_match": abs(per_token - expected) < 1e-9,
            "prefill_tok_s": length / (t1 - t0), "decode_tok_s": decode_tokens / (t2 - t1) if decode_tokens else None,
            "peak_mem_bytes": peak, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        })
        progress.step(len(rows))  # between lengths, never inside a timed region
    progress.close()
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Flat figures of one model's rows for train.jsonl / compare: per-length decode/prefill/peak."""
    out: dict[str, Any] = {"kv_bytes_per_token": rows[0]["kv_bytes_per_token"],
                           "kv_match": all(r["kv_match"] for r in rows), "dtype": rows[0]["dtype"],
                           "device": rows[0]["device"], "lengths": [r["length"] for r in rows]}
    for r in rows:
        for key in ("prefill_tok_s", "decode_tok_s", "peak_mem_bytes"):
            out[f"{key}@{r['length']}"] = r[key]
    return out


def record_in_run(run_dir: Path, step: int | None, summary: dict[str, Any]) -> None:
    """Append an `infer` event to the run's train.jsonl, and TensorBoard scalars when the run keeps tb/."""
    from pretrain.track.runlog import JSONL_NAME, to_metrics

    event = {"type": "infer", "time": round(time.time(), 3), "step": step, **summary}
    with open(run_dir / JSONL_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")
    if (run_dir / "tb").is_dir():
        from pretrain.track.tensorboard import TBWriter

        tb = TBWriter(run_dir, enabled=True)
        tb.log(to_metrics("infer", summary), step=step or 0)
        tb.close()


def bench_run(run_dir: Path, lengths: Sequence[int], decode_tokens: int, device: torch.device,
              dtype: str | None, write: bool = True) -> dict[str, Any]:
    """Measure a trained run's checkpoint; record the figures in the run unless write=False."""
    from pretrain.evals.run_model import load_run_checkpoint

    ckpt = load_run_checkpoint(run_dir)
    model = ckpt.model(device).to(dtype=torch_dtype(dtype or "bf16"))  # the usual inference dtype, as the KV formula
    summary = summarize(measure(model, lengths, decode_tokens, device))
    summary |= {"variant": model.config.attn, "checkpoint": ckpt.path.name}
    if write:
        record_in_run(run_dir, ckpt.state.get("step"), summary)
    return {"run": run_dir.name, **summary}


def bench_preset(preset: str, variant: str, lengths: Sequence[int], decode_tokens: int, device: torch.device,
                 dtype: str | None) -> dict[str, Any]:
    """Measure a preset's shape with random weights (a GPT-2 vocabulary)."""
    import torch

    from model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, attn=variant, vocab_size=50257)).to(device=device,
                                                                                   dtype=torch_dtype(dtype or "bf16"))
    return {"run": f"{preset}-{variant}", "variant": variant,
            **summarize(measure(model, lengths, decode_tokens, device))}


def format_rows(results: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['run']} ({r['variant']}, {r['dtype']} on {r['device']}): KV {r['kv_bytes_per_token']:,.0f} "
                     f"B/token measured, formula {'agrees' if r['kv_match'] else 'DIFFERS'}")
        for n in r["lengths"]:
            peak = r[f"peak_mem_bytes@{n}"]
            dec = r[f"decode_tok_s@{n}"]
            lines.append(f"  ctx {n:>6}: prefill {r[f'prefill_tok_s@{n}']:>10,.0f} tok/s  decode "
                         f"{(f'{dec:,.1f}' if dec else '-'):>8} tok/s  peak "
                         f"{(f'{peak / 2**20:,.1f} MiB' if peak else '-')}")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pretrain.infer_bench",
                       description="Measure KV-cache bytes, prefill/decode tokens/s and peak memory per variant.")
    p.add_argument("runs", nargs="*", help="run directories; their best.pt, else last.pt, else newest "
                   "step_<N>.pt is measured (the default of generate, downstream and export)")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="measure a preset with random weights")
    p.add_argument("--variants", default=",".join(ATTN_VARIANTS), help="with --preset: comma-separated variants")
    p.add_argument("--lengths", default="1K,4K,16K", help="context lengths (default 1K,4K,16K)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per length")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None, help="weights/cache dtype (default bf16)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--no-write", action="store_true", help="do not record the figures in the runs' train.jsonl")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    lengths = parse_lengths(a.lengths)
    if a.decode_tokens < 0:
        raise UserError(f"--decode-tokens must be >= 0, got {a.decode_tokens}")
    if not a.runs and not a.preset:
        raise UserError("nothing to measure; pass run directories, or --preset small (random weights)")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ATTN_VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; use {', '.join(ATTN_VARIANTS)}")
    from pretrain.evals.run_model import find_checkpoint

    for run in a.runs:
        find_checkpoint(Path(run))  # every run checked before the first (slow) measurement
    import torch

    device = torch.device(a.device)
    results = [bench_run(Path(r), lengths, a.decode_tokens, device, a.dtype, not a.no_write) for r in a.runs]
    if a.preset:
        results += [bench_preset(a.preset, v, lengths, a.decode_tokens, device, a.dtype) for v in variants]
    print(json.dumps(results, indent=1) if a.json else format_rows(results))
    return 0


if __name__ == "__main__":
    sys.exit(script_exit_code(main))
