"""This project's training step against its peers' at config S, side by side on this host (issue 23.1's lead).

    .venv/bin/python bench/peers.py --nanogpt ../nanoGPT --v29 ../dba/v29_transformer_..._instrumented.py
    .venv/bin/python bench/peers.py --nanogpt ../nanoGPT --rounds 5 --iters 5 --threads 1
    .venv/bin/python bench/peers.py --nanogpt ../nanoGPT --config tiny --rounds 1   # a smoke run in seconds

The peers are the checkouts you name (nothing is downloaded): nanoGPT's model.py (github:karpathy/nanoGPT) and the
original research trainer (github:TheApeMachine/decoupled-bottleneck-attention, v29_transformer_..._instrumented.py
at commit 51037f6). Each trainer runs its own model and its own training step at config S (6 layers, d 384, 6 heads,
T 256, micro-batch 8, vocab 50304, random tokens), in bf16 autocast where the host multiplies bf16 natively (else
fp32): forward, loss, backward, clipping to 1.0, its optimizer's step, zero_grad.
- this project: bench/train_step.py's Step (the trainer's model, chunked loss, fused AdamW with the non-finite skip).
- nanoGPT: GPT(GPTConfig(n_layer 6, n_head 6, n_embd 384, block 256, bias False, dropout 0)), its own
  configure_optimizers (AdamW, wd 0.1); its train.py runs CPU in fp32 (nullcontext): autocast is enabled here,
  as the issue's comparison allowed, so both sides multiply in bf16.
- v29: its GPT(ModelConfig(attn_mode standard, d_model 384, d_ff 1024, 6 heads, rope, swiglu)), torch's AdamW
  (wd 0.1, betas 0.9/0.95, as its CLI defaults on CPU), F.cross_entropy over the whole logits, as its train loop.

Each trainer is one fresh process per round (its own memory, OMP_NUM_THREADS = --threads), the trainers alternating
within a round so load from other processes shifts them alike; this project's children get the process settings its
trainer makes for itself (pretrain/train/host_alloc.py, host_threads.py), the peers torch's defaults. Printed: per
round each trainer's median step (wall and CPU seconds) and tok/s, then the medians over rounds and this project's
lead over each peer (tok/s ratio), with the host's ISA. Model sizes differ slightly (nanoGPT's GELU MLP is 4 x d,
learned positions, LayerNorm): each side's parameter count is printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm_floor import host_isa, native_bf16  # noqa: E402

# Config S (issue 15), and a tiny one (model/config.py's tiny preset at 2 x 64) for a smoke run in seconds.
CONFIGS = {"S": dict(vocab=50304, layers=6, d=384, heads=6, d_ff=1024, T=256, batch=8),
           "tiny": dict(vocab=50257, layers=2, d=64, heads=4, d_ff=192, T=64, batch=2)}


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _peer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor],
               amp: bool) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build(trainer: str, path: str | None, amp: bool, config: str = "S") -> tuple[Callable[[], None], int]:
    """(one optimizer step of `trainer` at CONFIGS[config], its parameter count)."""
    S = CONFIGS[config]
    torch.manual_seed(0)
    x = torch.randint(0, S["vocab"], (S["batch"], S["T"]))
    y = torch.randint(0, S["vocab"], (S["batch"], S["T"]))
    if trainer == "this":
        from bench.train_step import Step

        step = Step(config, S["batch"], S["T"], False, False, amp)
        return step, sum(p.numel() for p in step.model.parameters())
    assert path is not None
    if trainer == "nanogpt":
        mod = _load(Path(path) / "model.py", "nanogpt_model")
        model = mod.GPT(mod.GPTConfig(block_size=S["T"], vocab_size=S["vocab"], n_layer=S["layers"],
                                      n_head=S["heads"], n_embd=S["d"], dropout=0.0, bias=False))
        with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter groups
            opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
        loss_of = lambda: model(x, y)[1]  # noqa: E731
    elif trainer == "v29":
        mod = _load(Path(path), "v29_trainer")
        model = mod.GPT(mod.ModelConfig(vocab_size=S["vocab"], block_size=S["T"], n_layer=S["layers"],
                                        n_head=S["heads"], d_model=S["d"], d_ff=S["d_ff"], embed_dim=S["d"],
                                        attn_mode="standard", attn_dim=S["d"], rope=True, mlp="swiglu"))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))

        def loss_of() -> torch.Tensor:
            logits, _ = model(x)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    else:
        raise ValueError(trainer)
    model.train()
    return _peer_step(model, opt, loss_of, amp), sum(p.numel() for p in model.parameters())


class PeerError(Exception):
    """A named checkout that does not build a step as that trainer does (wrong file, missing names)."""


def child(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        step, params = build(spec["trainer"], spec.get("path"), spec["amp"], spec["config"])
    except (ImportError, AttributeError, TypeError, SyntaxError, NameError) as e:
        if spec["trainer"] == "this":
            raise
        what = "a nanoGPT checkout (GPT, GPTConfig)" if spec["trainer"] == "nanogpt" else "the v29 trainer file"
        raise PeerError(f"--{spec['trainer']} {spec['path']}: its config {spec['config']} step could not be built "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass {what}") from None
    for _ in range(spec["warmup"]):
        step()
    walls, cpus = [], []
    for _ in range(spec["iters"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    wall = statistics.median(walls)
    S = CONFIGS[spec["config"]]
    return {"trainer": spec["trainer"], "params": params, "step_s": wall, "cpu_s": statistics.median(cpus),
            "tok_s": S["batch"] * S["T"] / wall}


def run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    from bench.children import child_env

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as cache:
        # This project's children get its trainer's process settings; the peers run with torch's defaults.
        env = child_env(threads, cache, trainer_settings=spec["trainer"] == "this")
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              stdout=subprocess.PIPE, text=True)
    if proc.returncode == 2:  # the child said why on stderr, in one line
        raise PeerError("")
    proc.check_returncode()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", help="a nanoGPT checkout (its model.py is timed)")
    ap.add_argument("--v29", help="the research repo's v29 trainer file")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per process (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/OpenMP threads (default: all)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="S", help="S (default) or tiny (a smoke run)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 for every trainer")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        spec = json.loads(args.child)
        if spec["trainer"] == "this":
            from pretrain.train.host_alloc import configure_host_memory, keep_large_blocks

            configure_host_memory()
            keep_large_blocks()  # as the trainer's CPU device setup
        try:
            print(json.dumps(child(spec)), flush=True)
        except PeerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    peers = {"nanogpt": args.nanogpt, "v29": args.v29}
    for name, path in peers.items():
        want = Path(path or ".") / "model.py" if name == "nanogpt" else Path(path or ".")
        if path and not want.is_file():
            print(f"error: --{name} {path}: {want} not found; pass a {name} checkout "
                  f"({'its directory' if name == 'nanogpt' else 'the v29 .py file'})", file=sys.stderr)
            return 2
    peers = {k: v for k, v in peers.items() if v}
    if not peers:
        print("error: no peer named; pass --nanogpt DIR and/or --v29 FILE", file=sys.stderr)
        return 2
    amp = not args.no_amp and native_bf16()
    S = CONFIGS[args.config]
    print(f"config {args.config} ({S['batch']} x {S['T']}, vocab {S['vocab']}), {'bf16 autocast' if amp else 'fp32'}, "
          f"{args.threads} thread{'s' if args.threads != 1 else ''}, torch {torch.__version__}, host ISA: {host_isa()}")
    results: dict[str, list[dict[str, Any]]] = {"this": [], **{k: [] for k in peers}}
    for r in range(args.rounds):
        for trainer in results:
            spec = {"trainer": trainer, "path": peers.get(trainer), "amp": amp, "config": args.config,
                    "iters": args.iters, "warmup": args.warmup}
            try:
                res = run_child(spec, args.threads)
            except PeerError:
                return 2
            results[trainer].append(res)
            print(f"  round {r + 1} {trainer:<8} step {res['step_s']:.3f} s ({res['cpu_s']:.3f} CPU-s), "
                  f"{res['tok_s']:.0f} tok/s, load {os.getloadavg()[0]:.1f}", flush=True)
    tok = {k: statistics.median(r["tok_s"] for r in v) for k, v in results.items()}
    print(f"medians over {args.rounds} rounds:")
    for trainer, res in results.items():
        lead = "" if trainer == "this" else f", this project {tok['this'] / tok[trainer]:.2f}x"
        print(f"  {trainer:<8} {res[0]['params'] / 1e6:.1f} M params, step "
              f"{statistics.median(r['step_s'] for r in res):.3f} s "
              f"({statistics.median(r['cpu_s'] for r in res):.3f} CPU-s), {tok[trainer]:.0f} tok/s{lead}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
