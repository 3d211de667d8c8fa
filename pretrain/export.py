"""`python -m pretrain.export RUN --out DIR`: a run's checkpoint as a Hugging Face directory.

baseline/gqa runs become `LlamaForCausalLM` safetensors + config.json (layout in `pretrain/llama.py`), with
GPT-2's tokenizer files so `AutoTokenizer` and `pipeline("text-generation")` work offline. bottleneck /
decoupled attention (and null_attn / learned_temp) have no Llama equivalent: they export as our own
safetensors + config.json, loadable with `load_exported`. `--overwrite` replaces only a previous export.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from pretrain.cli import ArgumentParser, UserError, script_exit_code
from pretrain.data.hf_tokenizer import FILES as HF_TOKENIZER_FILES
from pretrain.data.hf_tokenizer import write_hf_tokenizer
from pretrain.evals.run_model import checked_model_config
from pretrain.llama import llama_config, llama_incompatibility, to_llama
from pretrain.train.checkpoint import load_checkpoint

OUR_FORMAT = "pretrain-gpt"

# ------------------------------------------------------------------------------------------------ export
def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    if which in ("best", "last"):
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} is not a run directory; pass runs/<name> as written by train_v29.py")
        path = run_dir / f"{which}.pt"
        if not path.is_file():
            other = "last" if which == "best" else "best"
            raise UserError(f"{path} does not exist; train the run first, or pass --checkpoint {other} or a .pt path")
        return path
    path = Path(which)
    if not path.is_file():
        raise UserError(f"--checkpoint {which}: no such file; use best, last or a path to a .pt checkpoint")
    return path


def _dataset_info(train_config: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer name and EOT id of the run's dataset, when it is still where training read it."""
    try:
        from pretrain.data.dataset import open_dataset

        ds = open_dataset(train_config.get("data", ""), train_config.get("val_frac", 0.0))
        return {"tokenizer": ds.tokenizer, "eot_id": int(ds.eot_id)}
    except Exception:  # noqa: BLE001 - optional metadata; the weights do not depend on it
        return {}


_LLAMA_README = """# {name}: a Llama-architecture export

Trained with `train_v29.py` ({attn} attention), step {step}, from `{ckpt}`.
Loads with `transformers.LlamaForCausalLM.from_pretrained("<this dir>")`; logits match the original model.
Tokenizer: {tokenizer} (vocab_size {vocab}, embedding padding removed); for GPT-2 its files are included, so
`AutoTokenizer.from_pretrained("<this dir>")` and `pipeline("text-generation", "<this dir>")` work offline.
"""

_OUR_README = """# {name}: NOT a Llama model

This run uses {attn} attention: {why}.
`LlamaForCausalLM` (or any stock Hugging Face architecture) cannot hold these weights; loading this
directory with transformers will fail or silently compute something else.

Files: `model.safetensors` (our parameter names; with tied embeddings only `wte.weight` is stored) and
`config.json` (`format: {fmt}`, our ModelConfig under `model_config`). Load with:

    from pretrain.export import load_exported
    model = load_exported("<this dir>")   # a model.GPT, same logits as the trained model

Trained with `train_v29.py`, step {step}, from `{ckpt}`. Tokenizer: {tokenizer}.
"""


EXPORT_FILES = {"model.safetensors", "config.json", "README.md", *HF_TOKENIZER_FILES}


def _is_previous_export(out: Path) -> bool:
    """A directory this command wrote: only export files, and a config.json of ours or of a Llama."""
    try:
        names = {p.name for p in out.iterdir()}
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return names <= EXPORT_FILES and (config.get("format") == OUR_FORMAT or config.get("model_type") == "llama")


def check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, holds the run, or holds anything but a previous export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory to write the export into")
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise UserError(f"--out {out} would replace the run directory {run_dir}; choose a new directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not _is_previous_export(out):
        raise UserError(f"--out {out} holds files that are not an export (--overwrite only replaces a previous "
                        "export); choose another --out")
    if not overwrite:
        raise UserError(f"{out} holds a previous export; pass --overwrite to replace it or choose another --out")


def _write_tokenizer(out: Path, name: str | None, mcfg: ModelConfig) -> None:
    """Tokenizer files beside the weights when the run's tokenizer is known and GPT-2; otherwise say why not."""
    why = None
    if name is None:
        why = "the run's dataset is not where it was trained (pass --tokenizer gpt2 if it was GPT-2)"
    elif not write_hf_tokenizer(out, name, mcfg.block_size):
        why = f"tokenizer {name!r} has no Hugging Face files here (only GPT-2 does)"
    if why:
        print(f"note: no tokenizer files written: {why}", file=sys.stderr)


def _open_permissions(path: Path) -> None:
    """mkdtemp makes 0700 and safetensors 0600: give the export the user's ordinary umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        f.chmod(0o666 & ~umask)


def export(run_dir: Path, out: Path, checkpoint: str = "last", dtype: str | None = None,
           overwrite: bool = False, tokenizer: str | None = None) -> str:
    """Write `out` from a run's checkpoint; returns "llama" or our format's name."""
    from safetensors.torch import save_file

    ckpt_path = resolve_checkpoint(run_dir, checkpoint)
    check_out(run_dir, out, overwrite)
    state = load_checkpoint(ckpt_path)
    mcfg = checked_model_config(state, ckpt_path)  # the weights back the config: nothing huge gets allocated
    weights = {k.replace("_orig_mod.", ""): v for k, v in state["model"].items()}
    to = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype or "")
    to = to or weights["wte.weight"].dtype
    info = _dataset_info(state.get("train_config", {}))
    if tokenizer:
        info["tokenizer"] = tokenizer
    why = llama_incompatibility(mcfg)
    fields = dict(name=run_dir.name, attn=mcfg.attn, step=state.get("step"), ckpt=ckpt_path, why=why,
                  tokenizer=info.get("tokenizer", "unknown"), vocab=mcfg.vocab_size, fmt=OUR_FORMAT)
    if why is None:
        tensors = to_llama(weights, mcfg)
        config = llama_config(mcfg, to, info.get("eot_id"))
        readme = _LLAMA_README.format(**fields)
    else:
        skip = {"lm_head.weight"} if mcfg.tie_embeddings else set()
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items() if k not in skip}
        config = {"format": OUR_FORMAT, "model_config": mcfg.to_dict(), "llama_compatible": False,
                  "reason": why, **info}
        readme = _OUR_README.format(**fields)
    tensors = {k: v.to(to) if v.is_floating_point() else v for k, v in tensors.items()}
    # Write beside the target, then rename: an interrupted export never leaves a half-written dir.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(readme)
        _write_tokenizer(tmp, info.get("tokenizer"), mcfg)
        _open_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "llama" if why is None else OUR_FORMAT


def load_exported(path: str | Path) -> GPT:
    """A GPT from a directory written by `export` in our own format (bottleneck / decoupled runs)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("format") != OUR_FORMAT:
        raise UserError(f"{path} is not in our export format; Llama dirs load with transformers")
    model = GPT(ModelConfig.from_dict(config["model_config"]))
    state = load_file(str(path / "model.safetensors"))
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pretrain.export",
                       description="Export a run to a Hugging Face dir (Llama for baseline/gqa, our format otherwise).")
    p.add_argument("run_dir", help="run directory, runs/<name>")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--checkpoint", default="last", help="best, last (default) or a path to a .pt checkpoint")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="tensor dtype to write (default: as trained)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer whose Hugging Face files to include (default: the run dataset's, e.g. gpt2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in --out (never a run dir or a directory holding other files)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    kind = export(Path(a.run_dir), Path(a.out), a.checkpoint, a.dtype, a.overwrite, a.tokenizer)
    if kind == "llama":
        print(f"wrote {a.out}: LlamaForCausalLM.from_pretrained({str(a.out)!r}) loads it")
    else:
        print(f"wrote {a.out} in our own format: Llama cannot hold this attention variant "
              "(see its README.md); load it with pretrain.export.load_exported")
    return 0


if __name__ == "__main__":
    sys.exit(script_exit_code(main))
