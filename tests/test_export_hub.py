"""An export is ready for the Hub: fast tokenizer with a pad token, generation_config.json, a model card whose YAML
parses and carries the run's numbers, the shared default checkpoint, and `--push-to-hub` (offline: one line,
exit 2, nothing sent; online: huggingface_hub's upload of exactly the export folder minus our marker).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAMPLE_DATASET, cli_exit
from test_export_remote_code import VARIANTS, tiny_run

from pretrain.export import MARKER
from pretrain.export import main as export_main
from pretrain.export_hub import upload_files
from pretrain.track.runlog import read_jsonl

transformers = pytest.importorskip("transformers")

EOT = "<|endoftext|>"
HUB_FILES = ["README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
             "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]


@pytest.fixture(scope="module")
def hub_data(tmp_path_factory) -> Path:
    """The bundled GPT-2 sample dataset, its manifest saying it was prepared from FineWeb-Edu on the Hub."""
    data = tmp_path_factory.mktemp("data") / "sample"
    shutil.copytree(SAMPLE_DATASET, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["source"] = {"kind": "hub", "path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT",
                          "split": "train", "text_column": "text"}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


@pytest.fixture(scope="module")
def runs(hub_data, tmp_path_factory):
    """variant -> a tiny GPT-2-vocabulary run, trained on first use."""
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            flags = VARIANTS.get(variant, ["--attn", variant])
            made[variant] = tiny_run(hub_data, tmp_path_factory.mktemp(variant) / "run", *flags)
        return made[variant]
    return get


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("variant", ["baseline", "decoupled"])
def test_export_loads_generates_and_has_a_card(variant, runs, tmp_path, gpt2_encoding):
    run, out = runs(variant), tmp_path / "hf"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert set(HUB_FILES) <= {p.name for p in out.iterdir()}

    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.is_fast and tok.pad_token == tok.eos_token == EOT and tok.pad_token_id == 50256
    text = "In the beginning God created the heaven and the earth.\n\n  Tabs\tand  spaces, caf\u00e9 12345 ok?"
    assert tok.encode(text) == gpt2_encoding.encode_ordinary(text)

    remote = variant != "baseline"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True,
                                                              trust_remote_code=remote).eval()
    gc = model.generation_config
    assert (gc.do_sample, gc.temperature, gc.eos_token_id, gc.pad_token_id) == (True, 0.8, 50256, 50256)
    tok.padding_side = "left"
    batch = tok(["In the beginning", "And God said, Let there be light"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    gen = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)  # sampling settings from the file
    assert gen.shape == (2, batch["input_ids"].shape[1] + 6)
    assert tok.decode(gen[1], skip_special_tokens=True).startswith("And God said, Let there be light")

    # The default checkpoint is the shared `auto`: best.pt here, whose step, tokens and loss the card states.
    marker = json.loads((out / MARKER).read_text())
    assert Path(marker["checkpoint"]).name == "best.pt"
    best = torch.load(run / "best.pt", weights_only=True)
    val = [e["loss"] for e in read_jsonl(run / "train.jsonl") if e.get("type") == "eval" and e["step"] == best["step"]]
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert meta["training_tokens"] == best["tokens"] > 0 and meta["training_step"] == best["step"]
    assert meta["val_loss"] == pytest.approx(val[-1])
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == pytest.approx(val[-1], abs=1e-4)
    assert ("custom_code" in meta["tags"]) == remote
    assert "lm_eval --model hf --model_args pretrained=" in card
    assert ("trust_remote_code=True" in card) == remote


def test_push_to_hub_offline_is_one_line_and_leaves_the_folder_it_would_upload(runs, tmp_path, capsys):
    """In this process, offline as every test session is (conftest: HF_HUB_OFFLINE=1); `python -m pretrain.export`
    as a process, one line and exit 2: tests/test_bad_input.py's SCRIPTS."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    run, out = runs("baseline"), tmp_path / "hf"
    argv = [str(run), "--out", str(out), "--push-to-hub", "me/tiny-model"]
    assert cli_exit(export_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "nothing was uploaded" in err and f"hf upload me/tiny-model {out}" in err
    assert upload_files(out, MARKER) == HUB_FILES  # the marker (local paths) stays home

    assert cli_exit(export_main, [str(run), "--out", str(tmp_path / "hf2"), "--push-to-hub", "not a repo!"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NAMESPACE/NAME" in err
    assert not (tmp_path / "hf2").exists()  # refused before anything was written


def test_push_to_hub_uploads_the_export_folder(runs, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", {"repo_id": repo_id, **kw}))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    out = tmp_path / "hf"
    assert export_main([str(runs("baseline")), "--out", str(out), "--push-to-hub", "me/tiny", "--private"]) == 0
    (_, create), (_, upload) = calls
    assert create["repo_id"] == "me/tiny" and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "me/tiny" and Path(upload["folder_path"]) == out.resolve()
    assert upload["ignore_patterns"] == [MARKER]
    assert "uploaded" in capsys.readouterr().out
