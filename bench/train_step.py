"""Trainer step throughput on CPU, and the stall one checkpoint save adds to a step (async vs synchronous).

    .venv/bin/python bench/train_step.py                     # tiny + small presets; several minutes on 2 cores
    .venv/bin/python bench/train_step.py --presets tiny --iters 10 --no-stall
    .venv/bin/python bench/train_step.py --presets S --no-stall   # issue 15's config S (8 x 256, vocab 50304)
    .venv/bin/python bench/train_step.py --presets S --no-stall --no-amp --threads 1 --iters 5 --repeat 2
    .venv/bin/python bench/train_step.py --presets S --floor --iters 3       # step vs its GEMM floor, fp32 + bf16
    .venv/bin/python bench/train_step.py --presets S --floor --profile       # + where the non-GEMM time goes
    .venv/bin/python bench/train_step.py --presets S --floor --grad-accum 4  # + bf16 with --bf16-weight-cache
    .venv/bin/python bench/train_step.py --presets S --floor --ref ../parent --rounds 3   # before/after, alternating
    .venv/bin/python bench/train_step.py --presets S --floor --precision bf16 --ref ../parent --rounds 6  # bf16 only
    .venv/bin/python bench/train_step.py --presets S --floor --isa avx2   # as an AVX2-only host (fp32) would run it

GEMM floor (--floor): in one process per preset, the step (fp32, and bf16 autocast where the host has native
bf16) against the sum of its own GEMMs, each timed alone at its real shape (bench/gemm_floor.py), in CPU
seconds and wall seconds, with the host's ISA; each timed step also beside one run of its GEMMs right after it
("paired": on a host whose speed moves within minutes, neighbours compare fairly; by CPU and by wall time, the
figure to read with several threads on a VM whose CPU clock lags the second thread); and the passes no step skips
(bench/pass_floor.py: the loss's exp per logit, AdamW, the gradient norm, bf16's casts), each timed alone, with the
ceiling they leave: floor / (floor + passes), the most of its floor a step that runs them could reach on this host
(without --grad-accum).
--profile adds torch.profiler's top ops by self CPU time (bench/step_parts.py times the step's parts themselves,
each beside its own GEMMs).
--isa avx2|avx512|avx512_bf16 caps torch's kernels, oneDNN and MKL in every child (bench/gemm_floor.py: ISA_CAPS), so
this host runs the step as a host with only that ISA would (its caches, memory and clock stay this host's): with
avx2 or avx512 bf16 is emulated and fp32 is the native precision, with avx512_bf16 bf16 is native without AMX.
--grad-accum N runs N micro-batches per optimizer step (floor x N) and adds "bf16+cache", the bf16 step with
the trainer's --bf16-weight-cache (pretrain/train/weight_cache.py); the precisions' steps alternate.
--ref DIR times another checkout's model and trainer code (e.g. `git archive HEAD~1 | tar -x -C DIR`) with this
bench, one process each, alternating --rounds times, and prints the medians side by side. Each child runs with
its checkout's process settings: this one's host memory and OpenMP settings (pretrain/train/host_alloc.py,
host_threads.py), the ref's none unless that checkout has the modules too.

Throughput: for each preset, with and without activation checkpointing (--grad-checkpoint) and with and
without torch.compile (per block, as pretrain/train/session.py does), one optimizer step like the trainer's
(bf16 autocast forward + backward, grad clipping, fused AdamW with the on-device non-finite skip) is timed.
Each configuration runs in a fresh process with an empty inductor cache, so "1st step" includes a cold
compile and the memory column is that configuration's own peak RSS. Reported: steady-state step time
(median), tok/s, achieved model FLOP/s (ModelConfig.flops_per_token: 6N + attention, recompute not
counted) and that as a fraction of the FLOP/s of a 2048^3 matmul timed in the same process, in fp32 and
in bf16 (autocast runs its matmuls in bf16, which this CPU does natively, so bf16 is its practical peak).
On a shared machine wall-clock figures move with other load; "CPU-time" is the same ratio computed from
process CPU seconds (step vs matmul), which time-slicing by other processes leaves mostly unchanged.
"compile s" = first step - steady step of a compiled configuration (cold inductor cache).
"faults" = minor page faults per steady step: memory the allocator handed back to the OS and faults in again.
Only the matmul peak of the dtype in use is timed (a bf16 2048^3 matmul takes minutes on a CPU without native
bf16). Run the same command in a checkout of the parent commit, alternating, for a before/after.

Checkpoint stall: a training step followed by CheckpointManager.save() of the model + AdamW state, vs a
plain step. `save()` is what the caller waits for (snapshot to CPU; plus the whole write when synchronous);
`next step` is the step that runs while an async write is still in flight (it competes for CPU and memory
bandwidth); `tail` is what wait() still blocks for after it. stall = save() + tail, plus for async the
slowdown of the next step (next step - plain step, if positive).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# BENCH_CODE_ROOT (set by --ref for its children): time another checkout's model and trainer with this bench.
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT") or str(Path(__file__).resolve().parents[1]))

from bench.gemm_floor import ISA_CAPS, gemm_floor, host_isa, native_bf16  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from pretrain.train import device as dev  # noqa: E402
from pretrain.train import distributed as dist_lib  # noqa: E402
from pretrain.train.checkpoint import CheckpointManager  # noqa: E402
from pretrain.train.config import TrainConfig  # noqa: E402
from pretrain.train.optim import build_optimizer, step_unless_nonfinite  # noqa: E402
from pretrain.train.weight_cache import weights_cast_once  # noqa: E402


def matmul_peaks(dtypes: tuple[str, ...], n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best-of-reps FLOP/s of an n x n matmul in each of `dtypes`, per wall second and per CPU second."""
    peaks = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up the BLAS threads and kernels
        wall = cpu = float("inf")
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            a @ b
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        peaks[name], peaks[f"{name}_cpu"] = 2 * n**3 / wall, 2 * n**3 / cpu
    return peaks


# Issue 15's config S: the shape well-known single-file trainers are compared on (micro-batch 8, see --s-batch).
CONFIGS = {"S": dict(vocab_size=50304, block_size=256, n_layer=6, n_head=6, d_model=384, d_ff=1024)}


def model_config(preset: str) -> ModelConfig:
    return ModelConfig(**CONFIGS[preset]) if preset in CONFIGS else ModelConfig.from_preset(preset)


class Step:
    """One trainer-like optimizer step on a fixed random batch."""

    def __init__(self, preset: str, batch: int, seq_len: int, grad_checkpoint: bool, compile_: bool,
                 amp: bool, grad_accum: int = 1, weight_cache: bool = False) -> None:
        torch.manual_seed(0)
        self.cfg = model_config(preset)
        self.model = GPT(self.cfg).train()
        self.model.grad_checkpoint = grad_checkpoint
        if compile_:
            for block in self.model.blocks:  # as pretrain/train/session.py: in place, per block
                block.compile()
        tcfg = TrainConfig(size="small" if preset in CONFIGS else preset)  # trainer's optimizer: AdamW, wd 0.1, fused
        self.optimizer = build_optimizer(self.model, tcfg, torch.device("cpu"))
        self.amp = amp
        self.x = torch.randint(0, self.cfg.vocab_size, (batch, seq_len))
        self.y = torch.randint(0, self.cfg.vocab_size, (batch, seq_len))
        self.tokens = batch * seq_len * grad_accum
        self.step = 0
        self.grad_accum = grad_accum
        self.cache_dtype = torch.bfloat16 if amp and weight_cache else None  # --bf16-weight-cache
        # The trainer's CPU bf16 step takes its casts kept between steps (weight_cache.kept_casts_dtype); a --ref
        # checkout from before them has no `kept`.
        self.kept = amp and "kept" in inspect.signature(weights_cast_once).parameters
        self.clock = time.process_time  # what `parts` are timed by (bench/step_parts.py --wall: perf_counter)

    def __call__(self) -> float:
        """Run one step; returns its wall time in seconds (its CPU time is left in `cpu_s`, its minor page faults
        in `faults`, the seconds of its parts by `clock` (CPU time unless changed) in `parts`: forward, backward,
        clip, optimizer)."""
        t0, c0 = time.perf_counter(), time.process_time()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        clock = self.clock
        parts = dict.fromkeys(("forward", "backward"), 0.0)
        kept = {"kept": True} if self.kept else {}
        with weights_cast_once(self.model, torch.bfloat16 if self.kept else self.cache_dtype, **kept):  # as loop.py
            for _ in range(self.grad_accum):
                c = clock()
                with dev.autocast(torch.device("cpu"), self.amp, torch.bfloat16):
                    loss = self.model(self.x, self.y) / self.grad_accum
                parts["forward"] += clock() - c
                c = clock()
                loss.backward()
                parts["backward"] += clock() - c
        c = clock()
        fold = getattr(self.optimizer, "fold_grad_factor", None)  # absent in a --ref checkout before it
        grad_norm = dist_lib.clip_grad_norm(self.model, 1.0, dist_lib.Dist(),  # the trainer's (loop.py)
                                            *([fold] if fold else []))
        parts["clip"], c = clock() - c, clock()
        step_unless_nonfinite(self.optimizer, (~torch.isfinite(grad_norm)).float())
        self.optimizer.zero_grad(set_to_none=True)
        parts["optimizer"] = clock() - c
        self.step += 1
        self.cpu_s = time.process_time() - c0
        self.parts = parts
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        return time.perf_counter() - t0

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    dtypes = ("bf16",) if spec["amp"] else ("fp32",)
    peaks = matmul_peaks(dtypes)
    step = Step(spec["preset"], spec["batch"], spec["seq_len"], spec["gc"], spec["compile"], spec["amp"])
    first = step()  # includes the cold compile when compiled
    for _ in range(spec["warmup"]):
        step()
    times, cpu = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(spec["iters"]):
        times.append(step())
        cpu.append(step.cpu_s)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / spec["iters"]
    rss = rss_mb()
    after = matmul_peaks(dtypes)  # timed again: load from other processes may have changed meanwhile
    steady = statistics.median(times)
    return {**spec, "first_s": first, "step_s": steady, "cpu_s": statistics.median(cpu), "tok_s": step.tokens / steady,
            "load": os.getloadavg()[0],
            "flops_per_token": step.cfg.flops_per_token(spec["seq_len"]), "params": step.cfg.num_params(),
            "peak": {k: max(v, after[k]) for k, v in peaks.items()}, "rss_mb": rss, "faults": faults}


def child_stall(spec: dict[str, Any]) -> dict[str, Any]:
    step = Step(spec["preset"], spec["batch"], spec["seq_len"], False, False, spec["amp"])
    plain = [step() for _ in range(spec["iters"] + 1)][1:]  # the first step allocates the AdamW state
    rows = []
    with tempfile.TemporaryDirectory(dir=spec["dir"], prefix="bench-ckpt-") as d:
        for async_write in (False, True):
            mgr = CheckpointManager(Path(d) / ("async" if async_write else "sync"), keep_last=1,
                                    async_write=async_write)
            saves, nexts, tails, writes = [], [], [], []
            for _ in range(spec["reps"]):
                plain.append(step())
                t0 = time.perf_counter()
                mgr.save(step.state(), step.step)
                saves.append(time.perf_counter() - t0)
                nexts.append(step())
                t1 = time.perf_counter()
                mgr.wait()
                tails.append(time.perf_counter() - t1)
                assert mgr.last_error is None, mgr.last_error
                writes.append(mgr.last_write_seconds or 0.0)
            med = statistics.median
            rows.append({"mode": "async" if async_write else "sync", "save_s": med(saves), "next_s": med(nexts),
                         "tail_s": med(tails), "write_s": med(writes)})
        size = sum(f.stat().st_size for f in Path(d).glob("*/last.pt")) / 2
    return {**spec, "plain_s": statistics.median(plain), "ckpt_mb": size / 1e6, "rows": rows}


def child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The step in each precision the host runs natively, against its GEMM floor timed in this process."""
    precisions = ["fp32", "bf16"] if native_bf16() else ["fp32"]
    if spec.get("precision"):  # --precision: that one alone (in a --ref child too: this function is this bench's)
        precisions = [spec["precision"]]
    accum = spec.get("grad_accum", 1)
    if accum > 1 and "bf16" in precisions:
        precisions.append("bf16+cache")  # --bf16-weight-cache: the weights cast once per step, not per micro-batch
    rows = []
    steps = {}
    for name in precisions:
        steps[name] = Step(spec["preset"], spec["batch"], spec["seq_len"], False, False, name != "fp32", accum,
                           name.endswith("+cache"))
        for _ in range(1 + spec["warmup"]):  # the first step allocates the AdamW state and loss buffers
            steps[name]()
    try:  # each step beside one run of its GEMMs (FloorTimer); a --ref checkout from before it times them after
        from bench.gemm_floor import FloorTimer
    except ImportError:
        timers = {}
    else:
        timers = {name: FloorTimer(step.cfg, spec["batch"], spec["seq_len"],
                                   torch.float32 if name == "fp32" else torch.bfloat16) for name, step in steps.items()}
    timed: dict[str, tuple[list[float], list[float], list[int]]] = {name: ([], [], []) for name in precisions}
    for _ in range(spec["iters"]):  # alternating: load from other processes shifts every precision alike
        for name, step in steps.items():
            timed[name][0].append(step())
            timed[name][1].append(step.cpu_s)
            timed[name][2].append(step.faults)
            if timers:
                timers[name].run()
    for name, step in steps.items():
        amp = name != "fp32"
        walls, cpus, faults = timed[name]
        floor = timers[name].floor() if timers else \
            gemm_floor(step.cfg, spec["batch"], spec["seq_len"], torch.bfloat16 if amp else torch.float32)
        floor = {**floor, **{k: floor[k] * accum for k in ("cpu_s", "wall_s", "best_cpu_s", "best_wall_s", "flops")}}
        if "runs_cpu_s" in floor:
            floor["paired"] = [f * accum / c for f, c in zip(floor["runs_cpu_s"], cpus, strict=True)]
            floor["paired_wall"] = [f * accum / w for f, w in zip(floor["runs_wall_s"], walls, strict=True)]
        row = {"precision": name, "step_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
               "best_step_s": min(walls), "best_cpu_s": min(cpus),
               "faults": statistics.median(faults), "tok_s": step.tokens / statistics.median(walls),
               "floor": floor, "load": os.getloadavg()[0]}
        if accum == 1:  # per micro-batch and per optimizer step passes differ with accumulation: left out there
            try:
                from bench.pass_floor import pass_floor
            except ImportError:  # a --ref checkout from before it
                pass
            else:
                row["passes"] = pass_floor([p.shape for p in step.model.parameters()], spec["batch"] * spec["seq_len"],
                                           step.cfg.padded_vocab_size, amp)
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            row["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        rows.append(row)
    return {**spec, "isa": host_isa(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/OpenMP threads (default: all)")
    ap.add_argument("--tiny-batch", type=int, default=4)
    ap.add_argument("--small-batch", type=int, default=1)
    ap.add_argument("--s-batch", type=int, default=8, help="micro-batch of config S (issue 15: 8)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default: 5 tiny, 2 small)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 instead of the trainer's bf16 autocast")
    ap.add_argument("--no-stall", action="store_true", help="skip the checkpoint-stall measurement")
    ap.add_argument("--repeat", type=int, default=1, help="measure each configuration this many times")
    ap.add_argument("--stall-reps", type=int, default=None, help="saves per mode (default: 3 tiny, 1 small)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the stall benchmark writes checkpoints")
    ap.add_argument("--floor", action="store_true",
                    help="the step against its GEMM floor (fp32, + bf16 where native), instead of the sweep")
    ap.add_argument("--profile", action="store_true", help="with --floor: torch.profiler's top ops per precision")
    ap.add_argument("--precision", choices=("fp32", "bf16"),
                    help="with --floor: time this precision only (default: fp32, and bf16 where native); bf16 alone "
                         "takes about a quarter of the time, for more --ref rounds")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="with --floor: micro-batches per optimizer step; > 1 adds bf16 with --bf16-weight-cache")
    ap.add_argument("--ref", help="with --floor: also time the checkout at REF (e.g. the parent commit), alternating "
                                  "processes with this one, and print both and a summary")
    ap.add_argument("--rounds", type=int, default=1, help="with --ref: alternating rounds (default 1)")
    ap.add_argument("--isa", choices=sorted(ISA_CAPS),
                    help="run every child as a host with only this ISA would (torch, oneDNN and MKL capped), e.g. "
                         "avx2: its native precision is fp32")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        try:  # the trainer's host memory settings (and its CPU device setup's), where the checkout timed has them
            from pretrain.train import host_alloc
        except ImportError:
            host_alloc = None
        for setting in ("configure_host_memory", "keep_large_blocks"):  # see bench/children.py run_child
            getattr(host_alloc, setting, lambda: None)()
        kind, spec = args.child[0], json.loads(args.child[1])
        child = {"throughput": child_throughput, "stall": child_stall, "floor": child_floor}[kind]
        print(json.dumps(child(spec)), flush=True)
        return 0
    # Here, not at the top: a --ref child runs with the other checkout first on sys.path, which may not have them.
    from bench.children import run_child
    from bench.train_step_report import print_floor, print_floor_summary, print_stall, print_throughput


    presets = args.presets.split(",")
    if args.precision and not args.floor:
        print("--precision chooses what --floor times; the throughput sweep runs bf16 autocast, or fp32 with --no-amp",
              file=sys.stderr)
        return 2
    if args.floor and args.precision == "bf16" and not (native_bf16() and args.isa in (None, "avx512_bf16")):
        print("--precision bf16: this host (or --isa) has no native bf16, which --floor times; use --precision fp32",
              file=sys.stderr)
        return 2
    if args.floor:
        for preset in presets:
            batch = args.s_batch if preset in CONFIGS else args.small_batch if preset != "tiny" else args.tiny_batch
            spec = {"preset": preset, "batch": batch, "seq_len": args.seq_len, "iters": args.iters or 3, "warmup": 1,
                    "profile": args.profile, "grad_accum": args.grad_accum, "precision": args.precision}
            if not args.ref:
                print_floor(run_child("floor", spec, args.threads, __file__, isa=args.isa))
                continue
            by_code: dict[str, list[dict[str, Any]]] = {"ref": [], "this": []}
            for _ in range(args.rounds):  # alternating processes: load from other processes shifts both alike
                for code in by_code:
                    res = run_child("floor", spec, args.threads, __file__, args.ref if code == "ref" else None,
                                    isa=args.isa)
                    print(f"[{code}: {args.ref if code == 'ref' else 'this checkout'}]")
                    print_floor(res)
                    by_code[code].append(res)
            print_floor_summary(by_code)
        return 0
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"{'fp32' if args.no_amp else 'bf16 autocast'}, load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    for preset in presets:
        small = preset != "tiny"
        batch = args.s_batch if preset in CONFIGS else args.small_batch if small else args.tiny_batch
        base = {"preset": preset, "batch": batch, "seq_len": args.seq_len,
                "amp": not args.no_amp, "iters": args.iters or (2 if small else 5)}
        only_plain = preset in CONFIGS  # config S is defined without checkpointing or compile
        for compile_ in (False,) if only_plain else (False, True):
            for gc in (False,) if only_plain else (False, True):
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    spec = {**base, "gc": gc, "compile": compile_, "warmup": 1}
                    rows.append(run_child("throughput", spec, args.threads, __file__, isa=args.isa))
                    print(f"  measured {preset} ckpt={gc} compile={compile_} in {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr, flush=True)
    print()
    print_throughput(rows)
    if not args.no_stall:
        stalls = []
        for preset in presets:
            small = preset != "tiny"
            spec = {"preset": preset, "batch": args.small_batch if small else args.tiny_batch,
                    "seq_len": args.seq_len, "amp": not args.no_amp, "iters": 1 if small else 3,
                    "reps": args.stall_reps or (1 if small else 3), "dir": args.dir}
            stalls.append(run_child("stall", spec, args.threads, __file__, isa=args.isa))
        print(f"\ncheckpoint stall (model + AdamW state, written under {args.dir}):")
        print_stall(stalls)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
