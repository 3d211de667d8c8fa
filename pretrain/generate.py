"""Generate text from a trained run, streaming tokens to the console as they are sampled.

    python -m pretrain.generate runs/<name> --prompt "Once upon a time" [--max-new-tokens 200]
        [--temperature 0.8] [--top-k 50] [--checkpoint auto|best|last|PATH] [--seed 0]
        [--kv-cache q8_0 | q4_0:residual=64 | sem=q4_0/geo=q8_0/v=q4_0 ...]

Loads best.pt (else last.pt, else the newest step_<N>.pt) of any attention variant and decodes with the model's
KV cache: in the model's dtype, or with --kv-cache in one setting of model/kv_formats.py (quantized per block,
optionally a window of newest tokens unquantized). Temperature 0 is greedy.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Sequence
from pathlib import Path

from model.kv_formats import parse_kv_setting
from pretrain.errors import ArgumentParser, UserError, script_exit_code
from pretrain.evals.run_model import CHECKPOINT_HELP, DEFAULT_CHECKPOINT, load_run_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pretrain.generate",
                       description="Stream a continuation of --prompt from a run's checkpoint.")
    p.add_argument("run_dir", help="run directory, runs/<name>")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=CHECKPOINT_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer name when the run's dataset has moved")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    p.add_argument("--kv-cache", default=None,
                   help="KV-cache format: bf16, fp16, fp32, q8_0, q4_0, nf4, with :residual=N, or per part "
                   "k=/v=/sem=/geo= joined by / (default: the model's dtype)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {a.max_new_tokens}")
    if a.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {a.temperature}")
    kv_cache = None
    if a.kv_cache is not None:
        try:
            kv_cache = parse_kv_setting(a.kv_cache)
        except ValueError as e:
            raise UserError(f"--kv-cache: {e}") from None
    import torch  # here, not at the top: --help and flag errors answer without loading it

    device = torch.device(a.device)
    model, codec, info = load_run_model(Path(a.run_dir), a.checkpoint, device, a.tokenizer)
    ids = codec.encode(a.prompt)
    if not ids:
        raise UserError("--prompt is empty; give some text to continue")
    kv_note = f", KV cache {kv_cache.name}" if kv_cache else ""
    print(f"[{info['path']}, step {info['step']}, {model.config.attn}{kv_note}]", file=sys.stderr)
    torch.manual_seed(a.seed)
    # Incremental UTF-8: a character split over several tokens is printed once all its bytes arrived.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(a.prompt)
    sys.stdout.flush()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for token in model.stream(idx, a.max_new_tokens, a.temperature, a.top_k, kv_cache):
        sys.stdout.write(decoder.decode(codec.decode_bytes([int(token)])))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(script_exit_code(main))
