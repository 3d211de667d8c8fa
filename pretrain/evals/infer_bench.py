"""Measured inference cost per attention variant: KV-cache bytes, prefill and decode speed, peak memory.

    python -m pretrain.evals.infer_bench runs/base runs/gqa                      # trained runs (their checkpoints)
    python -m pretrain.evals.infer_bench --preset small --variants baseline,gqa   # random weights, no run needed
    python -m pretrain.evals.infer_bench runs/base --lengths 128,512 --decode-tokens 8    # small, for CPU
    python -m pretrain.evals.infer_bench runs/dec --kv-cache bf16,q8_0,sem=q4_0/geo=q8_0/v=q4_0,q4_0:residual=64

For each context length L: the model's KV caches are allocated for L + decode tokens and their real
bytes counted (cross-checked against ModelConfig.kv_cache_bytes_per_token: `kv_match`), L random
tokens are prefilled in one forward (prefill tok/s), then tokens are decoded one at a time against the
cache (decode tok/s, the figure KV size decides at long context). Peak memory is the device's peak
allocation (CUDA) or, on CPU, the peak of live tensors traced during one prefill + decode pass.
Lengths may exceed the trained block (RoPE extrapolates; the speed and memory do not depend on quality).

--kv-cache repeats the cache figures per KV setting (model/kv_formats.py: bf16, q8_0, q4_0, nf4, per-part
and residual-window settings): the bytes its tensors really hold per token, prefill and decode tok/s, and
for a run, the val-loss change of decoding its held-out text through that cache against the model's own
(pretrain/evals/kv_quality.py), recorded under `kv_formats` in the `infer` event.
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
from model.kv_formats import DEFAULT_KV_SETTINGS, KVSetting, parse_kv_settings
from pretrain.errors import ArgumentParser, UserError, script_exit_code
from pretrain.evals.kv_quality import DEFAULT_QUALITY_TOKENS
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


def _timed(model: GPT, caches: list, length: int, decode_tokens: int, device: torch.device) -> tuple[float, float]:
    """Seconds to prefill `length` random tokens into `caches`, then to decode `decode_tokens` one at a time."""
    import torch

    x = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    _sync(device)
    t0 = time.perf_counter()
    token = model.lm_head(model.hidden_states(x, caches)[:, -1]).argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        token = model.lm_head(model.hidden_states(token, caches)[:, -1]).argmax(-1, keepdim=True)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def measure_kv_settings(model: GPT, settings: Sequence[KVSetting], lengths: Sequence[int], decode_tokens: int,
                        device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Per KV setting: measured bytes per token (its tensors' nbytes / slots) and prefill/decode tok/s per length."""
    import torch

    device = torch.device(device)
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        model.eval()
        for s in settings:
            fig: dict[str, Any] = {}
            for length in lengths:
                slots = length + decode_tokens
                caches = model.new_caches(1, slots, s)
                fig["kv_bytes_per_token"] = sum(c.nbytes() for c in caches) / slots
                prefill, decode = _timed(model, caches, length, decode_tokens, device)
                fig[f"prefill_tok_s@{length}"] = length / prefill
                fig[f"decode_tok_s@{length}"] = decode_tokens / decode if decode_tokens else None
            out[s.name] = fig
    return out


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
        held = sum(c.nbytes() for c in caches)
        per_token = held / slots
        expected = mcfg.kv_cache_bytes_per_token(torch.empty((), dtype=dtype).element_size())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, decode = _timed(model, caches, length, decode_tokens, device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            del caches
            peak = _peak_cpu_bytes(model, length, decode_tokens) if peak_memory else None
        rows.append({
            "length": length, "kv_bytes": held, "kv_bytes_per_token": per_token,
            "kv_bytes_per_token_formula": expected, "kv_match": abs(per_token - expected) < 1e-9,
            "prefill_tok_s": length / prefill, "decode_tok_s": decode_tokens / decode if decode_tokens else None,
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
              dtype: str | None, write: bool = True, kv_settings: Sequence[KVSetting] = (),
              quality_tokens: int = DEFAULT_QUALITY_TOKENS) -> dict[str, Any]:
    """Measure a trained run's checkpoint (and each KV setting, its quality on the run's held-out text);
    record the figures in the run unless write=False."""
    from pretrain.evals.kv_quality import held_out_rows, quality
    from pretrain.evals.run_model import load_run_checkpoint

    ckpt = load_run_checkpoint(run_dir)
    model = ckpt.model(device).to(dtype=torch_dtype(dtype or "bf16"))  # the usual inference dtype, as the KV formula
    summary = summarize(measure(model, lengths, decode_tokens, device))
    summary |= {"variant": model.config.attn, "checkpoint": ckpt.path.name}
    if kv_settings:
        formats = measure_kv_settings(model, kv_settings, lengths, decode_tokens, device)
        rows = held_out_rows(run_dir, model.config.block_size, quality_tokens, device) if quality_tokens else None
        for name, figures in quality(model, rows, list(kv_settings)).items():
            formats[name] |= figures
        summary["kv_formats"] = formats
    if write:
        record_in_run(run_dir, ckpt.state.get("step"), summary)
    return {"run": run_dir.name, **summary}


def bench_preset(preset: str, variant: str, lengths: Sequence[int], decode_tokens: int, device: torch.device,
                 dtype: str | None, kv_settings: Sequence[KVSetting] = ()) -> dict[str, Any]:
    """Measure a preset's shape with random weights (a GPT-2 vocabulary); no held-out text, so no quality."""
    import torch

    from model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, attn=variant, vocab_size=50257)).to(device=device,
                                                                                   dtype=torch_dtype(dtype or "bf16"))
    out = {"run": f"{preset}-{variant}", "variant": variant,
           **summarize(measure(model, lengths, decode_tokens, device))}
    if kv_settings:
        out["kv_formats"] = measure_kv_settings(model, kv_settings, lengths, decode_tokens, device)
    return out


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
        longest = r["lengths"][-1]
        formats = r.get("kv_formats") or {}
        width = max(map(len, formats), default=0)
        for name, f in formats.items():
            dec = f.get(f"decode_tok_s@{longest}")
            delta = f.get("val_loss_delta")
            lines.append(f"  KV {name:<{width}} {f['kv_bytes_per_token']:>10,.1f} B/token "
                         f"({f['kv_bytes_per_token'] / r['kv_bytes_per_token']:.3f}x)  decode "
                         f"{(f'{dec:,.1f}' if dec else '-'):>8} tok/s@{longest}  val loss "
                         + ("-" if delta is None else f"{f['val_loss']:.4f} ({delta:+.4f})"))
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pretrain.evals.infer_bench",
                       description="Measure KV-cache bytes, prefill/decode tokens/s and peak memory per variant.")
    p.add_argument("runs", nargs="*", help="run directories; their best.pt, else last.pt, else newest "
                   "step_<N>.pt is measured (the default of generate, downstream and export)")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="measure a preset with random weights")
    p.add_argument("--variants", default=",".join(ATTN_VARIANTS), help="with --preset: comma-separated variants")
    p.add_argument("--lengths", default="1K,4K,16K", help="context lengths (default 1K,4K,16K)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per length")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None, help="weights/cache dtype (default bf16)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    add_kv_cache_flags(p)
    p.add_argument("--no-write", action="store_true", help="do not record the figures in the runs' train.jsonl")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def add_kv_cache_flags(p: ArgumentParser) -> None:
    """--kv-cache and --quality-tokens (here and in compare --measure)."""
    p.add_argument("--kv-cache", default=DEFAULT_KV_SETTINGS,
                   help="KV settings measured, comma-separated: bf16, fp16, q8_0, q4_0, nf4, with "
                   ":residual=N, or per part k=/v=/sem=/geo= joined by / (default %(default)s; '' none)")
    p.add_argument("--quality-tokens", type=int, default=DEFAULT_QUALITY_TOKENS,
                   help="held-out tokens decoded through each KV setting for its val-loss change (0: skip)")


def kv_settings_arg(a: Any) -> list[KVSetting]:
    """The parsed --kv-cache (empty when ''), UserError for a bad one or a negative --quality-tokens."""
    if a.quality_tokens < 0:
        raise UserError(f"--quality-tokens must be >= 0 (0 skips the quality figures), got {a.quality_tokens}")
    if not a.kv_cache.strip():
        return []
    try:
        return parse_kv_settings(a.kv_cache)
    except ValueError as e:
        raise UserError(f"--kv-cache: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    lengths = parse_lengths(a.lengths)
    kv_settings = kv_settings_arg(a)
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
    results = [bench_run(Path(r), lengths, a.decode_tokens, device, a.dtype, not a.no_write, kv_settings,
                         a.quality_tokens) for r in a.runs]
    if a.preset:
        results += [bench_preset(a.preset, v, lengths, a.decode_tokens, device, a.dtype, kv_settings)
                    for v in variants]
    print(json.dumps(results, indent=1) if a.json else format_rows(results))
    return 0


if __name__ == "__main__":
    sys.exit(script_exit_code(main))
