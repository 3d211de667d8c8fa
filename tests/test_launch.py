"""Launcher planning in-process: token plan vs brute force, tiers and flag precedence, the command round trip,
run-directory decisions, JSON, and bad input (one line, exit code 2)."""

from __future__ import annotations

import json
import random

import pytest

from pretrain.errors import UserError, run_cli
from pretrain.plan import launch
from pretrain.plan.tiers import GLOBAL_BATCH, TIERS, GpuInfo, select_tier, tier_for_memory
from pretrain.schedule import parse_seq_schedule, planned_tokens, seq_len_at, steps_for_tokens
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import config_differences, parse_config

GB = 10**9
SMALL = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64"]


def plan(*argv: str, gpu=None, tmp=None):
    root = ["--run-root", str(tmp)] if tmp is not None else []
    return launch.plan_from_argv([*argv, *root], gpu=gpu)[1]


def brute_tokens(points, steps, seqs) -> int:
    return sum(seq_len_at(points, s) * seqs for s in range(steps))


def test_planned_tokens_and_minimal_steps_match_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        starts = sorted(rng.sample(range(1, 60), rng.randint(0, 3)))
        spec = ",".join(f"{rng.choice([16, 32, 64])}@{s}" for s in [0, *starts])
        points = parse_seq_schedule(spec, 64, 64)
        seqs = rng.randint(1, 9)
        for steps in (1, rng.randint(1, 90)):
            assert planned_tokens(points, steps, seqs) == brute_tokens(points, steps, seqs)
        target = rng.randint(1, 90 * 64 * seqs)
        n = steps_for_tokens(points, target, seqs)
        assert brute_tokens(points, n, seqs) >= target > brute_tokens(points, n - 1, seqs)


def test_target_tokens_gives_the_fewest_steps_under_the_tier_schedule(tmp_path, untraced_plan_memory):
    p = plan("--vram", "24", "--target-tokens", "10B", "--size", "tiny", gpu=None, tmp=tmp_path)
    seqs = p.resolved.sequences_per_step
    assert seqs == GLOBAL_BATCH and len(p.phases) == 3  # 64@0,128@500,256@1500 for tiny's block 256
    assert p.planned_tokens == brute_tokens(p.resolved.points, p.steps, seqs) >= 10 * GB
    assert brute_tokens(p.resolved.points, p.steps - 1, seqs) < 10 * GB
    assert p.to_json()["planned_tokens"] == p.planned_tokens
    tpp = plan("--vram", "cpu", "--tokens-per-param", "2", gpu=None, tmp=tmp_path)
    target = 2 * tpp.resolved.mcfg.num_params()
    assert tpp.planned_tokens >= target > brute_tokens(tpp.resolved.points, tpp.steps - 1, 8)


@pytest.mark.parametrize("total,name", [(85.1 * GB, "80"), (51.0 * GB, "48"), (42.5 * GB, "40"),
                                        (25.4 * GB, "24"), (24.15 * GB, "24"), (15.84 * GB, "16")])
def test_auto_tier_is_the_nearest_at_or_below_the_cards_memory(total, name):
    assert tier_for_memory(int(total)) == name
    tier, how = select_tier("auto", GpuInfo("Some GPU", int(total), (8, 0)))
    assert tier.name == name and how.startswith("auto")


def test_auto_without_gpu_is_cpu_and_small_cards_are_refused():
    assert select_tier("auto", None)[0].name == "cpu"
    with pytest.raises(UserError, match="smallest tier"):
        tier_for_memory(8 * GB)
    with pytest.raises(UserError, match="unknown --vram"):
        select_tier("12", None)


def test_explicit_flags_beat_the_tier_and_sources_say_where_values_came_from(tmp_path, untraced_plan_memory):
    p = plan("--vram", "24", "--size", "tiny", "--batch-size", "2", "--no-compile", "--steps", "9", gpu=None,
             tmp=tmp_path)
    src, cfg = p.resolved.sources, p.cfg
    assert (cfg.batch_size, src["batch_size"]) == (2, "flag")
    assert (cfg.grad_accum, cfg.compile, src["compile"]) == (GLOBAL_BATCH // 2, False, "flag")
    assert src["grad_accum"].startswith("derived")
    # The tiny model fits without checkpointing: the planner turns it off (tests/test_plan_fit.py has the rules).
    assert not cfg.grad_checkpoint and src["grad_checkpoint"].startswith("derived: off")
    assert (cfg.param_dtype, src["param_dtype"]) == ("bf16", "tier 24")
    assert src["lr"].startswith("default") and src["size"] == "flag"
    q = plan("--vram", "24", "--size", "tiny", "--grad-accum", "3", "--param-dtype", "fp32", "--steps", "9",
             gpu=None, tmp=tmp_path)
    assert (q.cfg.grad_accum, q.cfg.batch_size, q.cfg.param_dtype) == (3, TIERS["24"].micro_batch, "fp32")
    assert q.resolved.sources["batch_size"] == "tier 24"


def test_gpu_tiers_keep_tokens_per_step_and_gpus_without_bf16_get_fp16(tmp_path, untraced_plan_memory):
    per_step = {name: plan("--vram", name, "--size", "tiny", "--steps", "10", gpu=None, tmp=tmp_path)
                .phases[-1].tokens_per_step for name in TIERS if name != "cpu"}
    assert len(set(per_step.values())) == 1, per_step
    t4 = GpuInfo("Tesla T4", int(15.84 * GB), (7, 5))
    p = plan("--size", "tiny", "--steps", "10", gpu=t4, tmp=tmp_path)
    assert p.tier.name == "16" and p.cfg.amp_dtype == "fp16" and p.cfg.param_dtype == "fp32"
    assert "no bf16" in p.resolved.sources["amp_dtype"] and "fp16" in p.resolved.sources["param_dtype"]
    assert p.memory_capacity_bytes == t4.total_bytes
    forced = plan("--size", "tiny", "--steps", "10", "--amp-dtype", "bf16", gpu=t4, tmp=tmp_path)
    assert forced.cfg.amp_dtype == "bf16" and forced.resolved.sources["amp_dtype"] == "flag"


@pytest.mark.parametrize("argv", [
    ["--vram", "cpu"],
    ["--vram", "cpu", "--variant", "gqa_kv2", "--null-attn", "--lr", "1e-3", "--seq-schedule", "64@0,128@3"],
    ["--vram", "24", "--size", "tiny", "--variant", "decoupled", "--tie-qk", "--target-tokens", "2M", "--wandb"],
    ["--vram", "80", "--size", "tiny", "--variant", "bottleneck", "--steps", "7", "--nproc", "2", "--optimizer",
     "lion"],
])
def test_printed_command_parses_back_to_the_planned_config(argv, tmp_path, untraced_plan_memory):
    p = plan(*argv, gpu=None, tmp=tmp_path)
    cmd = p.command
    args = cmd[2:] if cmd[0] == "python" else cmd[5:]
    assert cmd[args and cmd.index(args[0]) - 1] == "train_v29.py"
    assert parse_config(args) == p.cfg
    for flag in ("--lr", "--warmup-steps", "--min-lr", "--weight-decay", "--grad-clip", "--lr-schedule"):
        assert flag in args  # the LR schedule is always spelled out
    if "--nproc" in argv:
        assert cmd[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
        assert p.phases[-1].tokens_per_step == p.cfg.batch_size * p.cfg.grad_accum * 2 * p.phases[-1].seq_len


def test_json_has_the_contract_keys(tmp_path, capsys, untraced_plan_memory):
    assert launch.main(["--vram", "cpu", "--json", "--run-root", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params", "steps", "planned_tokens", "tokens_per_step", "phases", "command"):
        assert key in out
    assert out["tokens_per_step"] == out["phases"][-1]["tokens_per_step"]
    for ph in out["phases"]:
        assert {"start_step", "seq_len", "micro_batch", "grad_accum", "peak_memory_bytes", "fits"} <= ph.keys()
    assert parse_config(out["command"][2:]).steps == out["steps"]


def test_verdict_and_fix_when_the_model_does_not_fit(tmp_path):
    big = ["--vram", "16", "--size", "tiny", "--d-model", "2048", "--n-head", "16", "--d-ff", "8192", "--block-size",
           "1024", "--steps", "5", "--seq-schedule", "1024@0", "--param-dtype", "fp32", "--no-grad-checkpoint",
           "--optimizer", "adamw"]
    p = plan(*big, "--batch-size", "32", gpu=None, tmp=tmp_path)
    assert p.phases[-1].verdict == "won't fit" and not p.to_json()["phases"][-1]["fits"]
    assert p.phases[-1].peak_memory_bytes > p.memory_capacity_bytes
    assert p.suggestion and p.suggestion.startswith("--batch-size 16 --grad-accum 16")
    fixed = plan(*big, *p.suggestion.split(" (")[0].split(), gpu=None, tmp=tmp_path)
    assert fixed.phases[-1].verdict == "fits" and fixed.suggestion is None


def _fake_run(d, cfg, ckpt=True, end_step=None):
    d.mkdir(parents=True)
    lines = [{"type": "meta", "train_config": cfg.to_dict()}]
    if end_step is not None:
        lines.append({"type": "end", "status": "completed", "step": end_step})
    (d / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    if ckpt:
        (d / "last.pt").write_bytes(b"x")


def test_run_dir_resume_suffix_skip_error_overwrite_and_complete(tmp_path, byte_data, untraced_plan_memory):
    base = ["--vram", "cpu", "--steps", "20", *SMALL, "--data", str(byte_data), "--val-frac", "0.05"]
    first = plan(*base, gpu=None, tmp=tmp_path)
    d = tmp_path / "tiny-baseline"
    assert first.run["action"] == "fresh" and first.run["dir"] == str(d)
    _fake_run(d, first.cfg)
    again = plan(*base, gpu=None, tmp=tmp_path)
    assert again.run["action"] == "resume" and again.cfg.out_dir == str(d)
    assert plan(*base, "--steps", "40", "--extend", gpu=None, tmp=tmp_path).run["action"] == "resume"  # extend it
    longer = plan(*base, "--steps", "40", gpu=None, tmp=tmp_path)  # another budget is another run unless --extend
    assert longer.run["dir"] == str(tmp_path / "tiny-baseline-2") and longer.run["action"] == "fresh"
    other = plan(*base, "--lr", "1e-3", gpu=None, tmp=tmp_path)  # a different experiment: next name
    assert other.run["dir"] == str(tmp_path / "tiny-baseline-2") and other.run["action"] == "fresh"
    assert plan(*base, "--lr", "1e-3", "--if-exists", "skip", gpu=None, tmp=tmp_path).run["action"] == "skip"
    with pytest.raises(UserError, match="different run.*lr"):
        plan(*base, "--lr", "1e-3", "--if-exists", "error", gpu=None, tmp=tmp_path)
    over = plan(*base, "--lr", "1e-3", "--if-exists", "overwrite", gpu=None, tmp=tmp_path)
    assert (over.run["dir"], over.cfg.overwrite, over.cfg.resume) == (str(d), True, "never")

    stale = tmp_path / "s" / "tiny-baseline"
    _fake_run(stale, first.cfg, ckpt=False)  # stopped before its first checkpoint
    assert plan(*base, gpu=None, tmp=tmp_path / "s").run["dir"] == str(stale) + "-2"

    done = tmp_path / "c" / "tiny-baseline"
    _fake_run(done, first.cfg, end_step=20)
    assert plan(*base, gpu=None, tmp=tmp_path / "c").run["action"] == "complete"
    assert launch.main([*base, "--run-root", str(tmp_path / "c"), "--run"]) == 0  # nothing to do, no trainer


def test_resume_keeps_the_runs_tier_choices(tmp_path, untraced_plan_memory):
    """A run started with another micro-batch split (e.g. on another GPU) is continued with its own values."""
    base = ["--vram", "cpu", "--steps", "20", *SMALL]
    first = plan(*base, gpu=None, tmp=tmp_path)
    # ... and started by the trainer directly, which leaves lr / min_lr to its own defaults (None)
    changes = {"batch_size": 4, "grad_accum": 2, "lr": None, "min_lr": None}
    _fake_run(tmp_path / "tiny-baseline", first.cfg.__class__(**(first.cfg.to_dict() | changes)))
    p = plan(*base, gpu=None, tmp=tmp_path)
    assert p.run["action"] == "resume"
    assert (p.cfg.batch_size, p.cfg.grad_accum) == (4, 2)
    assert p.resolved.sources["batch_size"] == p.resolved.sources["grad_accum"] == "run"
    # lr / min_lr written out at the values the trainer resolves None to are the same run (issue 19.4): the
    # printed command resumes it, nothing to adopt.
    saved = first.cfg.to_dict() | changes
    assert config_differences(saved, p.cfg) == [] and p.cfg.lr is not None
    assert parse_config(p.command[2:]) == p.cfg
    assert read_jsonl(tmp_path / "tiny-baseline" / "train.jsonl")[0]["type"] == "meta"  # untouched


@pytest.mark.parametrize("argv,message", [
    (["--vram", "cpu", "--seq-schedule", "128@0,512@10"], "exceeds the model's block size"),
    (["--vram", "cpu", "--variant", "gqa", "--n-kv-head", "3"], "must divide n_head"),
    (["--vram", "cpu", "--variant", "bottleneck", "--attn-dim", "12"], "RoPE needs an even head dim"),
    (["--vram", "cpu", "--target-tokens", "lots"], "is not a number"),
    (["--vram", "cpu", "--target-tokens", "1B", "--steps", "5"], "give only one"),
    (["--vram", "cpu", "--run"], "--run needs --data"),
    (["--vram", "cpu", "--run", "--data", "no/such/data"], "does not exist"),
    (["--vram", "12"], "unknown --vram"),
    (["--vram", "cpu", "--out-dir", "x"], "use --run-root"),
    (["--vram", "cpu", "--tag", "a/b"], "--tag"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, capsys):
    assert run_cli(launch.main, [*argv, "--run-root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_run_trainer_uses_this_python_and_torchrun_module_and_returns_the_exit_code(monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, argv, process_group=None):
            seen["argv"], seen["group"] = argv, process_group

        def wait(self):
            return -15  # killed by SIGTERM -> 128 + 15, as a shell reports it

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", "train_v29.py", "--steps", "3"]
    assert launch.run_trainer(cmd) == 143
    assert seen["argv"] == [launch.sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", str(launch.TRAINER), "--steps", "3"]
    assert seen["group"] == 0  # own process group: the launcher alone receives a terminal Ctrl-C


@pytest.mark.parametrize("fast", [True, False])
def test_cpu_tier_autocasts_only_where_the_cpu_has_native_bf16(fast, monkeypatch, tmp_path, untraced_plan_memory):
    """Emulated bf16 (AVX2-only CPUs) is several times slower than fp32: the cpu tier trains in fp32 there,
    and says why; a flag still wins."""
    from pretrain.plan import resolve

    monkeypatch.setattr(resolve, "cpu_has_fast_bf16", lambda: fast)
    p = plan("--vram", "cpu", tmp=tmp_path)
    assert p.cfg.amp is fast
    assert ("no native bf16" in p.resolved.sources["amp"]) is not fast
    assert ("--no-amp" in " ".join(p.command)) is not fast
    assert plan("--vram", "cpu", "--amp", tmp=tmp_path).cfg.amp is True


@pytest.mark.parametrize("hardware,cap,native", [(False, None, False), (True, "AVX512_CORE", False),
                                                 (True, "avx512_core_bf16", True), (True, None, True)])
def test_bf16_is_native_only_with_a_bf16_dot_product_oneDNN_may_use(hardware, cap, native, monkeypatch, tmp_path,
                                                                     untraced_plan_memory):
    """oneDNN calls bf16 supported on every AVX-512 CPU, where it only converts to fp32 per GEMM (Skylake to Ice
    Lake servers; ~4.5x slower than fp32 on an AMX host capped to AVX512_CORE): the cpu tier trains in fp32 there,
    and where ONEDNN_MAX_CPU_ISA caps oneDNN below its bf16 dot product (an emulated host, bench --isa)."""
    import torch

    from model import cpu_attention

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for feature in ("avx512_bf16", "amx_tile"):
        monkeypatch.setattr(torch.cpu, f"_is_{feature}_supported", lambda: hardware)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu_attention.native_bf16.cache_clear()
    try:
        p = plan("--vram", "cpu", tmp=tmp_path)
    finally:
        cpu_attention.native_bf16.cache_clear()  # the next caller asks the real host
    assert p.cfg.amp is native
    assert ("no native bf16" in p.resolved.sources["amp"]) is not native
