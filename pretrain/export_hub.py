"""What makes an export ready for the Hugging Face Hub: the model card (YAML metadata + usage), generation_config.json,
and `--push-to-hub REPO` (huggingface_hub's create_repo + upload_folder of the export, minus our marker file).

The card's metadata is huggingface_hub's ModelCardData rendered to YAML: license, library_name, pipeline_tag,
tags, datasets (the Hub dataset the run's data was prepared from, when it was one), and the run's step, tokens
and validation loss at the exported checkpoint (read from train.jsonl, or best.pt's own best_val).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model import ModelConfig
from pretrain.errors import UserError

DEFAULT_LICENSE = "apache-2.0"
GENERATE_TEMPERATURE = 0.8  # python -m pretrain.generate's default, so both sample alike


def run_metrics(run_dir: Path, ckpt_path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """step, tokens and validation loss of the exported checkpoint (val_loss None when never measured there)."""
    from pretrain.track.runlog import read_jsonl

    step = state.get("step")
    val = None
    try:
        evals = [e for e in read_jsonl(run_dir / "train.jsonl") if e.get("type") == "eval" and e.get("step") == step]
        val = evals[-1].get("loss") if evals else None
    except (OSError, ValueError):
        pass  # no log beside the checkpoint: best.pt still knows its own loss
    if val is None and ckpt_path.name == "best.pt":
        val = state.get("best_val")
    return {"step": step, "tokens": state.get("tokens"), "val_loss": float(val) if val is not None else None}


def hub_dataset(train_config: dict[str, Any]) -> str | None:
    """The Hub dataset id the run's data was prepared from (manifest source kind "hub"), else None."""
    try:
        manifest = json.loads((Path(train_config.get("data", "")) / "manifest.json").read_text())
        source = manifest.get("source") or {}
        return source.get("path") if source.get("kind") == "hub" else None
    except (OSError, ValueError, AttributeError):
        return None


def generation_config(eot_id: int | None, remote: bool) -> dict[str, Any]:
    """generation_config.json: sample as `python -m pretrain.generate` does, stop and pad at the EOT token."""
    cfg: dict[str, Any] = {"do_sample": True, "temperature": GENERATE_TEMPERATURE}
    if eot_id is not None:
        cfg |= {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    if remote:
        cfg["use_cache"] = False  # the remote-code wrapper recomputes the context each step
    return cfg


def lm_eval_command(where: str, remote: bool) -> str:
    """The lm-eval-harness line that scores this export (a dir or a Hub repo id)."""
    args = f"pretrained={where}" + (",trust_remote_code=True" if remote else "")
    return f"lm_eval --model hf --model_args {args} --tasks hellaswag,arc_easy --batch_size 1"


def model_card(name: str, mcfg: ModelConfig, metrics: dict[str, Any], *, remote: bool, why: str | None,
               checkpoint: str, tokenizer: str, dataset: str | None, license: str) -> str:
    """README.md: YAML metadata the Hub reads, then what the model is and how to load, sample and score it."""
    from huggingface_hub import EvalResult, ModelCardData

    tokens, val, step = metrics["tokens"], metrics["val_loss"], metrics["step"]
    evals = None
    if val is not None:
        evals = [EvalResult(task_type="text-generation", dataset_type=dataset or "custom",
                            dataset_name=dataset or "held-out validation split", metric_type="loss",
                            metric_value=round(val, 4), metric_name="validation loss")]
    data = ModelCardData(license=license, library_name="transformers", pipeline_tag="text-generation",
                         tags=["pretrain", f"attn-{mcfg.attn}", *(["custom_code"] if remote else [])],
                         datasets=[dataset] if dataset else None, model_name=name, eval_results=evals,
                         training_step=step, training_tokens=tokens, val_loss=val)
    trust = ", trust_remote_code=True" if remote else ""
    what = (f"This run uses {mcfg.attn} attention: {why}. `LlamaForCausalLM` (or any stock architecture) cannot "
            "hold these weights, so the export carries the model's own code (model/*.py, unchanged, plus "
            "`modeling_pretrain.py`); transformers runs it with `trust_remote_code=True`." if remote else
            "A Llama-architecture export: `LlamaForCausalLM` loads it and its logits match the trained model.")
    measured = f"validation loss {val:.4f}" if val is not None else "validation loss not measured at this step"
    tok_text = f"{tokens:,}" if isinstance(tokens, int) else "unknown"
    return f"""---
{data.to_yaml()}
---

# {name}

A {mcfg.num_params():,}-parameter decoder ({mcfg.n_layer} layers, d_model {mcfg.d_model}, {mcfg.n_head} heads,
context {mcfg.block_size}) pretrained from scratch with `train_v29.py`: step {step}, {tok_text} tokens,
{measured} (checkpoint `{checkpoint}`). Tokenizer: {tokenizer}.

{what}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("<this repo>")
model = AutoModelForCausalLM.from_pretrained("<this repo>"{trust})
out = model.generate(**tok("In the beginning", return_tensors="pt"), max_new_tokens=40)  # generation_config.json
print(tok.decode(out[0]))
```

Score it with lm-eval-harness (`pip install lm-eval`):

    {lm_eval_command("<this repo>", remote)}
"""


# ------------------------------------------------------------------------------------------------ push
def check_repo_id(repo: str) -> None:
    """Refuse a malformed --push-to-hub id before anything is exported."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError(f"--push-to-hub {repo!r} is not a Hub repo id ({e}); use NAMESPACE/NAME") from None


def upload_files(out: Path, marker: str) -> list[str]:
    """The files --push-to-hub sends: the whole export but our marker (it names local paths)."""
    return sorted(p.name for p in out.iterdir() if p.name != marker)


def push_to_hub(out: Path, repo: str, marker: str, private: bool = False) -> str:
    """Create `repo` if needed and upload `out` into it; the repo's URL. Offline: one line, nothing sent."""
    from huggingface_hub import HfApi, constants

    fallback = f"hf upload {repo} {out} --exclude {marker}"
    if constants.is_offline_mode():
        raise UserError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so nothing was uploaded; the export is in "
                        f"{out}: with network, run `{fallback}`")
    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(out), ignore_patterns=[marker],
                          commit_message=f"Upload {out.name} (python -m pretrain.export)")
    except Exception as e:  # noqa: BLE001 - auth, network and permission failures come as many types
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--push-to-hub {repo} failed ({why}); log in with `hf auth login` (a write token) and "
                        f"retry with `{fallback}`; the export is in {out}") from None
    return str(url)
