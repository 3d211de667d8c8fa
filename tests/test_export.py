"""Hugging Face export and --init-from: Llama logits equal ours, round trips, our own format, CLI errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli_exit

from model import GPT, ModelConfig
from pretrain.errors import UserError
from pretrain.export import load_exported
from pretrain.export import main as export_main
from pretrain.train import distributed as dist_lib
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.loop import train
from pretrain.train.session import open_session

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=250, block_size=64, n_layer=2, n_head=4, d_model=64, d_ff=96)  # 250: 6 padded rows


def fake_run(tmp_path: Path, **overrides) -> tuple[GPT, Path]:
    """A run dir holding last.pt of a random model whose norm gains are not all ones."""
    torch.manual_seed(0)
    cfg = ModelConfig(**(TINY | overrides))
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "model_config": cfg.to_dict(), "train_config": {}, "step": 7},
               run / "last.pt")
    return model.eval(), run


@pytest.mark.parametrize("overrides", [dict(attn="baseline"), dict(attn="gqa", n_kv_head=2, tie_embeddings=False),
                                       dict(attn="baseline", tie_qk=True)], ids=["baseline", "gqa-untied", "tie-qk"])
def test_llama_logits_match_ours(tmp_path, overrides):
    model, run = fake_run(tmp_path, **overrides)
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert hf.config.vocab_size == 250 and hf.config.tie_word_embeddings == model.config.tie_embeddings
    idx = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == theirs.shape == (2, 48, 250)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_export_then_init_from_gives_identical_weights(byte_data, tmp_path):
    flags = ["--data", str(byte_data), "--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2",
             "--d-ff", "128", "--block-size", "64", "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05",
             "--eval-iters", "1", "--warmup-steps", "1", "--lr", "3e-3", "--device", "cpu", "--live", "off",
             "--save-minutes", "0", "--eval-every", "0", "--attn", "gqa", "--n-kv-head", "2"]
    train(parse_config([*flags, "--out-dir", str(tmp_path / "a"), "--steps", "3"]))
    trained = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    export_main([str(tmp_path / "a"), "--out", str(tmp_path / "hf"), "--checkpoint", "best"])

    s = open_session(parse_config([*flags, "--out-dir", str(tmp_path / "b"), "--steps", "3",
                                   "--init-from", str(tmp_path / "hf")]))
    try:
        loaded = s.model.state_dict()
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained)  # vocab 256: no padded rows
    finally:
        s.close()
        dist_lib.cleanup(s.dist)

    with pytest.raises(UserError, match="--d-model 64"):
        open_session(parse_config([*flags, "--d-model", "128", "--out-dir", str(tmp_path / "c"),
                                   "--init-from", str(tmp_path / "hf")]))
    assert not (tmp_path / "c").exists()


def test_init_from_pads_vocab_rows_and_keeps_logits(tmp_path):
    from pretrain.llama import load_init_from

    model, run = fake_run(tmp_path)
    export_main([str(run), "--out", str(tmp_path / "hf"), "--dtype", "bf16"])
    assert transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).dtype == torch.bfloat16
    export_main([str(run), "--out", str(tmp_path / "hf"), "--overwrite"])
    torch.manual_seed(5)
    fresh = GPT(model.config).eval()
    load_init_from(fresh, tmp_path / "hf")
    idx = torch.randint(0, 250, (1, 32))
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))
    assert torch.equal(fresh.wte.weight[:250], model.wte.weight[:250])


def test_decoupled_exports_our_format_and_says_llama_cannot_hold_it(tmp_path):
    model, run = fake_run(tmp_path, attn="decoupled", sem_dim=32, geo_dim=32, attn_dim=64)
    out = tmp_path / "ours"
    assert export_main([str(run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "pretrain-gpt" and config["llama_compatible"] is False
    assert config["model_type"] != "llama"  # transformers must not mistake it for a Llama
    assert "cannot hold" in (out / "README.md").read_text()
    idx = torch.randint(0, 250, (2, 16))
    with torch.no_grad():
        assert torch.equal(load_exported(out).eval()(idx), model(idx))


def test_gpt2_export_carries_a_tokenizer_transformers_reads_offline(tmp_path, gpt2_encoding):
    """AutoTokenizer gives tiktoken's ids, pipeline() generates, and files get ordinary permissions."""
    old = os.umask(0o022)
    try:
        _, run = fake_run(tmp_path, vocab_size=50257, d_model=32, d_ff=64)
        out = tmp_path / "hf"
        assert export_main([str(run), "--out", str(out), "--tokenizer", "gpt2"]) == 0
    finally:
        os.umask(old)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "In the beginning God created the heaven and the earth.\n\n  Tabs\tand  spaces, caf\u00e9 12345 ok?"
    assert tok.encode(text) == gpt2_encoding.encode_ordinary(text)
    assert tok.eos_token_id == 50256
    gen = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    result = gen("In the beginning", max_new_tokens=4, do_sample=False)
    assert result[0]["generated_text"].startswith("In the beginning")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}


def test_export_without_a_known_tokenizer_says_so(tmp_path, capsys):
    _, run = fake_run(tmp_path)
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "no tokenizer files written" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "vocab.json").exists()


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_a_previous_export(tmp_path, capsys):
    """--overwrite never deletes a run dir, a parent of runs, a file, or a directory holding other files."""
    _, run = fake_run(tmp_path)
    (run / "train.jsonl").write_text('{"type": "meta"}\n')
    (tmp_path / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = _tree(tmp_path)
    for out, needle in [(run, "run directory"), (tmp_path, "run directory"), (other, "not an export"),
                        (afile, "is a file")]:
        code = cli_exit(export_main, [str(run), "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2, (out, err)
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err
        assert _tree(tmp_path) == before, out
    hf = tmp_path / "hf"
    assert export_main([str(run), "--out", str(hf)]) == 0
    first = (hf / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="previous export"):
        export_main([str(run), "--out", str(hf), "--dtype", "bf16"])
    assert export_main([str(run), "--out", str(hf), "--dtype", "bf16", "--overwrite"]) == 0
    assert (hf / "model.safetensors").read_bytes() != first


def test_overwrite_recognises_only_its_own_marker(tmp_path, capsys):
    """--overwrite replaces a directory only when this command's marker says it wrote everything in it: never
    a Llama look-alike (config.json, model.safetensors, the user's README), an export the user added files to,
    or one whose marker is gone; through a symlink it replaces what the link points at, and keeps the link."""
    from pretrain.errors import run_cli

    _, run = fake_run(tmp_path)
    lookalike = tmp_path / "lookalike"
    lookalike.mkdir()
    (lookalike / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 250}))
    (lookalike / "model.safetensors").write_bytes(b"someone else's weights")
    (lookalike / "README.md").write_text("my notes on this model")
    export = tmp_path / "export"
    assert export_main([str(run), "--out", str(export)]) == 0
    added = tmp_path / "added"
    assert export_main([str(run), "--out", str(added)]) == 0
    (added / "notes.txt").write_text("mine")
    unmarked = tmp_path / "unmarked"
    assert export_main([str(run), "--out", str(unmarked)]) == 0
    (unmarked / ".pretrain-export.json").unlink(missing_ok=True)
    swapped = tmp_path / "swapped"  # a file the export wrote is now the user's directory
    assert export_main([str(run), "--out", str(swapped)]) == 0
    (swapped / "README.md").unlink()
    (swapped / "README.md").mkdir()
    (swapped / "README.md" / "draft.txt").write_text("mine")
    capsys.readouterr()
    for out, needle in [(lookalike, "not an export"), (added, "notes.txt"), (unmarked, "not an export"),
                        (swapped, "README.md")]:
        before = _tree(out)
        assert run_cli(export_main, [str(run), "--out", str(out), "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (out, err)
        assert _tree(out) == before, out

    link = tmp_path / "link"
    link.symlink_to(export)
    assert run_cli(export_main, [str(run), "--out", str(link), "--dtype", "bf16", "--overwrite"]) == 0
    assert link.is_symlink() and link.resolve() == export.resolve()
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or moved-aside dir left
    marker = json.loads((export / ".pretrain-export.json").read_text())
    assert marker["tool"] == "pretrain.export" and marker["run"] == str(run.resolve())
    assert marker["files"] == sorted(p.name for p in export.iterdir() if p.name != ".pretrain-export.json")


def test_full_disk_is_one_line_naming_it(tmp_path, capsys):
    """safetensors reports a full disk as its own SafetensorError (no errno, a traceback); the user must read
    that the disk is full. Needs a real small filesystem: a 1 MiB tmpfs (root; skipped where mount is refused)."""
    from pretrain.errors import run_cli

    _, run = fake_run(tmp_path, vocab_size=8192, d_model=128, d_ff=256)  # ~5 MiB of weights
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert run_cli(export_main, [str(run), "--out", str(disk / "hf")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: no space left on the disk of") and "hf" in err, err
        assert list(disk.iterdir()) == []  # nothing half-written left behind
    finally:
        subprocess.run(["umount", str(disk)], check=True)
