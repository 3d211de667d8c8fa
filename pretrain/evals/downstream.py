"""Downstream accuracy: HellaSwag-style multiple choice scored by completion likelihood.

    python -m pretrain.evals.downstream runs/<name> --hellaswag items.jsonl [--checkpoint auto|best|last|PATH]
    python -m pretrain.evals.downstream runs/<name> --hellaswag hf          # Rowan/hellaswag validation

Each item is a context and N candidate endings, one of them right. Every ending is appended to the
context and scored by the model's log-likelihood of the ending's tokens only: `acc` picks the highest
sum, `acc_norm` the highest mean per token (long endings are not penalised for their length). This is
how HellaSwag is scored for base models that cannot follow instructions. A local jsonl holds one item a
line: {"ctx": "...", "endings": ["...", ...], "label": 0} (HellaSwag's own field names; label may be a
string, as in the HF dataset).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.errors import ArgumentParser, UserError, script_exit_code
from pretrain.stats import binomial_se
from pretrain.track.progress import tracked

if TYPE_CHECKING:
    import torch
# torch (and lengths.token_losses, which needs it) are imported where used, so --help answers without them.

HF_NAME = "Rowan/hellaswag"
MC_ROWS = 4  # endings scored in one forward at most (HellaSwag's count): bounds memory for any item file


@dataclass
class MCItem:
    """One multiple-choice question."""

    context: str
    endings: list[str]
    label: int


def _item(obj: Any, where: str) -> MCItem:
    try:
        endings = [str(e) for e in obj["endings"]]
        label = int(obj["label"])
        context = str(obj["ctx"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: expected an object with ctx, endings (list) and label (int); fix that line "
                        "or regenerate the file") from None
    if len(endings) < 2 or not 0 <= label < len(endings):
        raise UserError(f"{where}: needs >= 2 endings and 0 <= label < {len(endings)}; fix that item")
    return MCItem(context, endings, label)


def load_items(spec: str, limit: int = 0) -> list[MCItem]:
    """Items from a local jsonl, or from the HF dataset when spec is "hf" (needs the network or its cache)."""
    if spec == "hf":
        try:
            from datasets import load_dataset

            rows: Any = load_dataset(HF_NAME, split="validation")
        except Exception as e:  # noqa: BLE001 - offline, no cache, hub down: all one fix
            raise UserError(f"could not load {HF_NAME} ({type(e).__name__}); offline, pass --hellaswag PATH "
                            "to a local jsonl (ctx, endings, label per line)") from None
        items = [_item(r, f"{HF_NAME} row {i}") for i, r in enumerate(rows) if not limit or i < limit]
        return items
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--hellaswag {spec}: no such file; pass a jsonl of {{ctx, endings, label}} items, "
                        "or 'hf' to download HellaSwag")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"--hellaswag {spec} line {n} is not JSON; fix or remove that line") from None
        items.append(_item(obj, f"--hellaswag {spec} line {n}"))
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError(f"--hellaswag {spec} holds no items; write one JSON object per line")
    return items


def ending_loglik(model: torch.nn.Module, context: list[int], endings: list[list[int]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean per token) log-likelihood of each ending after `context`, in float64 sums.

    Rows longer than the model's block are cut from the left (the context's start), never in the ending. At most
    MC_ROWS rows go through the model at once, and their log-probabilities are taken a slice of logits at a time
    (lengths.token_losses), so memory stays that of a small no_grad forward whatever the item file holds.
    """
    import torch

    with torch.no_grad():
        return _ending_loglik(model, context, endings, device)


def _ending_loglik(model: torch.nn.Module, context: list[int], endings: list[list[int]],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    from pretrain.evals.lengths import token_losses

    block = model.config.block_size
    rows, masks = [], []
    for end in endings:
        end = end[-block + 1:] if len(end) >= block else end
        row = (context + end)[-block:]
        rows.append(row)
        masks.append([0] * (len(row) - len(end)) + [1] * len(end))
    totals, means = [], []
    for g in range(0, len(rows), MC_ROWS):
        group, group_masks = rows[g:g + MC_ROWS], masks[g:g + MC_ROWS]
        width = max(len(r) for r in group)
        idx = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for i, (r, m) in enumerate(zip(group, group_masks, strict=True)):
            idx[i, : len(r)] = torch.tensor(r)
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        idx, mask = idx.to(device), mask.to(device)
        # Token t is predicted by position t-1: score only the ending's tokens.
        token_lp = -token_losses(model, idx[:, :-1], idx[:, 1:]) * mask[:, 1:]
        total = token_lp.double().sum(dim=1)
        totals.append(total)
        means.append(total / mask[:, 1:].sum(dim=1).clamp(min=1))
    return torch.cat(totals), torch.cat(means)


def score(model: torch.nn.Module, codec: Any, items: Sequence[MCItem], device: torch.device,
          autocast: Any = None, show_progress: bool = True) -> dict[str, Any]:
    """Accuracy by summed (acc) and length-normalised (acc_norm) ending log-likelihood, plus chance level.
    A long set reports its progress on stderr (pretrain/track/progress.py)."""
    was_training = model.training
    model.eval()
    right_sum = right_norm = 0
    try:
        for item in tracked(items, "downstream", "items", show=show_progress):
            ctx = codec.encode(item.context)
            ends = [codec.encode(" " + e) for e in item.endings]  # endings continue the sentence after a space
            if autocast is not None:
                with autocast:
                    total, mean = ending_loglik(model, ctx, ends, device)
            else:
                total, mean = ending_loglik(model, ctx, ends, device)
            right_sum += int(total.argmax().item() == item.label)
            right_norm += int(mean.argmax().item() == item.label)
    finally:
        model.train(was_training)
    n = len(items)
    chance = sum(1 / len(i.endings) for i in items) / max(n, 1)
    acc, acc_norm = right_sum / max(n, 1), right_norm / max(n, 1)
    # Binomial standard errors: 0.30 on 60 items is 0.30 ± 0.06, which a reader must see next to it.
    return {"acc": acc, "acc_norm": acc_norm, "n": n, "chance": chance,
            "acc_se": binomial_se(acc, n), "acc_norm_se": binomial_se(acc_norm, n)}


def record_in_run(run_dir: Path, result: dict[str, Any]) -> None:
    """Append the result as a `downstream` event to the run's train.jsonl, at its checkpoint's step, so
    summary-reading tools and `compare` show a standalone score as they show one taken during training."""
    from pretrain.track.runlog import JSONL_NAME

    event = {"type": "downstream", "time": round(time.time(), 3), "standalone": True, **result}
    with open(run_dir / JSONL_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    from pretrain.evals.run_model import CHECKPOINT_HELP, DEFAULT_CHECKPOINT  # lazy, as in main

    p = ArgumentParser(prog="python -m pretrain.evals.downstream",
                       description="HellaSwag-style multiple-choice accuracy of a run's checkpoint.")
    p.add_argument("run_dir", help="run directory, runs/<name>")
    p.add_argument("--hellaswag", required=True, help="jsonl of {ctx, endings, label} items, or 'hf'")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=CHECKPOINT_HELP)
    p.add_argument("--items", type=int, default=0, help="score only the first N items (0: all)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-record", action="store_true",
                   help="do not append the result to the run's train.jsonl (by default compare shows it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pretrain.evals.run_model import load_run_model

    a = build_parser().parse_args(argv)
    import torch  # after parsing: --help and flag errors answer without loading it

    items = load_items(a.hellaswag, a.items)
    model, codec, info = load_run_model(Path(a.run_dir), a.checkpoint, torch.device(a.device))
    result = score(model, codec, items, torch.device(a.device))
    task = "hellaswag" if a.hellaswag == "hf" else Path(a.hellaswag).stem  # the name the trainer records
    result |= {"checkpoint": str(info["path"]), "step": info["step"], "task": task}
    if not a.no_record:
        record_in_run(Path(a.run_dir), result)
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{a.run_dir} step {result['step']}: acc {result['acc']:.4f} ± {result['acc_se'] or 0:.4f}  "
              f"acc_norm {result['acc_norm']:.4f} ± {result['acc_norm_se'] or 0:.4f}  "
              f"(± binomial standard error, n={result['n']}, chance {result['chance']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(script_exit_code(main))
