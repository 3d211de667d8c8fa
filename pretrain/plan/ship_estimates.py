"""`make plan-estimates`: regenerate pretrain/plan/shipped_estimates.json, the memory estimates shipped in the repo.

It plans every GPU tier (pretrain/plan/tiers.py) with every --variant, and the cpu tier's default, with the default
flags, each estimate traced on fake tensors (a cold cache, the shipped file off), and writes their key parts and results
(pretrain/plan/estimate_cache.py says how they are looked up and when they are not used). Beside them it records
the files an estimate executes: a fresh process traces one small estimate of each kind (every optimizer, dtype,
checkpointing policy, attention variant and pass) with a profiler on, and lists every file of pretrain/ a function
of which ran, and all of model/. Plans run in --jobs processes; the output is the same whatever the count, sorted
and deduplicated so a regeneration diffs cleanly. Run it after changing the model, the optimizers or the step
tracing (tests/test_shipped_estimates.py fails with a line naming this command when the file is stale).

    .venv/bin/python -m pretrain.plan.ship_estimates            # or: make plan-estimates
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pretrain.fsio import atomic_write_text
from pretrain.plan import estimate_cache

ROOT = estimate_cache.ROOT


def shipped_plans() -> list[tuple[str, str]]:
    """(tier, --variant) of every dry run whose estimates ship: each GPU tier with each variant, and the cpu tier's
    default plan. The cpu tier fits the machine's RAM, not a card, but its default micro-batch fits any machine with
    a few GiB, so its estimates are the same everywhere but for the host's bf16 (run_plans plans both); its other
    variants' (the tiny model: ~0.1 s each, after the tracker's import) are traced on first use."""
    from model import PAPER_PRESETS
    from model.variants import ATTENTION_VARIANTS
    from pretrain.plan.resolve import VARIANTS
    from pretrain.plan.tiers import TIERS

    gpu = [(t.name, v) for v in (*VARIANTS, *PAPER_PRESETS) for t in TIERS.values() if t.is_gpu]
    return [*gpu, ("cpu", next(iter(ATTENTION_VARIANTS)))]


def plan_argv(tier: str, variant: str, run_root: str) -> list[str]:
    """The launcher's command line of one shipped dry run (default flags; no --data: GPT-2's vocabulary)."""
    return ["--vram", tier, "--variant", variant, "--run-root", run_root]


def run_plans(specs: list[tuple[str, str]]) -> None:
    """Plan each (tier, variant) in this process: every estimate lands in $PRETRAIN_CACHE_DIR with its key parts.
    The cpu tier is planned as on each host class (pretrain/plan/resolve.py: fp32 where bf16 is emulated, autocast
    where it is native), so the file serves a user's first dry run on either, whichever host made it."""
    from pretrain.plan import resolve
    from pretrain.plan.launch import plan_from_argv

    host_bf16 = resolve.cpu_has_fast_bf16
    with tempfile.TemporaryDirectory() as runs:
        for tier, variant in specs:
            for native in (True, False) if tier == "cpu" else (host_bf16(),):
                resolve.cpu_has_fast_bf16 = lambda native=native: native  # type: ignore[assignment]
                try:
                    plan_from_argv(plan_argv(tier, variant, runs), gpu=None)
                finally:
                    resolve.cpu_has_fast_bf16 = host_bf16  # type: ignore[assignment]


def coverage_estimates() -> list[tuple[Any, Any, int, Any]]:
    """(model, settings, seq_len, pass) of one small estimate of each kind: the code paths a plan's estimate can take
    (each attention variant, optimizer with fp32 and bf16 weights, autocast dtype, checkpointing policy, the weight
    cache, accumulation) and each pass the trainer runs beside its steps."""
    from dataclasses import fields

    from model import ModelConfig
    from model.variants import ATTENTION_VARIANTS
    from pretrain.plan import instrument_memory as im
    from pretrain.train.config import TrainConfig
    from pretrain.train.optim_registry import OPTIMIZERS

    def tiny(attn: str = "baseline") -> ModelConfig:
        return ModelConfig.from_preset("tiny", vocab_size=256, d_model=128, n_head=4, n_layer=3, d_ff=256,
                                       block_size=32, attn=attn)

    policies = next(f for f in fields(TrainConfig) if f.name == "checkpoint_policy").metadata["choices"]
    settings: list[dict[str, Any]] = [{"amp_dtype": "fp16"}, {"amp": False}, {"opt_fused": False},
                                      {"grad_accum": 2, "bf16_weight_cache": True}]
    settings += [{"optimizer": o, "param_dtype": d} for o in OPTIMIZERS for d in ("fp32", "bf16")]
    settings += [{"grad_checkpoint": True, "checkpoint_policy": p} for p in policies]
    out: list[tuple[Any, Any, int, Any]] = [(tiny(a), TrainConfig(batch_size=1), 16, None) for a in ATTENTION_VARIANTS]
    out += [(tiny(), TrainConfig(batch_size=1, **s), 16, None) for s in settings]
    passes = [im.EvalPass(1, 16), im.LengthsPass(((8, 2), (16, 1))), im.DiagnosticsPass(1, 16), im.SamplesPass(0.8),
              im.DownstreamPass()]
    out += [(tiny("decoupled"), TrainConfig(), 0, w) for w in passes]
    return out


def executed_files() -> list[str]:
    """The repo files an estimate executes (run in a fresh process, the shipped file off): all of model/, and each
    file of pretrain/ a function of which runs while coverage_estimates() are traced."""
    from pretrain.plan import memory

    ran: set[str] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:  # a global trace function: only "call" events
        ran.add(frame.f_code.co_filename)

    real = memory._trace

    def traced(*args: Any, **kwargs: Any) -> Any:
        sys.settrace(profile)
        try:
            return real(*args, **kwargs)
        finally:
            sys.settrace(None)

    memory._trace = traced  # type: ignore[assignment]
    try:
        for mcfg, cfg, seq_len, work in coverage_estimates():
            if work is None:
                memory.estimate_step_memory(mcfg, cfg, seq_len)
            else:
                memory.estimate_pass_memory(mcfg, cfg, work)
    finally:
        memory._trace = real  # type: ignore[assignment]
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "model").rglob("*.py")}
    for name in ran:
        path = Path(name).resolve()
        if path.is_relative_to(ROOT / "pretrain") and path.suffix == ".py":
            files.add(str(path.relative_to(ROOT)))
    return sorted(files)


def file_imports(name: str) -> set[str]:
    """The repo files (relative paths) that the file `name` imports anywhere in it, module level or inside functions,
    itself aside; not under `if TYPE_CHECKING:` (never run). tests/test_architecture_doc.py finds import cycles
    with it."""
    import ast

    package = ".".join(Path(name).parts[:-1])  # what a relative import is relative to
    tree = ast.parse((ROOT / name).read_text())
    typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                   for s in b.body for n in ast.walk(s)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            for candidate in (f"{target.replace('.', '/')}.py", f"{target.replace('.', '/')}/__init__.py"):
                if (ROOT / candidate).is_file():
                    out.add(candidate)
    return out - {name}


def imported_files(files: list[str]) -> list[str]:
    """The repo files that `files` import (file_imports), themselves aside: tests/test_shipped_estimates.py checks
    this set has not grown since the file was made."""
    return sorted(set().union(*map(file_imports, files)) - set(files))


def _records(cache: Path) -> dict[estimate_cache.Parts, dict[str, Any]]:
    """Every estimate a run left in the disk cache `cache`, by key parts."""
    out = {}
    for f in sorted((cache / "plan-memory").glob("*.json")):
        body = json.loads(f.read_text())
        out[tuple(body["parts"])] = body["estimate"] | {"seconds": 0.0}  # how long it took: not a result
    return out


ABOUT = "memory estimates shipped with the repo (pretrain/plan/estimate_cache.py); regenerate: make plan-estimates"


def shipped_text(records: dict[estimate_cache.Parts, dict[str, Any]], files: list[str], about: str = ABOUT) -> str:
    """The shipped file: environment, executed files with their hashes, the base settings and the models once, then
    one line per estimate [model id, settings changed from the base, seq_len, pass, packages, estimate]."""
    from pretrain.plan.step_trace import _relevant
    from pretrain.train.config import TrainConfig

    base = json.loads(_relevant(TrainConfig()))
    models: dict[str, Any] = {}
    pairs = []
    for parts, est in records.items():
        model_json, cfg_json, seq_len, work, packages = parts
        model_id = hashlib.sha256(model_json.encode()).hexdigest()[:10]
        models[model_id] = json.loads(model_json)
        cfg = json.loads(cfg_json)
        if set(cfg) != set(base):
            raise ValueError("an estimate's settings have other fields than TrainConfig's")
        pairs.append(([model_id, {k: v for k, v in cfg.items() if v != base[k]}, int(seq_len), work,
                       json.loads(packages), est], parts))
    pairs.sort(key=lambda pair: json.dumps(pair[0][:5], sort_keys=True))
    entries = [entry for entry, _ in pairs]
    head = {"about": about, "environment": estimate_cache.environment()}
    body = {**head, "files": estimate_cache.file_hashes(tuple(files)), "imports": imported_files(files),
            "settings": base, "models": models, "estimates": entries}
    for entry, parts in pairs:  # exact: each entry rebuilds the key parts it was traced under
        if estimate_cache.entry_parts(body, entry) != parts:
            raise ValueError(f"a shipped entry does not rebuild its key parts: {entry[:5]}")

    def dump(x: Any) -> str:
        return json.dumps(x, sort_keys=True, separators=(",", ":"))

    lines = [f"{dump(k)}:{dump(v)}" for k, v in head.items()]
    lines.append('"files":{\n' + ",\n".join(f"{dump(k)}:{dump(v)}" for k, v in body["files"].items()) + "}")
    lines.append(f'"imports":{dump(body["imports"])}')
    lines.append(f'"settings":{dump(base)}')
    lines.append('"models":{\n' + ",\n".join(f"{dump(k)}:{dump(models[k])}" for k in sorted(models)) + "}")
    # An estimate keeps its keys' order (the breakdown's shows in the plan); the rest is sorted already.
    lines.append('"estimates":[\n' + ",\n".join(json.dumps(e, separators=(",", ":")) for e in entries) + "]")
    return "{" + ",\n".join(lines) + "}\n"


def _child(args: list[str], cache: Path) -> subprocess.Popen:
    env = os.environ | {estimate_cache.CACHE_ENV: str(cache), estimate_cache.SHIPPED_ENV: "off"}
    return subprocess.Popen([sys.executable, "-m", "pretrain.plan.ship_estimates", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(estimate_cache.SHIPPED), help="where to write (default: the shipped file)")
    p.add_argument("--jobs", type=int, default=2, help="planning processes (default 2)")
    p.add_argument("--plans", nargs="*", help=argparse.SUPPRESS)  # a child: plan these tier:variant pairs
    p.add_argument("--files", action="store_true", help=argparse.SUPPRESS)  # a child: print executed_files()
    args = p.parse_args(argv)
    if args.files:
        print(json.dumps(executed_files()))
        return 0
    if args.plans is not None:
        run_plans([tuple(s.split(":", 1)) for s in args.plans])  # type: ignore[misc]
        return 0
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    specs = shipped_plans()
    variants = list(dict.fromkeys(v for _, v in specs))
    groups = [[f"{t}:{v}" for t, v in specs if v in variants[i::args.jobs]] for i in range(args.jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        caches = [Path(tmp) / f"plans{i}" for i in range(len(groups))]
        children = [_child(["--files"], Path(tmp) / "files")]
        children += [_child(["--plans", *g], c) for g, c in zip(groups, caches) if g]
        outs = [c.communicate()[0] for c in children]
        if any(c.returncode for c in children):
            print("a planning process failed (its error is above)", file=sys.stderr)
            return 1
        files = json.loads(outs[0])
        records: dict[estimate_cache.Parts, dict[str, Any]] = {}
        for c in caches:
            records |= _records(c)
    atomic_write_text(Path(args.out), shipped_text(records, files))  # a dry run meanwhile reads old or new
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"{args.out}: {len(records)} estimates of {len(specs)} dry runs, {len(files)} files; "
          f"{time.perf_counter() - t0:.0f} s wall, {cpu:.0f} s CPU in {args.jobs} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
