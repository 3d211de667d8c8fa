"""MKL's optimized paths on AMD CPUs (pretrain/train/host_blas.py): the trainer's entry answers MKL's vendor check
before torch loads, so MKL takes the code branch an Intel CPU of this ISA gets, multiplies correctly there and the
run's host record says so; PRETRAIN_MKL_ON_AMD=0 keeps MKL's own branch; a child that imports torch at once (the
launcher's probe, a bench's step) gets the same branch preloaded. On an Intel CPU nothing changes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from pretrain.train.host_blas import ENV, amd_x86_linux, with_mkl_on_amd

# MKL's code branch (its CPU dispatch: 0 generic, higher for SSE4.2 / AVX2 / AVX-512 paths), read from the MKL that
# torch links, and an fp32 matmul's error against float64.
BRANCH = """
import ctypes, json, os
import torch
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
detect = getattr(lib, "mkl_serv_cpu_detect", None)
torch.manual_seed(0)
a, b = torch.randn(257, 384), torch.randn(384, 129)
err = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
out = {"branch": detect() if detect else None, "err": err}
"""
# The same through the trainer's entry, its loop replaced, with what the run's meta records of the host.
ENTRY = """
import json, sys, types

def main(argv):
    import torch
    from pretrain.train.device import setup_device
""" + "".join(f"    {line}\n" for line in BRANCH.strip().splitlines()) + """
    out["mkl_on_amd"] = setup_device(torch.device("cpu"))["mkl_on_amd"]
    print(json.dumps(out))
    return 0

sys.modules["pretrain.train.loop"] = types.SimpleNamespace(main=main)
from pretrain.train.entry import main as entry
sys.exit(entry([]))
"""
# The planners that time this CPU's matmuls in their own process (pretrain/plan/tiers.py cpu_matmul_flops): the
# launcher's entry and the demo, each with its planning replaced by BRANCH.
PLANNERS = {
    "launcher": """
import json, sys, types

def main(argv):
""" + "".join(f"    {line}\n" for line in BRANCH.strip().splitlines()) + """
    print(json.dumps(out))
    return 0

sys.modules["pretrain.plan.launch"] = types.SimpleNamespace(main=main)
from pretrain.plan.entry import main as entry
sys.exit(entry(["--vram", "cpu"]))
""",
    "demo": """
import json, sys
from pretrain import demo

def plan(argv):
""" + "".join(f"    {line}\n" for line in BRANCH.strip().splitlines()) + """
    print(json.dumps(out))
    sys.exit(0)

assert "torch" not in sys.modules  # importing the demo leaves the host settings to its main
demo._run_with_launcher = plan
demo.main(["--steps", "1"])
""",
}
APPLIES = amd_x86_linux() and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


def _run(code: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_trainer_takes_mkls_optimized_branch_on_amd_and_a_child_gets_it_preloaded():
    # A fresh process (this session preloads the library into every process it starts: tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ENV)}
    on, off = _run(ENTRY, env), _run(ENTRY, {**env, ENV: "0"})
    child = _run(BRANCH + "print(json.dumps(out))", with_mkl_on_amd(env))
    assert on["mkl_on_amd"] is APPLIES and off["mkl_on_amd"] is False
    assert max(on["err"], off["err"], child["err"]) < 1e-3  # fp32 sums of 384 products of N(0, 1) values
    if on["branch"] is None:
        pytest.skip("torch here is not linked with MKL")
    if APPLIES:
        assert on["branch"] > off["branch"] and child["branch"] == on["branch"], (on, off, child)
    else:
        assert on["branch"] == off["branch"] == child["branch"], (on, off, child)


@pytest.mark.parametrize("planner", PLANNERS)
def test_the_planners_time_the_cpu_on_the_branch_the_trainer_takes(planner):
    """The launcher and `make demo` plan in their own process, timing this CPU's matmuls for the plan's time
    estimate: MKL's branch there is the trainer's (on AMD, not its generic one: a ~30 % lower rate)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ENV)}
    on, off, trainer = _run(PLANNERS[planner], env), _run(PLANNERS[planner], {**env, ENV: "0"}), _run(ENTRY, env)
    if on["branch"] is None:
        pytest.skip("torch here is not linked with MKL")
    assert on["branch"] == trainer["branch"]
    assert (on["branch"] > off["branch"]) is APPLIES, (on, off)


def test_a_child_environment_preloads_the_library_once_and_keeps_the_users():
    env = {"LD_PRELOAD": "/usr/lib/mine.so"}
    got = with_mkl_on_amd(env)
    assert got["LD_PRELOAD"].split()[0] == "/usr/lib/mine.so"
    assert len(got["LD_PRELOAD"].split()) == 1 + APPLIES
    assert with_mkl_on_amd(got) == got and with_mkl_on_amd({**env, ENV: "0"}) == {**env, ENV: "0"}
    from bench.children import child_env

    assert len(child_env(1, "/tmp/x").get("LD_PRELOAD", "").split()) >= APPLIES


def test_the_bench_times_mkl_on_its_own_branch_and_answered(capsys):
    from bench import blas_branch

    assert blas_branch.main(["--threads", "1", "--reps", "1"]) == 0
    head, _, *rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(blas_branch.SHAPES) and all(len(r.split()) == 8 for r in rows)
    found = re.search(r"MKL's branch (\w+) on its own, (\w+) with the vendor check answered", head)
    assert found, head
    own, answered = (None if x == "None" else int(x) for x in found.groups())
    assert (own is None and answered is None) or (answered > own) is APPLIES, head
