"""`python -m pretrain.gpu_check` (make gpu-check) on CPU: the same script a card runs, at tiny size, so the
script is known to work before a GPU sees it. Compile is on, as on a card: instruments run eagerly, so each
process compiles one graph per training shape (~15-20 s each on CPU, cached by inductor after the first).

Its uninterrupted run is also the suite's compiled trainer run with every instrument on (what torch.compile covers:
the training step only, read back from dynamo's counters in the run's `end` event): one cold compile serves both."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, cli_exit

import pretrain.gpu_check as gpu_check
from model import GPT, ModelConfig
from pretrain.gpu_check import COLUMNS
from pretrain.gpu_check_runs import compare_resume
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The plain-text table: a header of COLUMNS, then one row per variant (cells split on 2+ spaces)."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == "variant")
    assert re.split(r"\s{2,}", lines[head].strip()) == COLUMNS
    rows = {}
    for line in lines[head + 1:]:
        if not line.startswith("  "):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def test_cpu_check_runs_a_variant_stops_resumes_exactly_and_prints_one_table(tmp_path, made_bytes, capsys):
    """The whole check for one variant (decoupled: the variant with most of its own code; the loop over several
    variants: test_every_listed_variant_gets_a_row_in_order). Its main runs in this process (the trainers it starts
    are processes); `python -m pretrain.gpu_check` as a process: test_unknown_variant_is_one_line_exit_2."""
    work = tmp_path / "work"
    code = cli_exit(gpu_check.main, ["--device", "cpu", "--variants", "decoupled", "--steps-per-phase", "2",
                                     "--data", str(made_bytes), "--val-frac", "0.05", "--max-stop-seconds", "60",
                                     "--work-dir", str(work), "--json", str(tmp_path / "check.json")])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "gpu-check: tier cpu on CPU, 2 steps per phase, compile on" in out
    rows = table_rows(out)
    assert sorted(rows) == ["decoupled"]
    for name, cells in rows.items():
        cell = dict(zip(COLUMNS, cells))
        assert cell["resume"] == "exact", cell
        assert cell["result"] == "ok", cell
        latency = re.fullmatch(r"(\d+\.\d) s \(exit 75\)", cell["stop latency"])
        assert latency and 0 < float(latency.group(1)) < 60, cell
        assert re.fullmatch(r"\S+ / \S+ \(\d+\.\d\dx\)", cell["tok/s (plan)"]), cell  # measured / plan
        assert re.fullmatch(r"\S+ [GM]iB / \S+ [GM]iB \(\d+\.\d\dx, rss\)", cell["peak mem (plan)"]), cell
        # Two phases of the cpu tier: two graphs each (block, loss chunk), none beyond them, nothing eager.
        assert cell["recompiles"] == "0 (eager 0; 4 graphs/4)", cell
        # The stop landed after step 2 (the first phase's last step) and the resume finished all 4 steps.
        assert (work / name / "stopped" / "last.pt").is_file()
    # The trainer under --compile, every instrument on between its two phases (evals at the other length, length
    # evals, diagnostics at the longest, KV-cache sampling, downstream scoring): one static graph per training shape,
    # the block's and the loss chunk's, nothing recompiled beyond them and nothing run eagerly.
    ref = work / "decoupled" / "uninterrupted"
    events = read_jsonl(ref / "train.jsonl")
    assert {"eval", "eval_lengths", "diagnostics", "sample", "downstream"} <= {e["type"] for e in events}
    assert sorted({e["seq_len"] for e in events if e["type"] == "train"}) == [128, 256]
    end = next(e for e in events if e["type"] == "end")
    assert end["compile"] == {"frames": 4, "recompiles": 2, "eager_fallbacks": 0}
    log = (work / "decoupled.log").read_text()
    # Dynamo's one warning line when a frame hits the limit, after which every new shape runs eagerly.
    assert "recompile_limit" not in log and "cache_size_limit" not in log, log[-3000:]
    # The compiled run's checkpoint is a plain model's: no _orig_mod. keys, loads strictly into an uncompiled GPT.
    state = load_checkpoint(ref / "last.pt")
    assert not any("_orig_mod" in k for k in state["model"])
    GPT(ModelConfig.from_dict(state["model_config"])).load_state_dict(state["model"])
    report = json.loads((tmp_path / "check.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["decoupled"] and report["tier"] == "cpu"
    for r in report["rows"]:
        assert [p["seq_len"] for p in r["phases"]] == [128, 256]  # the cpu tier's two phases, shortened
        assert all(p["tok_s"] > 0 and p["tok_s_plan"] > 0 and p["mem_kind"] == "rss" for p in r["phases"])
        assert "--compile" in r["command"] and "--hellaswag" in r["command"] and "--tb" in r["command"]


def test_every_listed_variant_gets_a_row_in_order_and_one_failure_fails_the_check(tmp_path, made_bytes,
                                                                                 monkeypatch, capsys):
    """--variants a,b checks each in turn (each check itself: the test above): one table row and one JSON row per
    variant in the order given, each failure printed under the table, exit 1 when any row failed."""
    import pretrain.gpu_check as gc

    checked = []

    def check_variant(variant, launcher, work, ns):
        checked.append(variant)
        row = gc.Row(variant, cells={"resume": "exact"})
        if variant == "gqa":
            row.failures.append("resume not exact: DIFFERS")
        return row

    monkeypatch.setattr(gc, "check_variant", check_variant)
    argv = ["--device", "cpu", "--variants", "baseline,gqa,decoupled", "--data", str(made_bytes), "--work-dir",
            str(tmp_path / "w"), "--json", str(tmp_path / "check.json")]
    assert gc.main(argv) == 1
    out = capsys.readouterr().out
    assert checked == ["baseline", "gqa", "decoupled"]
    rows = table_rows(out)
    assert list(rows) == checked and [rows[v][-1] for v in checked] == ["ok", "FAIL", "ok"]
    assert "FAIL gqa: resume not exact: DIFFERS" in out
    assert [r["variant"] for r in json.loads((tmp_path / "check.json").read_text())["rows"]] == checked
    monkeypatch.setattr(gc, "check_variant", lambda v, *a: gc.Row(v))
    assert gc.main([*argv[:3], "baseline", *argv[4:]]) == 0


def test_unknown_variant_is_one_line_exit_2(tmp_path):
    proc = run_check("--variants", "baseline,nope", "--work-dir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown --variants nope" in proc.stderr and "decoupled" in proc.stderr
    assert not (tmp_path / "w").exists()


def _fake_run(d, losses, weight, mem_peak_gb=None):
    """A run dir as the trainer leaves it, as far as gpu_check reads it: train events and last.pt."""
    import torch

    d.mkdir(parents=True)
    mem = {"mem_peak_gb": mem_peak_gb} if mem_peak_gb is not None else {"mem_rss_gb": 1.0}
    lines = [{"type": "train", "step": i + 1, "loss": v, "tok_s": 100.0, "mfu": 0.3, "seq_len": 8, **mem}
             for i, v in enumerate(losses)]
    (d / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    torch.save({"model": {"w": torch.tensor([weight])}, "step": len(losses), "tokens": 64 * len(losses),
                "sampler": {"epoch": 0, "position": len(losses)}}, d / "last.pt")


def test_resume_on_cuda_may_be_close_but_on_cpu_must_be_bitwise(tmp_path):
    """CUDA kernels are not bitwise reproducible: a 1e-6 difference passes there as "close", never on CPU; a
    real difference (1 %) fails on both."""
    _fake_run(tmp_path / "a", [5.0, 4.0], 1.0)
    _fake_run(tmp_path / "b", [5.0, 4.000004], 1.000001)
    _fake_run(tmp_path / "c", [5.0, 4.04], 1.01)
    assert compare_resume(tmp_path / "a", tmp_path / "a", bitwise=True) == ("exact", True)
    assert compare_resume(tmp_path / "a", tmp_path / "b", bitwise=False)[1] is True
    assert compare_resume(tmp_path / "a", tmp_path / "b", bitwise=False)[0].startswith("close")
    assert compare_resume(tmp_path / "a", tmp_path / "b", bitwise=True)[1] is False
    assert compare_resume(tmp_path / "a", tmp_path / "c", bitwise=False)[1] is False
    text, ok = compare_resume(tmp_path / "a", tmp_path / "c", bitwise=True)
    assert not ok and text.startswith("DIFFERS"), text


def test_cuda_peak_over_the_plan_fails_the_row_and_cpu_rss_does_not(tmp_path):
    from argparse import Namespace

    from pretrain.gpu_check import Row, measure

    plan = {"phases": [{"tokens": 1000, "tokens_per_second": 100.0, "tensor_peak_bytes": 2 * 1024**3,
                        "peak_memory_bytes": 3 * 1024**3}],
            "estimate": {"effective_mfu": 0.4}, "host_ram_pinned_bytes": 5 * 1024**3}
    cut = [{"seq_len": 8, "start_step": 0, "end_step": 2}]
    ns = Namespace(mem_margin=0.10, compile=True)
    for name, mem, fails in (("over", 2.5, True), ("under", 2.1, False), ("cpu", None, False)):
        _fake_run(tmp_path / name, [5.0, 4.0], 1.0, mem_peak_gb=mem)
        row = Row(name)
        measure(row, plan, cut, tmp_path / name, tmp_path / name, ns)
        assert bool(row.failures) == fails, (name, row.failures)
        assert row.cells["host RAM pinned"] == "5.0 GiB" and row.cells["MFU"] == "30% / 40%"
        assert row.cells["recompiles"] == "n/a"  # no `compile` in the end event: a trainer that does not count
    assert row.cells["peak mem"] == "1.0 GiB / 3.0 GiB (0.33x, rss)"
