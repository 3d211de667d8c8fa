"""Settings kept in a file: `--config FILE` (TOML, YAML or JSON) for the trainer and the launcher, and TOML out.

A file's keys are the flags' names (`attn` or `attn-mode`); tables (`[model]`, `[optim]`, ...) only group
them. The file's values become the parser's defaults, so every flag given on the command line overrides the file.
Values are checked as the flag would check them (type, choices); an unknown key is one line naming the closest
valid one. Torch-free: the launcher and the trainer read their file before anything heavy loads.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.errors import UserError

CONFIG_NAME = "config.toml"  # what the trainer writes into its run dir; `--config RUN_DIR` reads it
FILE_FLAGS = ("config", "print_config")  # parser dests that are about the file, not settings
# What litgpt / torchtitan / HF files call some settings: named in the error when such a key is found.
OTHER_NAMES = {"learning_rate": "lr", "max_steps": "steps", "micro_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "gradient_accumulation_iters": "grad_accum",
               "max_norm": "grad_clip", "lr_warmup_steps": "warmup_steps", "warmup": "warmup_steps",
               "seq_len": "train_seq_len", "max_seq_length": "block", "output_dir": "out_dir"}


def add_file_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--config and --print-config; `what` says what --print-config prints."""
    g = parser.add_argument_group("config file")
    g.add_argument("--config", metavar="FILE", default=None,
                   help="read settings from a TOML, YAML or JSON file whose keys are the flag names (lr = 3e-4); "
                        f"flags given here override it. A run dir (or its {CONFIG_NAME}) gives that run's settings")
    g.add_argument("--print-config", action="store_true",
                   help=f"print {what} as TOML (a file --config takes) and exit without running")


def parse_with_file(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv; with --config FILE, the file's values are the defaults and argv is parsed again over them."""
    ns = parser.parse_args(argv)
    if getattr(ns, "config", None):
        parser.set_defaults(**file_values(parser, ns.config))
        ns = parser.parse_args(argv)
    return ns


def read_file(path: str) -> dict[str, Any]:
    """The file's keys and values, one level of tables flattened; a run dir stands for its config.toml."""
    p = Path(path)
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise UserError(f"--config {path}: no such file; pass a .toml, .yaml or .json file of settings "
                        f"(or a run dir holding {CONFIG_NAME})")
    kind = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}.get(p.suffix.lower(), "TOML")
    try:
        text = p.read_text(encoding="utf-8")
        if kind == "YAML":
            import yaml  # lazy: only YAML files need it

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(str(e).replace("\n", " ")) from None
        else:
            data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--config {path}: not readable as {kind} ({e}); fix the file (the error names the "
                        "line)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected key = value settings, got a {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]  # a table only groups its keys
        for k, v in items:
            flat[str(k).replace("-", "_")] = v
    return flat


def file_values(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The settings of the file at `path`, typed and checked against `parser`'s flags (UserError naming the key)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", *FILE_FLAGS)}
    # A key is any spelling of the flag without -- (a former spelling too, e.g. attn_mode for --attn-mode).
    names = {opt[2:].replace("-", "_"): a for a in actions.values() for opt in a.option_strings
             if opt.startswith("--") and not opt.startswith("--no-")} | actions
    out = {}
    for key, value in read_file(path).items():
        action = names.get(key)
        if action is None:
            close = [OTHER_NAMES[key]] if OTHER_NAMES.get(key) in actions else \
                [names[k].dest for k in difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)]
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"--config {path}: unknown key {key!r}; {hint}keys are the flag names without -- "
                            f"(see {parser.prog} --help)")
        out[action.dest] = _typed(action, key, value, path)
    return out


def _typed(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    where = f"--config {path}: {key} = {value!r}"
    if action.nargs == 0:  # an on/off flag (--x/--no-x or store_true)
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false")
        return value
    if isinstance(value, bool) or isinstance(value, dict):
        raise UserError(f"{where}: must be a {getattr(action.type, '__name__', 'str')}, as {action.option_strings[0]} "
                        "takes")
    if isinstance(value, list):  # comma-separated flags (--wandb-tags a,b, --eval-seq-lens 512,1024)
        value = ",".join(str(v) for v in value)
    if action.type is not None:
        try:
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError):
            raise UserError(f"{where}: not a valid {getattr(action.type, '__name__', 'value')}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: use one of {', '.join(map(str, action.choices))}")
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        # A JSON string is a TOML basic string, bar DEL, which TOML wants escaped.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def toml_text(sections: dict[str, dict[str, Any]], header: str = "") -> str:
    """Tables of flat key = value lines (str, int, float, bool, lists of them); None values are left out."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for name, values in sections.items():
        body = [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        if body:
            lines += ["", f"[{name}]", *body]
    return "\n".join(lines).lstrip("\n") + "\n"
