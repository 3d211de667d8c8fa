"""KV-cache settings by name, without torch: which format each cached tensor is held in.

The formats (quantizers in model/kv_quant.py):

    bf16 / fp16 / fp32   values stored in that dtype
    q8_0                 int8 codes per block of 32 values, one fp16 scale (absmax / 127)
    q4_0                 4-bit codes (two per byte) per block, one fp16 scale (absmax / 7)
    nf4                  4-bit indices into the NormalFloat4 codebook per block, one fp16 scale (absmax)

A setting (`--kv-cache` of generate / infer_bench / compare --measure) names a format for the keys, values
and, for decoupled, the semantic and geometric halves of the keys apart (the original code kept the RoPE'd
geometric keys finer than the content ones), plus an optional window of newest tokens kept unquantized:

    q8_0                      every tensor q8_0
    q4_0:residual=64          q4_0, the newest 64 tokens also kept in the model's dtype
    sem=q4_0/geo=q8_0/v=q4_0  decoupled: semantic keys q4_0, geometric keys q8_0, values q4_0
    k=q8_0/v=q4_0             keys and values apart (sem/geo follow k; a part not named is bf16)

Several settings are separated by commas: bf16,q8_0,q4_0,nf4.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_FORMATS = ("bf16", "fp16", "fp32")
QUANT_FORMATS = ("q8_0", "q4_0", "nf4")
KV_FORMATS = FLOAT_FORMATS + QUANT_FORMATS
DEFAULT_KV_SETTINGS = "bf16,q8_0,q4_0,nf4"


@dataclass(frozen=True)
class KVSetting:
    """Formats of one KV cache: keys (sem/geo halves for decoupled), values, and the residual window."""

    k: str = "bf16"
    v: str = "bf16"
    sem: str | None = None  # decoupled's semantic key half; None = k
    geo: str | None = None  # decoupled's geometric key half; None = k
    residual: int = 0

    @property
    def name(self) -> str:
        parts = {"k": self.k, "v": self.v, "sem": self.sem or self.k, "geo": self.geo or self.k}
        if len(set(parts.values())) == 1:
            head = self.k
        else:
            head = "/".join(f"{key}={fmt}" for key, fmt in parts.items()
                            if key in ("k", "v") or fmt != self.k)
        return head + (f":residual={self.residual}" if self.residual else "")

    def formats(self) -> set[str]:
        return {self.k, self.v, self.sem or self.k, self.geo or self.k}

    def is_plain(self, dtype_format: str | None) -> bool:
        """True when this setting is the model's own cache: every tensor in the model's dtype (named as a
        format, e.g. "bf16"), no window."""
        return self.formats() == {dtype_format} and not self.residual


def parse_kv_setting(text: str) -> KVSetting:
    """"q4_0:residual=64", "sem=q4_0/geo=q8_0/v=q4_0", ... -> KVSetting; ValueError naming what is wrong."""
    head, _, tail = text.strip().partition(":")
    residual = 0
    if tail:
        key, _, value = tail.partition("=")
        if key.strip() != "residual" or not value.strip().isdigit():
            raise ValueError(f"kv cache {text!r}: after ':' only residual=N (tokens kept unquantized) is allowed")
        residual = int(value)
    fields: dict[str, str] = {}
    for part in head.split("/"):
        key, eq, fmt = part.strip().rpartition("=")
        key = key.strip() if eq else "all"
        fmt = fmt.strip()
        if fmt not in KV_FORMATS:
            raise ValueError(f"kv cache {text!r}: unknown format {fmt!r}; use {', '.join(KV_FORMATS)}")
        if key not in ("all", "k", "v", "sem", "geo"):
            raise ValueError(f"kv cache {text!r}: unknown part {key!r}; use k=, v=, sem=, geo= (or one format)")
        fields[key] = fmt
    base = fields.get("all", "bf16")
    k = fields.get("k", base)
    sem, geo = fields.get("sem"), fields.get("geo")
    return KVSetting(k=k, v=fields.get("v", base), sem=None if sem == k else sem, geo=None if geo == k else geo,
                     residual=residual)


def parse_kv_settings(text: str) -> list[KVSetting]:
    """Comma-separated settings, in order, duplicates dropped."""
    out: list[KVSetting] = []
    for part in text.split(","):
        if part.strip():
            s = parse_kv_setting(part)
            if s not in out:
                out.append(s)
    if not out:
        raise ValueError("no kv cache setting given; use e.g. bf16,q8_0,q4_0,nf4")
    return out
