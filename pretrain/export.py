"""`python -m pretrain.export RUN --out DIR`: a run's checkpoint as a Hugging Face directory.

Runs of a variant Llama's layout holds (`llama_layout` in model/variants.py: baseline, gqa) become
`LlamaForCausalLM` safetensors + config.json (layout in `pretrain/llama.py`).
bottleneck / decoupled attention (and null_attn / learned_temp) have no Llama equivalent: they export as a
`trust_remote_code` model carrying model/'s own code (`pretrain/export_remote.py`), which
`AutoModelForCausalLM` loads, and `load_exported` too. Both get GPT-2's tokenizer files (a fast
tokenizer.json, pad token) so `AutoTokenizer` and `pipeline("text-generation")` work offline, a
generation_config.json and a model card with Hub metadata (`pretrain/export_hub.py`); `--push-to-hub REPO`
uploads the result. The checkpoint is run_model's shared default (auto: best.pt, else last.pt, else the newest
step_<N>.pt), the same one generate and downstream read. Every export carries a marker file
(`.pretrain-export.json`: this tool, the source run, the files it wrote); `--overwrite` replaces a directory
only when that marker is there and the directory holds nothing else, so a look-alike (a Llama config.json, a
model.safetensors and the user's README) is never deleted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model import ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.errors import ArgumentParser, UserError, script_exit_code
from pretrain.evals.run_model import CHECKPOINT_HELP, DEFAULT_CHECKPOINT, find_checkpoint, open_checkpoint
from pretrain.export_hub import DEFAULT_LICENSE
from pretrain.export_remote import FORMAT as OUR_FORMAT
from pretrain.units import DTYPE_NAMES, torch_dtype

if TYPE_CHECKING:
    from model import GPT
# GPT, pretrain.llama (torch) and the tokenizer files (tiktoken) are imported where used, so --help is instant.


LLAMA_VARIANTS = "/".join(v.name for v in ATTENTION_VARIANTS.values() if v.llama_layout)  # model/variants.py


# ------------------------------------------------------------------------------------------------ export
def _dataset_info(train_config: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer name and EOT id of the run's dataset, when it is still where training read it."""
    try:
        from pretrain.data.dataset import open_dataset

        ds = open_dataset(train_config.get("data", ""), train_config.get("val_frac", 0.0))
        return {"tokenizer": ds.tokenizer, "eot_id": int(ds.eot_id)}
    except Exception:  # noqa: BLE001 - optional metadata; the weights do not depend on it
        return {}


MARKER = ".pretrain-export.json"  # written into every export; what --overwrite recognises, and nothing else
_TOOL = "pretrain.export"


def _marker_files(out: Path) -> set[str] | None:
    """Names this command wrote into `out`, from its marker; None when `out` holds no marker of ours."""
    marker = out / MARKER
    try:
        if marker.is_symlink() or not marker.is_file():
            return None
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    files = info.get("files") if isinstance(info, dict) and info.get("tool") == _TOOL else None
    if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
        return None
    return set(files)


def check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, holds the run, or is anything but a previous export of this command
    (its marker present, and nothing in it the export did not write)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory to write the export into")
    real = out.resolve()  # a symlink is judged (and replaced) by what it points at
    if real == run_dir.resolve() or real in run_dir.resolve().parents:
        raise UserError(f"--out {out} would replace the run directory {run_dir}; choose a new directory")
    if not real.exists() or not any(real.iterdir()):
        return
    files = _marker_files(real)
    if files is None:
        raise UserError(f"--out {out} holds files and no {MARKER}, so it is not an export made by this command "
                        "(--overwrite only replaces those); choose another --out, or empty it yourself")
    other = sorted(p.name for p in real.iterdir()
                   if p.name != MARKER and (p.name not in files or p.is_symlink() or not p.is_file()))
    if other:
        raise UserError(f"--out {out} holds a previous export plus files it did not write ({', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}); move them out or choose another --out")
    if not overwrite:
        raise UserError(f"{out} holds a previous export; pass --overwrite to replace it or choose another --out")


def _write_marker(tmp: Path, run_dir: Path, ckpt_path: Path, step: Any, kind: str) -> None:
    files = sorted(p.name for p in tmp.iterdir())
    info = {"tool": _TOOL, "format": kind, "run": str(run_dir.resolve()), "checkpoint": str(ckpt_path.resolve()),
            "step": step, "files": files}
    (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`, moving a previous export (checked by check_out) aside first and
    back should the rename fail, so `out` is never left half old, half new."""
    old = None
    try:
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
    except OSError as e:
        if old is not None and not out.exists():
            old.rename(out)
        raise UserError(f"cannot write --out {out} ({e.strerror or e}); choose another --out") from None
    if old is not None:
        shutil.rmtree(old)


def _write_tokenizer(out: Path, name: str | None, mcfg: ModelConfig) -> None:
    """Tokenizer files beside the weights when the run's tokenizer is known and GPT-2; otherwise say why not."""
    from pretrain.data.hf_tokenizer import write_hf_tokenizer

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


def export(run_dir: Path, out: Path, checkpoint: str = DEFAULT_CHECKPOINT, dtype: str | None = None,
           overwrite: bool = False, tokenizer: str | None = None, license: str = DEFAULT_LICENSE) -> str:
    """Write `out` from a run's checkpoint; returns "llama" or our format's name."""
    from safetensors.torch import save_file

    from pretrain.export_hub import generation_config, hub_dataset, model_card, run_metrics
    from pretrain.export_remote import remote_config, to_remote, write_remote_code
    from pretrain.llama import llama_config, llama_incompatibility, to_llama

    ckpt_path = find_checkpoint(run_dir, checkpoint)
    check_out(run_dir, out, overwrite)
    out = out.resolve()  # through a symlink: the export lands where it points, the link stays
    ckpt = open_checkpoint(ckpt_path)  # the weights back the config: nothing huge gets allocated
    state, mcfg, weights = ckpt.state, ckpt.model_config, ckpt.weights
    to = torch_dtype(dtype) if dtype else weights["wte.weight"].dtype
    info = _dataset_info(state.get("train_config", {}))
    if tokenizer:
        info["tokenizer"] = tokenizer
    why = llama_incompatibility(mcfg)
    eot = info.get("eot_id")
    if why is None:
        tensors = to_llama(weights, mcfg)
        config = llama_config(mcfg, to, eot)
    else:
        tensors = to_remote(weights, mcfg)
        ids = {} if eot is None else {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
        config = remote_config(mcfg, to, why, {**info, **ids})
    readme = model_card(run_dir.name, mcfg, run_metrics(run_dir, ckpt_path, state), remote=why is not None,
                        why=why, checkpoint=ckpt_path.name, tokenizer=info.get("tokenizer", "unknown"),
                        dataset=hub_dataset(state.get("train_config", {})), license=license)
    tensors = {k: v.to(to) if v.is_floating_point() else v for k, v in tensors.items()}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    tmp = None
    try:
        # Write beside the target, then rename: an interrupted export never leaves a half-written dir.
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        _reserve(tmp / "model.safetensors", need)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = generation_config(eot, remote=why is not None)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "README.md").write_text(readme)
        if why is not None:
            write_remote_code(tmp)
        _write_tokenizer(tmp, info.get("tokenizer"), mcfg)
        _write_marker(tmp, run_dir, ckpt_path, state.get("step"), "llama" if why is None else OUR_FORMAT)
        _open_permissions(tmp)
        _replace(tmp, out)
    except OSError as e:
        raise _write_error(e, out, need) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return "llama" if why is None else OUR_FORMAT


def _reserve(path: Path, size: int) -> None:
    """Claim the weights' bytes on disk first: a full disk then raises OSError(ENOSPC) here, while safetensors
    would report it as its own SafetensorError, which carries no errno."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no fallocate here: just write
            raise
    finally:
        os.close(fd)


def _write_error(e: OSError, out: Path, need: int) -> UserError:
    """A failed export write in the user's words, decided by errno."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the disk of {out} (the weights need {need / 2**20:,.0f} MiB); free disk "
                         "space or choose another --out")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write --out {out}: {os.strerror(e.errno)}; choose a writable --out")
    return UserError(f"cannot write --out {out} ({e.strerror or e}); choose another --out")


def load_exported(path: str | Path) -> GPT:
    """A GPT from a directory written by `export` in our own format (bottleneck / decoupled runs)."""
    from safetensors.torch import load_file

    from model import GPT
    from pretrain.export_remote import from_remote

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("format") != OUR_FORMAT:
        raise UserError(f"{path} is not in our export format; Llama dirs load with transformers")
    model = GPT(ModelConfig.from_dict(config["model_config"]))
    state = from_remote(load_file(str(path / "model.safetensors")))
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pretrain.export",
                       description=f"Export a run to a Hugging Face dir (Llama for {LLAMA_VARIANTS}, a "
                                   "trust_remote_code model otherwise), optionally pushed to the Hub.")
    p.add_argument("run_dir", help="run directory, runs/<name>")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=CHECKPOINT_HELP)
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None,
                   help="tensor dtype to write (default: as trained)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer whose Hugging Face files to include (default: the run dataset's, e.g. gpt2)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace a previous export in --out: a directory holding this command's {MARKER} and "
                        "nothing else (never a run dir or a directory holding other files)")
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help="license in the model card's metadata (a Hub license id, e.g. apache-2.0, mit, other)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the export to this Hub model repo (NAMESPACE/NAME; created if missing; "
                        "needs `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.push_to_hub:
        from pretrain.export_hub import check_repo_id

        check_repo_id(a.push_to_hub)
    kind = export(Path(a.run_dir), Path(a.out), a.checkpoint, a.dtype, a.overwrite, a.tokenizer, a.license)
    if kind == "llama":
        print(f"wrote {a.out}: LlamaForCausalLM.from_pretrained({str(a.out)!r}) loads it")
    else:
        print(f"wrote {a.out}: Llama cannot hold this attention variant (see its README.md); "
              f"AutoModelForCausalLM.from_pretrained({str(a.out)!r}, trust_remote_code=True) loads it")
    if a.push_to_hub:
        from pretrain.export_hub import push_to_hub

        url = push_to_hub(Path(a.out).resolve(), a.push_to_hub, MARKER, a.private)
        print(f"uploaded {a.out} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(script_exit_code(main))
