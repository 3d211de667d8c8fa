"""torchrun on CPU (gloo, 2 ranks): DDP and FSDP2 reproduce the single-process run with the same global batch,
checkpoints move between 2 ranks and 1 process, only rank 0 writes, SIGTERM on one rank saves once, exit 0.

Tolerance: all runs here are fp32 (--no-amp), so 2 ranks x batch B and 1 process x batch 2B compute the same
sums in a different order (per-rank means averaged by the all-reduce / reduce-scatter, matmuls of another
shape). Measured differences are <= 1e-6 in the loss over these few steps; LOSS_TOL = 1e-4 leaves room for
other CPUs' kernels while still failing on any real divergence (a wrong batch split or missing gradient
average changes the loss by 1e-2 or more).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pretrain.errors import UserError
from pretrain.track.runlog import read_jsonl
from pretrain.train import distributed as dist_lib
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import TrainConfig, parse_config
from pretrain.train.loop import train

LOSS_TOL = 1e-4
B = 2  # micro-batch per rank; the single-process reference uses 2 * B
# Constant LR after warmup: a resumed run may then use another --steps without changing the schedule.
COMMON = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
          "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "1", "--warmup-steps",
          "2", "--lr", "3e-3", "--lr-schedule", "constant", "--device", "cpu", "--live", "off", "--save-minutes",
          "0", "--no-amp", "--eval-every", "3", "--save-every", "3"]
ABORT_SIGNS = ("Traceback", "terminate called", "Aborted", "SIGABRT", "Connection closed by peer")


def torchrun(data: Path, out: Path, *flags: str, script: Path = ROOT / "train_v29.py",
             exec_ranks: bool = False) -> subprocess.Popen:
    """Start a 2-rank run; its output goes to <out>.log (a pipe nobody reads while we poll could fill up).
    exec_ranks: the ranks are exec'd, not forked by tests/zygote.py, so /proc shows each one's environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), "--data", str(data), "--out-dir", str(out), *COMMON, *flags]
    log = open(f"{out}.log", "w")  # noqa: SIM115 - the child holds it; closed with the process
    env = os.environ | {"PRETRAIN_TEST_EXEC": "1"} if exec_ranks else None
    # Own session: a failing test can kill torchrun and its workers together.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for a torchrun (killing it and its workers after `timeout`); assert exit 0 and no gloo abort."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, text[-3000:]
    assert not any(s in text for s in ABORT_SIGNS), text[-3000:]
    return text


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["last_loss"] for e in read_jsonl(run / "train.jsonl") if e["type"] == "train"}


def evals(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(run / "train.jsonl") if e["type"] == "eval"}


def assert_close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) < LOSS_TOL, (step, a[step], b[step])


@pytest.fixture(scope="module")
def runs(byte_data, tmp_path_factory) -> dict[str, Path]:
    """One single-process reference (batch 2B) and 2-rank DDP and FSDP2 runs (batch B), 6 steps each."""
    root = tmp_path_factory.mktemp("dist")
    outputs = {}
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):  # one at a time: CI has 2 cores, one per rank
        outputs[name] = finish(torchrun(byte_data, root / name, "--batch-size", str(B), "--steps", "6", *flags))
    train(parse_config(["--data", str(byte_data), "--out-dir", str(root / "single"), *COMMON,
                        "--batch-size", str(2 * B), "--steps", "6"]))
    return {"root": root, **{n: root / n for n in ("ddp", "fsdp", "single")}, "outputs": outputs}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_single_process_and_only_rank0_writes(runs, mode):
    run = runs[mode]
    assert_close(losses(run), losses(runs["single"]), range(1, 7))
    assert_close(evals(run), evals(runs["single"]), (0, 3, 6))  # val batches are split across ranks too
    events = read_jsonl(run / "train.jsonl")
    # A second writer would duplicate lines (or interleave a second meta / end).
    assert [e["step"] for e in events if e["type"] == "train"] == list(range(1, 7))
    assert sum(e["type"] == "meta" for e in events) == 1 and sum(e["type"] == "end" for e in events) == 1
    assert events[0]["world_size"] == 2
    assert runs["outputs"][mode].count("eval step 6") == 1
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt", "step_3.pt", "step_6.pt"]
    state = load_checkpoint(run / "last.pt")
    assert state["world_size"] == 2 and not any("_orig_mod" in k or "module." in k for k in state["model"])
    # The tied embedding is stored once (FSDP's full gather gives each name its own copy).
    assert state["model"]["lm_head.weight"].data_ptr() == state["model"]["wte.weight"].data_ptr()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_in_one_process(runs, mode, byte_data, tmp_path):
    """Steps 4-6 of a 1-process run resumed from the 2-rank step-3 checkpoint equal the 2-rank run's own."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(runs[mode] / "step_3.pt", resumed / "last.pt")
    shutil.copy(runs[mode] / "train.jsonl", resumed / "train.jsonl")
    result = train(parse_config(["--data", str(byte_data), "--out-dir", str(resumed), *COMMON,
                                 "--batch-size", str(2 * B), "--steps", "6"]))
    assert result["status"] == "completed" and result["step"] == 6
    assert_close(losses(resumed), losses(runs[mode]), range(4, 7))
    assert [e["step"] for e in read_jsonl(resumed / "train.jsonl") if e["type"] == "train"] == list(range(1, 7))


def _worker_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of `rank` among torchrun's workers (read from /proc: each worker's RANK variable)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_one_process_checkpoint_resumes_at_two_ranks_and_sigterm_on_one_rank_saves_once(runs, byte_data,
                                                                                        tmp_path):
    """The single-process step-3 checkpoint continues at 2 ranks with the single run's losses; then SIGTERM
    to rank 1 alone stops both ranks after the same step, with one checkpoint written, and exit code 0."""
    out = tmp_path / "r"
    out.mkdir()
    shutil.copy(runs["single"] / "step_3.pt", out / "last.pt")
    proc = torchrun(byte_data, out, "--batch-size", str(B), "--steps", "100000", "--save-every", "0",
                    "--eval-every", "0", exec_ranks=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and max(losses(out), default=0) < 6:
        time.sleep(0.1)
    pid = _worker_pid(proc.pid, rank=1) if proc.poll() is None else None
    if pid is None:
        pytest.fail("torchrun ended or never reached step 6:\n" + finish(proc, timeout=0))
    os.kill(pid, signal.SIGTERM)
    finish(proc, timeout=120)

    assert_close(losses(out), losses(runs["single"]), range(4, 7))
    events = read_jsonl(out / "train.jsonl")
    assert events[-1]["type"] == "end" and "signal" in events[-1]["status"]
    last_step = max(losses(out))
    saves = [e for e in events if e["type"] == "checkpoint" and e["step"] > 3]
    assert [e["step"] for e in saves] == [last_step]  # one coordinated save, of the last full step
    assert load_checkpoint(out / "last.pt")["step"] == last_step


def test_global_batch_must_match_on_resume():
    state = {"train_config": TrainConfig(batch_size=2).to_dict(), "world_size": 2}
    one = dist_lib.Dist()
    ok = dist_lib.saved_config_for(state, TrainConfig(batch_size=2, grad_accum=2), one, "last.pt")
    assert ok["batch_size"] == 2 and ok["grad_accum"] == 2
    with pytest.raises(UserError, match="global batch is 4 sequences"):
        dist_lib.saved_config_for(state, TrainConfig(batch_size=2), one, "last.pt")


def test_single_process_fsdp_matches_plain(byte_data, tmp_path):
    """--fsdp in one process (a 1-rank group: the --cpu-offload path for a model larger than the GPU)."""
    flags = ["--data", str(byte_data), *COMMON, "--batch-size", "4", "--steps", "3", "--eval-every", "0"]
    train(parse_config([*flags, "--out-dir", str(tmp_path / "plain")]))
    train(parse_config([*flags, "--out-dir", str(tmp_path / "fsdp"), "--fsdp", "--cpu-offload"]))
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "plain"), range(1, 4))
    with pytest.raises(UserError, match="--cpu-offload needs --fsdp"):
        train(parse_config([*flags, "--out-dir", str(tmp_path / "x"), "--cpu-offload"]))


# train_v29.py, except that each rank's global generators are seeded differently after the trainer seeds
# them. On CPU all ranks share one kind of generator that advances in lockstep; on GPUs each rank has its
# own device generator, and restoring rank 0's saved state onto rank 1 (as resumes did) leaves the two
# different. This models that on CPU: whatever the global generators hold, replicas must round alike.
SKEWED_TRAINER = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import pretrain.train.session as session
from pretrain.errors import run_cli
from pretrain.train.loop import main

seed_all = session.seed_everything
def skewed(seed):
    seed_all(seed)
    torch.manual_seed(seed + 1000 * int(os.environ["RANK"]))
session.seed_everything = skewed
sys.exit(run_cli(main))
"""


def test_bf16_param_replicas_stay_identical_across_a_resume(byte_data, tmp_path):
    """2-rank DDP with --param-dtype bf16 (stochastic rounding): a run resumed from its step-3 checkpoint ends
    bit-identical to the straight run, every save found the replicas identical, each rank's RNG is saved."""
    script = tmp_path / "skewed_train.py"
    script.write_text(SKEWED_TRAINER.format(root=str(ROOT)))
    flags = ["--batch-size", str(B), "--param-dtype", "bf16", "--eval-every", "0"]
    straight = tmp_path / "straight"
    finish(torchrun(byte_data, straight, *flags, "--steps", "6", script=script))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "step_3.pt", resumed / "last.pt")
    shutil.copy(straight / "train.jsonl", resumed / "train.jsonl")
    finish(torchrun(byte_data, resumed, *flags, "--steps", "6", script=script))

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert b["step"] == 6 and b["model"]["wte.weight"].dtype == torch.bfloat16
    for key in ("model", "optimizer"):
        for name, t in a[key].items() if key == "model" else a[key]["state"].items():
            other = b[key][name] if key == "model" else b[key]["state"][name]
            if key == "model":
                assert torch.equal(t, other), name
            else:
                assert all(torch.equal(v, other[k]) and v.dtype == other[k].dtype for k, v in t.items()), name
    # bf16 weights keep fp32 AdamW moments (and the rounding RNG: resumed bit-identical above).
    assert {t.dtype for st in b["optimizer"]["state"].values() for k, t in st.items() if k != "step"} == {torch.float32}
    saves = [e for e in read_jsonl(resumed / "train.jsonl") if e["type"] == "checkpoint"]
    assert saves and all(e["replicas_match"] for e in saves)
    ranks = a["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
