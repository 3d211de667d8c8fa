"""run_1b_launch.py: VRAM tier + token budget in, a plan that fits and the exact trainer command out.

A dry run (the default) prints the plan and writes nothing. `--run` runs the trainer in the foreground as a
child process, passes SIGTERM / SIGINT / SIGUSR1 (and SIGHUP, as SIGTERM) on to it so it saves before exiting,
and exits with its exit code. Re-running the same command finds the same run directory and resumes it.

How the run directory is chosen (fresh, resume, --extend, --if-exists): pretrain/plan/run_dir_choice.py.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from pretrain.config_file import parse_with_file
from pretrain.data.dataset import open_dataset
from pretrain.errors import UserError
from pretrain.plan.cpu_rate import keep_rates, load_now, run_rates
from pretrain.plan.fit import with_micro
from pretrain.plan.flags import OWN_FIELDS, SUBCOMMANDS, build_parser
from pretrain.plan.plan import Plan, build_plan
from pretrain.plan.resolve import Origin, Request, Source, derived, resolve
from pretrain.plan.run_dir_choice import PROBE_FILE, resolve_run_dir, run_name
from pretrain.plan.tiers import GpuInfo, card_named, detect_gpu, select_tier
from pretrain.plan.view import render_plan
from pretrain.runstatus import COMPLETED, RunStatus
from pretrain.train.config import TrainConfig, format_command
from pretrain.train.mirror_store import mirror_problem

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "train_v29.py"
def inspect_data(path: str | None, val_frac: float, fmt: str, running: bool,
                 vocab_size: int | None = None) -> tuple[Any, str | None]:
    """(dataset or None, why it is missing). Missing data is fine for a dry run and an error with --run."""
    if not path:
        if running:
            raise UserError("--run needs --data (a dataset made by prepare_fineweb.py)")
        return None, "no --data: planned with the default GPT-2 vocabulary; data passes unknown"
    layout = "glob" if any(c in path for c in "*?[") else "manifest" if Path(path).is_dir() else "npy"
    if fmt != "auto" and Path(path).exists() and fmt != layout:
        raise UserError(f"--data {path} is a {layout} dataset but --data-format {fmt} was given; fix either")
    try:
        ds = open_dataset(path, val_frac, require_val=running, vocab_size=vocab_size)
    except UserError as e:
        if running:
            raise
        return None, f"{e} (planned without data)"
    return ds, None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:])
    ns, plan = plan_from_argv(args)
    if ns.seeds != 1:
        return _seeds_main(args, ns)
    if ns.json:
        import json

        print(json.dumps(plan.to_json(), indent=2, default=str))
    else:
        render_plan(plan, running=ns.run)
    if not ns.run:
        return 0
    if plan.run["action"] in ("skip", "complete"):
        print(plan.run["note"], file=sys.stderr)
        return 0
    too_big = [p for p in plan.phases if not p.fits]
    if too_big and not ns.force:
        p = max(too_big, key=lambda p: p.peak_memory_bytes)
        what = "" if p.peak_of == "training step" else f" ({p.peak_of})"
        raise UserError(f"the plan does not fit: seq {p.seq_len}{what} is estimated at "
                        f"{p.peak_memory_bytes / 1024**3:.1f} "
                        f"of {plan.memory_capacity_bytes / 1024**3:.1f} GiB; apply the fix it shows "
                        f"({plan.suggestion}), or add --force to run it anyway")
    if plan.probes:
        record_probe(plan)
    return run_and_keep_rate(plan)


def run_and_keep_rate(plan: Plan) -> int:
    """Run the plan's trainer; on CPU keep the tok/s it measured per phase (pretrain/plan/cpu_rate.py), so a later
    dry run of these settings on this host shows the real rate instead of an estimate."""
    load = load_now()  # before the trainer's own threads count in it
    code = run_trainer(plan.command)
    if plan.cfg.device == "cpu":
        from pretrain.track.runlog import read_jsonl

        events = read_jsonl(Path(plan.run["dir"]) / "train.jsonl")  # [] when the trainer wrote none
        per_proc = plan.cfg.batch_size * plan.cfg.grad_accum
        tok_s = run_rates(events, [(p.start_step, p.end_step, p.seq_len) for p in plan.phases])
        keep_rates(plan.resolved.mcfg, [(with_micro(plan.cfg, p.micro_batch, per_proc), p.seq_len, t)
                                        for p, t in zip(plan.phases, tok_s) if t is not None], load,
                   by=f"the trainer (--run {plan.run['dir']})")
    return code


def record_probe(plan: Plan) -> None:
    """Keep what --probe measured in the run dir (probe.json; a later probe of the same run replaces it)."""
    import json

    d = Path(plan.run["dir"])
    d.mkdir(parents=True, exist_ok=True)
    body = {"phases": plan.to_json()["phases"], "probe": [p.to_dict() for p in plan.probes],
            "memory_capacity_bytes": plan.memory_capacity_bytes, "command": plan.command}
    (d / PROBE_FILE).write_text(json.dumps(body, indent=2) + "\n")


def _seeds_main(args: list[str], ns: argparse.Namespace) -> int:
    """--seeds N: plan (and with --run, run one after another) N seeds of the config, one run dir each."""
    plans = [plan_from_argv(args, seed_offset=i)[1] for i in range(ns.seeds)]
    if ns.json:
        import json

        print(json.dumps([p.to_json() for p in plans], indent=2, default=str))
    else:
        render_plan(plans[0], running=ns.run)
        print(f"\n{ns.seeds} seeds of this config, one run dir each:")
        for p in plans:
            print(f"  {p.run['dir']} ({p.run['action']}): {format_command(p.command)}")
    if not ns.run:
        return 0
    for p in plans:
        if p.run["action"] in ("skip", "complete"):
            print(p.run["note"], file=sys.stderr)
            continue
        code = run_and_keep_rate(p)
        if code != 0:
            return code  # rerunning the same command resumes this seed and runs the rest
    return 0


def plan_from_argv(argv: Sequence[str], gpu: GpuInfo | None | str = "detect",
                   seed_offset: int = 0) -> tuple[argparse.Namespace, Plan]:
    """Parse launcher arguments and plan; `gpu` lets tests stand in for a GPU (None: no GPU).
    With --seeds N, seed_offset picks which of the N seeds to plan (seed + offset, run dir -s<seed>)."""
    ns = parse_with_file(build_parser(), list(argv))
    flags = {f.name: getattr(ns, f.name) for f in fields(TrainConfig) if getattr(ns, f.name) is not None}
    for name, instead in OWN_FIELDS.items():
        if name in flags:
            raise UserError(f"the launcher sets {name.replace('_', '-')} itself; use {instead}")
    if ns.seeds < 1:
        raise UserError(f"--seeds must be a positive number of runs, got {ns.seeds}")
    if ns.seeds > 1:
        flags["seed"] = flags.get("seed", TrainConfig.seed) + seed_offset  # run_name adds -s<seed>
    return ns, make_plan(ns, flags, gpu)


def make_plan(ns: argparse.Namespace, flags: dict[str, Any], gpu: GpuInfo | None | str = "detect") -> Plan:
    """The whole plan for parsed arguments. `gpu` lets tests stand in for a GPU."""
    if ns.gpu is not None and ns.run:
        raise UserError("--gpu plans for a card you name; drop it with --run (the launcher reads the card it runs on)")
    gpu_info = card_named(ns.gpu) if ns.gpu is not None else detect_gpu() if gpu == "detect" else gpu
    tier, tier_how = select_tier(ns.vram, gpu_info)  # type: ignore[arg-type]
    ds, data_note = inspect_data(flags.get("data"), flags.get("val_frac") or 0.0, ns.data_format, ns.run,
                                 flags.get("vocab_size"))
    req = Request(flags, ns.variant, ns.target_tokens, ns.tokens_per_param, ns.global_batch, ns.nproc,
                  ns.assume_mfu, ns.peak_tflops, ns.probe)
    vocab = ds.vocab_size if ds is not None else None
    res = resolve(req, tier, gpu_info, vocab)  # type: ignore[arg-type]
    if ds is not None:
        ds.check_vocab(res.mcfg.vocab_size)
    if flags.get("mirror") and (why := mirror_problem(flags["mirror"])):
        raise UserError(why)
    name = run_name(res.values, ns.variant, ns.tag, flags.get("n_kv_head"), seeded=ns.seeds > 1)
    rd = resolve_run_dir(Path(ns.run_root), name, ns.if_exists, res, ns.extend)
    if rd.adopted:
        kept = res.warnings
        res = resolve(req, tier, gpu_info, vocab, adopted=rd.adopted)  # type: ignore[arg-type]
        res.warnings[:0] = kept
        res.warnings.append("kept from the run being resumed: " +
                            ", ".join(f"{k}={v!r}" for k, v in rd.adopted.items()))
    res.values["out_dir"], res.sources["out_dir"] = str(rd.path), derived("--run-root / run name")
    if rd.overwrite:
        res.values["overwrite"], res.sources["overwrite"] = True, Source(Origin.OPTION, "--if-exists overwrite")
        res.values["resume"], res.sources["resume"] = "never", Source(Origin.OPTION, "--if-exists overwrite")
    if rd.action == "resume" and rd.end and RunStatus.parse(rd.end.get("status")) == COMPLETED \
            and rd.end.get("step", 0) >= res.values["steps"]:
        rd.action, rd.note = "complete", (f"{rd.path} already completed {rd.end['step']} steps; add --extend with "
                                          "a larger --steps or token budget to extend it, or use another --tag "
                                          "for a new run")
    if data_note:
        res.warnings.insert(0, data_note)
    data = None if ds is None else {"path": str(ds.path), "train_tokens": ds.train_tokens, "val_tokens":
                                    ds.val_tokens, "vocab_size": ds.vocab_size, "tokenizer": ds.tokenizer}
    run = {"name": rd.name, "dir": str(rd.path), "action": rd.action, "note": rd.note, "seed": res.values["seed"]}
    return build_plan(res, req, tier, tier_how, gpu_info, data, run)  # type: ignore[arg-type]


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def run_trainer(command: list[str]) -> int:
    """Run the planned command in the foreground; pass signals on; return its exit code."""
    argv = list(command)
    # The repo's script by absolute path (works from any directory); an installed package has no script, so the
    # trainer module of this interpreter's package runs instead. The printed command may name either, or the
    # pretrain-train console script (pretrain/invocation.py): all run this interpreter's trainer.
    trainer = [str(TRAINER)] if TRAINER.is_file() else ["-m", "pretrain.train"]
    if argv[0] == "torchrun":  # torchrun from this interpreter's environment
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
        if "train_v29.py" in argv:
            i = argv.index("train_v29.py")
            argv[i:i + 1] = trainer
    elif argv[0] == "pretrain-train":
        argv[:1] = [sys.executable, "-m", "pretrain.train"]
    elif argv[:3] == ["python", "-m", "pretrain.train"]:
        argv[:1] = [sys.executable]
    else:
        argv[:2] = [sys.executable, *trainer]
    print(f"running: {format_command(command)}", file=sys.stderr, flush=True)
    # Own process group: a terminal Ctrl-C reaches only this process, which passes it on exactly once
    # (a second SIGINT would interrupt the trainer's save). Handlers go in before the child starts, so a signal
    # arriving in between is held and passed on rather than killing the launcher and orphaning the trainer.
    child: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not child:
            pending.append(signum)
            return
        try:
            child[0].send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        child.append(subprocess.Popen(argv, process_group=0))
        for signum in pending:
            forward(signum, None)
        code = child[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code
