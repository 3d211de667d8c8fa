"""OpenMP settings of a training process (pretrain/train/host_threads.py): between parallel regions the idle team
thread sleeps after a short spin instead of spinning for a millisecond, so serial stretches of a step (Python,
autograd, small ops) cost one core, not two; a setting the user chose is kept, and the launcher's --probe child
starts with the trainer's setting (tests/test_host_alloc.py::test_probe_child_gets_the_trainers_settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from pretrain.train.host_threads import SPIN, SPIN_ENV, WAIT_POLICY_ENV, with_idle_threads_asleep

# In a fresh process with 2 OpenMP threads: the trainer's entry with its loop replaced by a probe that alternates a
# parallel op with a serial stretch of Python, as a step does thousands of times, and reads back how much CPU time
# the main thread and the other (OpenMP team) threads spent in it.
PROBE = """
import json, os, sys, time, types

def cpu_by_thread():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out

def main(argv):
    import torch
    x = torch.ones(1 << 17)  # above the parallel grain (both threads work), small enough that the serial gaps dominate
    x.add_(1)  # starts the OpenMP team
    before = cpu_by_thread()
    for _ in range(300):
        x.add_(1)  # a parallel region over both threads
        t = time.thread_time()
        while time.thread_time() - t < 1e-3:  # 1 ms of serial work: the team thread has nothing to do
            pass
    after = cpu_by_thread()
    me = str(os.getpid())
    others = sum(after[t] - before.get(t, 0.0) for t in after if t != me)
    print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "spin": os.environ.get("GOMP_SPINCOUNT"),
                      "threads": torch.get_num_threads(),
                      "main": after[me] - before[me], "others": others}))
    return 0

sys.modules["pretrain.train.loop"] = types.SimpleNamespace(main=main)
from pretrain.train.entry import main as entry
sys.exit(entry([]))
"""


def _probe(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_two = pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                               reason="per-thread CPU time from Linux's /proc, and a second core")


@needs_two
def test_trainer_process_lets_idle_openmp_threads_sleep():
    env = {k: v for k, v in os.environ.items() if k not in (WAIT_POLICY_ENV, SPIN_ENV)}
    got = _probe(env)
    assert got["policy"] is None and got["spin"] == SPIN and got["threads"] == 2, got
    # The serial stretches are ~0.3 CPU-s of the main thread; a spinning team thread burns about as much again
    # (compared with the main thread's time, so load from other processes scales both alike).
    assert got["others"] < 0.3 * got["main"], got


@needs_two
def test_a_users_wait_policy_is_kept():
    # Without a spin count from this process's environment: an in-process trainer test may have set the product's.
    env = {k: v for k, v in os.environ.items() if k != SPIN_ENV}
    got = _probe({**env, WAIT_POLICY_ENV: "ACTIVE"})
    assert got["policy"] == "ACTIVE"
    assert got["others"] > 0.5 * got["main"], got  # what the setting saves: the team thread spun through the gaps
    assert with_idle_threads_asleep({WAIT_POLICY_ENV: "ACTIVE"}) == {WAIT_POLICY_ENV: "ACTIVE"}
    assert with_idle_threads_asleep({SPIN_ENV: "0"}) == {SPIN_ENV: "0"}
