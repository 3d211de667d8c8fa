"""The figures this research is about: validation loss against KV-cache bytes per token, per run and per KV
cache setting, as compare's second table and its scatter plot.

A variant is worth its KV saving when its point sits left of baseline without rising much. The KV bytes
are the measured ones (python -m pretrain.evals.infer_bench / compare --measure) when present, else the
formula's (bf16). Seed groups are one point with a ± sd error bar. Each measured KV setting (bf16, q8_0,
q4_0, nf4, ...) adds a point at its measured bytes per token and the run's best val loss plus the val-loss
change of decoding held-out text through that cache (pretrain/evals/kv_quality.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.track.plots import new_figure, save_png

# Flat row keys per KV setting <name>: kv[<name>] bytes/token, kv_dec[<name>] decode tok/s at the longest
# measured length, kv_val[<name>] decoded val loss, kv_dval[<name>] its change against the model's own cache.
KV_FIELDS = {"kv": "kv_bytes_per_token", "kv_val": "val_loss", "kv_dval": "val_loss_delta"}


def kv_setting_fields(infer: dict[str, Any]) -> dict[str, Any]:
    """Flat per-setting keys of an `infer` event's kv_formats (so seed groups average them like the rest)."""
    lengths = infer.get("lengths") or []
    out: dict[str, Any] = {}
    for name, figures in (infer.get("kv_formats") or {}).items():
        out |= {f"{key}[{name}]": figures.get(field) for key, field in KV_FIELDS.items()}
        out[f"kv_dec[{name}]"] = figures.get(f"decode_tok_s@{lengths[-1]}") if lengths else None
    return out


def kv_setting_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """KV settings measured in any row, in the order first seen."""
    names: list[str] = []
    for r in rows:
        names += [k[3:-1] for k in r if k.startswith("kv[") and not k.endswith("_sd") and k[3:-1] not in names]
    return names


def kv_setting_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The flat keys a seed group averages."""
    return [f"{key}[{n}]" for n in kv_setting_names(rows) for key in (*KV_FIELDS, "kv_dec")]


def _num(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    sd = row.get(f"{key}_sd")
    # A spread has no sign: "+.4f" is for the change itself, never for its ± sd.
    return format(value, fmt) + ("" if sd is None else f" ± {format(sd, fmt.lstrip('+'))} sd")


def format_kv_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per run and KV setting: bytes/token (and x the model's own cache), decode tok/s, val loss and
    its change; '' when no run has measured settings."""
    names = kv_setting_names(rows)
    if not names:
        return ""
    header = ["run", "variant", "KV cache", "B/tok", "x own", "dec tok/s", "decoded val", "Δ val"]
    table = [header]
    for r in rows:
        own = r.get("kv_measured")
        for n in names:
            b = r.get(f"kv[{n}]")
            if b is None:
                continue
            table.append([str(r["run"]), str(r.get("variant") or "-"), n, _num(r, f"kv[{n}]", ",.1f"),
                          f"{b / own:.3f}" if own else "-", _num(r, f"kv_dec[{n}]", ",.1f"),
                          _num(r, f"kv_val[{n}]", ".4f"), _num(r, f"kv_dval[{n}]", "+.4f")])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             .rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def quality_kv_points(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scatter's points: per counted run (kv bytes, best val, sd), then per measured KV setting of it
    (its bytes, best val + decoded change); "of" names the run point a setting point belongs to."""
    points: list[dict[str, Any]] = []
    for r in rows:
        kv = r.get("kv_measured") or r.get("kv_bytes_per_token")
        loss = r.get("best_val_loss")
        if kv is None or loss is None or r.get("left_out"):  # an unfinished or duplicate run is not a result
            continue
        run = {"label": f"{r['run']} ({r.get('variant') or '?'})", "tag": str(r.get("variant") or r["run"]),
               "x": kv, "y": loss, "sd": r.get("best_val_loss_sd") or 0.0, "of": None}
        points.append(run)
        for n in kv_setting_names([r]):
            b, delta = r.get(f"kv[{n}]"), r.get(f"kv_dval[{n}]")
            if b is not None and delta is not None:
                points.append({"label": n, "tag": n, "x": b, "y": loss + delta, "sd": 0.0, "of": run["label"]})
    return points


def plot_quality_vs_kv(rows: Sequence[dict[str, Any]], out_png: str | os.PathLike) -> Path:
    """Scatter of best val loss vs KV bytes/token for compare's rows, plus a point (x) per measured KV setting;
    written atomically, path returned."""
    fig, ax = new_figure("Quality vs KV cache", "KV-cache bytes per token (all layers)",
                         "best val cross-entropy loss", size=(7, 4.8))
    points = quality_kv_points(rows)
    colors: dict[str, Any] = {}
    for p in points:
        if p["of"] is None:
            bar = ax.errorbar([p["x"]], [p["y"]], yerr=[p["sd"]], fmt="o", capsize=4, label=p["label"])
            colors[p["label"]] = bar[0].get_color()
            ax.annotate(p["tag"], (p["x"], p["y"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        else:
            ax.plot([p["x"]], [p["y"]], "x", color=colors[p["of"]])
            ax.annotate(p["tag"], (p["x"], p["y"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if points:
        ax.legend(fontsize=8, title="x: KV settings (best val + decoded change)", title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run has both a val loss and KV bytes", ha="center", va="center",
                transform=ax.transAxes)
    return save_png(fig, out_png)
