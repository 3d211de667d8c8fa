"""wandb as its users set it up, read back from the trainer's offline .wandb files: WANDB_PROJECT / WANDB_ENTITY
are honoured (a flag still wins), every metric family is charted against tokens, the samples table grows by
increments, and the run's location line is printed when the run starts and when it ends."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
from conftest import plots_unrendered
from wandb_records import iter_wandb_records, read_wandb_history

from pretrain.train.config import parse_config
from pretrain.train.loop import train

pytest.importorskip("wandb")

FLAGS = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
         "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "1",
         "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--live", "off", "--save-minutes", "0",
         "--wandb", "--wandb-mode", "offline"]


def run(data: Path, out: Path, *flags: str) -> dict:
    return train(parse_config(["--data", str(data), "--out-dir", str(out), *FLAGS, *flags]))


def wandb_file(out: Path) -> Path:
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def run_record(path: Path):
    return next(r.run for r in iter_wandb_records(path) if r.WhichOneof("record_type") == "run")


@pytest.mark.parametrize("flags, project, entity", [
    ((), "team-proj", "team-ent"),  # the environment, as wandb users set it
    (("--wandb-project", "flag-proj", "--wandb-entity", "flag-ent"), "flag-proj", "flag-ent"),
])
def test_wandb_project_and_entity_come_from_the_flag_then_the_environment(
        made_bytes, tmp_path, monkeypatch, flags, project, entity):
    monkeypatch.setenv("WANDB_PROJECT", "team-proj")
    monkeypatch.setenv("WANDB_ENTITY", "team-ent")
    out = tmp_path / "run"
    run(made_bytes, out, "--steps", "1", "--eval-every", "0", *flags)
    rec = run_record(wandb_file(out))
    assert (rec.project, rec.entity) == (project, entity)


def test_without_flag_or_environment_the_project_is_pretrain_1b(made_bytes, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "run"
    run(made_bytes, out, "--steps", "1", "--eval-every", "0")
    assert run_record(wandb_file(out)).project == "pretrain-1b"


@pytest.fixture(scope="module")
def instrumented_run(made_bytes, tmp_path_factory):
    """Every instrument on, so every metric family and the samples table reach the .wandb file."""
    out = tmp_path_factory.mktemp("wandb-families") / "run"
    items = out.parent / "items.jsonl"
    items.write_text("".join(json.dumps({"ctx": f"The king {i}", "endings": [" said.", " went.", " came.", " saw."],
                                         "label": i % 4}) + "\n" for i in range(4)))
    prompts = out.parent / "prompts.txt"
    prompts.write_text("The king\nAnd the\n")
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err), pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # the .wandb file is what is read
        run(made_bytes, out, "--steps", "4", "--eval-every", "2", "--analysis-every", "2", "--eval-seq-lens", "16,32",
            "--sample-every", "2", "--sample-prompts", str(prompts), "--sample-tokens", "4", "--hellaswag",
            str(items), "--downstream-every", "2")
    return out, err.getvalue()


def test_every_metric_family_is_on_the_tokens_axis(instrumented_run):
    out, _ = instrumented_run
    path = wandb_file(out)
    on_tokens = [r.metric.name or r.metric.glob_name for r in iter_wandb_records(path)
                 if r.WhichOneof("record_type") == "metric" and r.metric.step_metric == "tokens"]
    rows = read_wandb_history(path)
    keys = {k.split("/", 1)[0] if k.startswith("samples/") else k for r in rows for k in r if not k.startswith("_")}
    keys.discard("tokens")
    families = {k.split("/", 1)[0] for k in keys}
    assert {"train", "val", "val_len", "diag", "downstream", "samples"} <= families
    off_axis = sorted(k for k in keys if not any(fnmatch.fnmatchcase(k, pat) for pat in on_tokens))
    assert not off_axis, f"charted against wandb's Step instead of tokens: {off_axis[:8]}"
    assert all("tokens" in r for r in rows if any(not k.startswith("_") for k in r))  # the axis is in each row


def test_the_samples_table_grows_by_increments(instrumented_run):
    out, _ = instrumented_run
    path = wandb_file(out)
    tables = [r for r in read_wandb_history(path) if "samples/_type" in r]
    assert [r["_step"] for r in tables] == [2, 4]
    assert {r["samples/_type"] for r in tables} == {"incremental-table-file"}
    assert [r["samples/increment_num"] for r in tables] == [0, 1]
    assert [r["samples/nrows"] for r in tables] == [2, 4]  # one table holding every round so far
    for r in tables:  # each increment sends only its own round's rows
        sent = json.loads((path.parent / "files" / r["samples/path"]).read_text())
        assert [row[0] for row in sent["data"]] == [r["_step"], r["_step"]]


def test_the_offline_sync_line_is_printed_at_start_and_end(instrumented_run):
    out, err = instrumented_run
    lines = err.splitlines()
    sync = [i for i, line in enumerate(lines) if line.startswith("wandb (offline): upload every session")]
    first_step = next(i for i, line in enumerate(lines) if line.startswith("eval step 0"))
    assert len(sync) == 2 and sync[0] < first_step and sync[1] == len(lines) - 1
    assert lines[sync[0]] == lines[sync[1]] and "offline-run-*-" in lines[sync[0]]
