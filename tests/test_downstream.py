"""Downstream multiple-choice accuracy: in the training loop (--downstream-every) and standalone, on a small
set this test makes, where a model trained on the right endings must beat chance."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import cli_exit, write_legacy_dataset
from wandb_records import read_wandb_history

from pretrain.track.runlog import read_jsonl
from pretrain.train.loop import main as train_main

SUBJECTS = ["the old man", "a small dog", "my sister", "the farmer", "our teacher", "the king",
            "a young bird", "the captain"]
ENDINGS = ["walked home slowly", "barked at the moon", "baked fresh bread", "planted corn today",
           "read us a story", "ruled the land", "sang in the tree", "steered the ship"]


def _scramble(text: str, rng: random.Random) -> str:
    """Same letters, other order: only a model that learned the language tells it from the real ending."""
    chars = list(text)
    while "".join(chars) == text:
        rng.shuffle(chars)
    return "".join(chars)


@pytest.fixture(scope="module")
def mc_set(tmp_path_factory):
    """(token dataset of the right sentences, jsonl of 4-way items)."""
    d = tmp_path_factory.mktemp("mc")
    rng = random.Random(0)
    items = []
    for subject, ending in zip(SUBJECTS, ENDINGS, strict=True):
        wrong = [_scramble(ending, rng) for _ in range(3)]
        label = rng.randrange(4)
        items.append({"ctx": f"Then {subject}", "endings": wrong[:label] + [ending] + wrong[label:],
                      "label": str(label)})  # the HF dataset stores label as a string
    path = d / "mc.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    text = "".join(f"Then {s} {e}.\n" for _ in range(400) for s, e in rng.sample(list(zip(SUBJECTS, ENDINGS)), 8))
    tokens = np.frombuffer(text.encode(), dtype=np.uint8)
    data = write_legacy_dataset(d / "mc.npy", tokens, 256, 0, "bytes")
    return data, path


ARGS = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
        "--batch-size", "8", "--train-seq-len", "64", "--val-frac", "0.05", "--eval-iters", "1", "--log-every", "10",
        "--warmup-steps", "5", "--lr", "1e-2", "--device", "cpu", "--live", "off", "--save-minutes", "0"]


def test_trained_model_beats_chance_in_loop_and_standalone(mc_set, tmp_path, capsys):
    from pretrain.evals.downstream import main as downstream_main

    data, items = mc_set
    out = tmp_path / "run"
    code = train_main(["--data", str(data), "--out-dir", str(out), *ARGS, "--steps", "80", "--eval-every", "0",
                       "--downstream-every", "40", "--hellaswag", str(items), "--wandb", "--wandb-mode", "offline",
                       "--tb"])
    assert code == 0
    events = [e for e in read_jsonl(out / "train.jsonl") if e["type"] == "downstream"]
    assert [e["step"] for e in events] == [40, 80]
    final = events[-1]
    assert final["n"] == 8 and final["chance"] == 0.25 and final["task"] == "mc"
    assert final["acc"] >= 0.75 and final["acc_norm"] >= 0.75, final
    wandb_rows = [r for f in out.glob("wandb/offline-run-*/run-*.wandb") for r in read_wandb_history(f)]
    assert {r["_step"]: r["downstream/acc"] for r in wandb_rows if "downstream/acc" in r} == \
        {e["step"]: e["acc"] for e in events}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "downstream step 80: mc acc" in (out / "summary.md").read_text()

    capsys.readouterr()
    assert cli_exit(downstream_main, [str(out), "--hellaswag", str(items), "--checkpoint", "last", "--json"]) == 0
    standalone = json.loads(capsys.readouterr().out)
    assert standalone["step"] == 80 and standalone["n"] == 8 and standalone["acc_norm"] >= 0.75


def test_untrained_model_is_near_chance(mc_set, tmp_path):
    """The same scoring on random weights: the bar above is earned by training, not by the set."""
    data, items = mc_set
    out = tmp_path / "run"
    assert train_main(["--data", str(data), "--out-dir", str(out), *ARGS, "--steps", "1", "--lr", "1e-9",
                       "--hellaswag", str(items)]) == 0
    (final,) = [e for e in read_jsonl(out / "train.jsonl") if e["type"] == "downstream"]
    assert final["acc_norm"] <= 0.5


def test_bad_multiple_choice_inputs_are_one_line_exit_2(mc_set, tmp_path, capsys):
    from pretrain.evals.downstream import main as downstream_main
    from pretrain.train.entry import main as trainer

    data, items = mc_set
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 5}\n')
    cases = [
        (trainer, ["--data", str(data), "--out-dir", str(tmp_path / "r1"), *ARGS,
                   "--hellaswag", str(tmp_path / "missing.jsonl")]),
        (trainer, ["--data", str(data), "--out-dir", str(tmp_path / "r2"), *ARGS, "--downstream-every", "5"]),
        (trainer, ["--data", str(data), "--out-dir", str(tmp_path / "r3"), *ARGS, "--hellaswag", str(bad)]),
        (downstream_main, [str(tmp_path), "--hellaswag", str(items)]),
    ]
    for main, argv in cases:
        code = cli_exit(main, argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))
