"""Host memory settings (pretrain/train/host_alloc.py): a trainer process reuses freed CPU tensors instead of
page-faulting them in again every step, and maps its large ones on huge pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from pretrain.train.host_alloc import THP_ENV, with_huge_pages
from pretrain.train.host_blas import with_mkl_on_amd
from pretrain.train.host_threads import SPIN, SPIN_ENV, WAIT_POLICY_ENV

# In a fresh process: the trainer's entry with its loop replaced by a probe that counts the minor page faults of
# CPU tensors allocated (and freed) one after another, as a training step's are every step.
PROBE = """
import json, os, resource, sys, types

def faults(nbytes):
    import torch
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(nbytes // 4)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

def main(argv):
    print(json.dumps({"thp": os.environ.get("THP_MEM_ALLOC_ENABLE"), "kept": kept,
                      "small": [faults(8 << 20) for _ in range(3)], "large": [faults(64 << 20) for _ in range(2)]}))
    return 0

import pretrain.train.host_alloc as host_alloc
kept = []  # per call of keep_freed_memory: (whether glibc took the settings, whether torch was loaded already)
real_keep = host_alloc.keep_freed_memory
host_alloc.keep_freed_memory = lambda: kept.append((real_keep(), "torch" in sys.modules)) or kept[-1][0]
sys.modules["pretrain.train.loop"] = types.SimpleNamespace(main=main)
from pretrain.train.entry import main as entry
sys.exit(entry([]))
"""


def _probe(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _thp_never() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return not path.exists() or "[never]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and Linux page faults")
def test_trainer_process_reuses_freed_tensors_and_maps_large_ones_on_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    got = _probe(env)
    assert got["thp"] == "1"
    # glibc keeps freed blocks, set before torch loads. Its effect is measured per step, not here: whether one
    # freed 8 MiB block is re-faulted depends on where the heap's top lies (seen 0 or 516 faults with the settings,
    # by what ran before in the process), while a step's steady state reuses its memory (bench/train_step.py --floor
    # prints faults per step: config S bf16 ~82,000 -> ~470).
    assert got["kept"] == [[True, False]], got
    if not _thp_never():
        assert max(got["large"]) < 64 * 256 // 4, got  # 16384 pages of 4 KiB; huge pages: a few hundred faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page faults")
def test_a_users_thp_setting_is_kept():
    got = _probe({**os.environ, THP_ENV: "0"})
    assert got["thp"] == "0"
    assert min(got["large"]) >= 64 * 256 * 9 // 10, got  # every 4 KiB page of 64 MiB faulted: no huge pages
    assert with_huge_pages({THP_ENV: "0"})[THP_ENV] == "0" and with_huge_pages({})[THP_ENV] == "1"


def test_probe_child_gets_the_trainers_settings(monkeypatch):
    """The launcher's --probe times steps in a child process: it starts with the trainer's host memory and OpenMP
    settings (pretrain/train/host_alloc.py, host_threads.py, host_blas.py)."""
    import pretrain.plan.probe as probe

    seen = {}

    def run(argv, **kw):
        seen.update(kw["env"])
        return subprocess.CompletedProcess(argv, 0, stdout="[]", stderr="")

    for name in (THP_ENV, WAIT_POLICY_ENV, SPIN_ENV, "LD_PRELOAD"):  # LD_PRELOAD: this session's (conftest.py)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(probe.subprocess, "run", run)
    from model import ModelConfig
    from pretrain.train.config import TrainConfig

    assert probe.probe_plan(ModelConfig.from_preset("tiny"), TrainConfig(size="tiny"), [], 1 << 30, 1) == []
    assert seen[THP_ENV] == "1"
    assert seen[SPIN_ENV] == SPIN and WAIT_POLICY_ENV not in seen
    assert seen.get("LD_PRELOAD") == with_mkl_on_amd({}).get("LD_PRELOAD")  # MKL's branch (host_blas.py), on AMD


# In a fresh process, through the trainer's entry: how many more bytes glibc holds in mmap'd blocks once a 64 MiB CPU
# tensor is made, before and after a training run (on --device as given) has set its device up.
MAPPED = """
import ctypes, json, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

def mapped_with_a_large_tensor():
    import torch
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblkhd
    t = torch.ones(16 << 20)
    return mallinfo2().hblkhd - before

import pretrain.train.loop as loop
train = loop.main
seen = {}

def main(argv):
    seen["before"] = mapped_with_a_large_tensor()
    code = train(argv)
    seen["after"] = mapped_with_a_large_tensor()
    return code

loop.main = main
from pretrain.train.entry import main as entry
code = entry(sys.argv[1:])
print(json.dumps(seen))
sys.exit(code)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_training_keeps_large_blocks_in_the_heap(byte_data, tmp_path):
    """On the CPU device the trainer serves even blocks above glibc's largest mmap threshold from its heap (config
    S's 77 MB tied gradient was mapped and faulted in anew every step); before its device setup a large tensor is
    still mapped, as in a GPU run, whose host copies (a checkpoint save's) go back to the system when freed."""
    argv = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--d-ff", "64", "--block-size",
            "32", "--batch-size", "2", "--val-frac", "0.05", "--eval-iters", "1", "--device", "cpu", "--live", "off",
            "--save-minutes", "0", "--steps", "1", "--data", str(byte_data), "--out-dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", MAPPED, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] >= 64 << 20 and seen["after"] == 0, seen
