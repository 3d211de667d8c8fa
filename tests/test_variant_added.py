"""Adding an attention variant is one entry in model/variants.py (issue 20.1): nothing outside model/ names one.

The test does what a researcher would: in a copy of the code it appends one entry to model/variants.py (a
second grouped-query variant, `kv_alt`: gqa's entry under another name), then trains it with train_v29's main,
plans it with the launcher, compares the run and exports it. Every place that recognised a variant by its
name (`attn == "gqa"`, `attn in ("baseline", "gqa")`) instead of by what its entry says shows here: the run name
and the compare label drop its kv heads, the export misses Llama's layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TINY_TRAIN

ENTRY = """
# Added by tests/test_variant_added.py: one more entry, as a researcher adds a variant.
import dataclasses as _dc
ATTENTION_VARIANTS["kv_alt"] = _dc.replace(ATTENTION_VARIANTS["gqa"], name="kv_alt", summary="gqa under another name")
"""

# Runs inside the copy: each CLI's main in one process (one torch import), its stdout kept per step.
SCRIPT = """
import contextlib, io, json, sys
from pretrain.errors import run_cli
from pretrain.export import main as export_main
from pretrain.plan.launch import main as launch_main
from pretrain.track.compare import main as compare_main
from pretrain.train.entry import main as train_main

train_argv, launch_argv, run, out = json.loads(sys.argv[1])
result = {}
for step, main, argv in [("train", train_main, train_argv), ("launch", launch_main, launch_argv),
                         ("compare", compare_main, [run]), ("export", export_main, [run, "--out", out])]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run_cli(main, argv)
    result[step] = {"code": code, "out": buf.getvalue()}
print(json.dumps(result))
"""


def _copy_with_entry(dest: Path) -> Path:
    """The production code (model/, pretrain/, the top-level scripts) with ENTRY appended to model/variants.py."""
    skip = shutil.ignore_patterns("__pycache__")
    for name in ("model", "pretrain"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    for script in ROOT.glob("*.py"):
        shutil.copy2(script, dest / script.name)
    variants = dest / "model" / "variants.py"
    variants.write_text(variants.read_text() + ENTRY)
    return dest


def test_a_variant_added_under_model_reaches_trainer_launcher_compare_and_export(made_bytes, tmp_path):
    code = _copy_with_entry(tmp_path / "code")
    run, out = tmp_path / "runs" / "kv_alt", tmp_path / "hf"
    train_argv = [*TINY_TRAIN, "--data", str(made_bytes), "--attn", "kv_alt", "--n-kv-head", "1", "--steps", "2",
                  "--out-dir", str(run)]
    launch_argv = ["--vram", "cpu", "--size", "tiny", "--variant", "kv_alt", "--n-kv-head", "1",
                   "--target-tokens", "100K", "--vocab-size", "256", "--run-root", str(tmp_path / "plans")]
    env = os.environ | {"PYTHONPATH": str(code)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([train_argv, launch_argv, str(run), str(out)])],
                          cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert {step: r["code"] for step, r in result.items()} == dict.fromkeys(result, 0), proc.stderr[-3000:]

    meta = json.loads((run / "train.jsonl").read_text().splitlines()[0])
    assert (meta["model_config"]["attn"], meta["model_config"]["n_kv_head"]) == ("kv_alt", 1)
    # The launcher plans it, and names the run by its kv heads as it names gqa's (tiny-gqa_kv1).
    plan = result["launch"]["out"]
    assert "heads 4 q / 1 kv" in plan and "KV cache" in plan
    assert str(tmp_path / "plans" / "tiny-kv_alt_kv1") in plan
    # compare labels the run with its kv heads, as it labels a gqa run.
    row = next(line for line in result["compare"]["out"].splitlines() if line.startswith("kv_alt "))
    assert row.split()[1:3] == ["kv_alt", "kv1"]
    # Its entry says Llama's layout holds it (it is gqa's), so it exports as a LlamaForCausalLM.
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 1
    assert not (out / "modeling_pretrain.py").exists()
