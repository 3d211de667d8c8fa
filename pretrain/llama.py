"""Llama's layout, both ways: our parameter names <-> LlamaForCausalLM's, its config.json, and `--init-from`.

Our GPT is Llama's architecture (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, no biases), so the variants
registered with `llama_layout` (model/variants.py: baseline, gqa) map name for name onto `LlamaForCausalLM`; our
RoPE already pairs dim i with i + d/2 as HF's `rotate_half` does, so q/k need no permutation. The embedding is
padded to a multiple of 64 rows; the export trims it to the real vocabulary (padded rows are never predicted nor
looked up), and `--init-from` pads it back. bottleneck / decoupled attention (and null_attn / learned_temp) have
no Llama equivalent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.errors import UserError

# (our name, Llama name) per parameter; {i} is the layer index.
_NAMES = [
    ("wte.weight", "model.embed_tokens.weight"),
    ("norm_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *[(f"blocks.{{i}}.attn.{p}.weight", f"model.layers.{{i}}.self_attn.{p}.weight")
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    *[(f"blocks.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}.weight")
      for p in ("gate_proj", "up_proj", "down_proj")],
]
# Ours holds gate and up as one fused weight, rows [gate; up] (model/gpt.py SwiGLU), and q, k, v as one, rows
# [q; k; v] (model/attention.py, unless tie_qk); Llama's are separate. Llama name part -> (our fused name, index).
_FUSED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
          "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}


def _fused_widths(mcfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Row widths of each fused weight's parts, in _FUSED's index order (Llama layout: head_dim d/n_head)."""
    hd = mcfg.d_model // mcfg.n_head
    return {"gate_up_proj": (mcfg.d_ff, mcfg.d_ff),
            "qkv_proj": (mcfg.n_head * hd, mcfg.n_kv_head * hd, mcfg.n_kv_head * hd)}


def _fused_part(name: str, mcfg: ModelConfig) -> tuple[str, int] | None:
    """(our fused tensor's name, which part) for a Llama-split name of ours, else None (tie_qk keeps q apart)."""
    for part, (fused, index) in _FUSED.items():
        if f".{part}." in name and not (fused == "qkv_proj" and mcfg.tie_qk):
            return name.replace(part, fused), index
    return None


def llama_incompatibility(mcfg: ModelConfig) -> str | None:
    """Why `LlamaForCausalLM` cannot hold this model, or None when it can."""
    if not mcfg.variant.llama_layout:
        return f"attn={mcfg.attn} projects q/k/v to other widths than Llama's d_model/n_head heads"
    if mcfg.null_attn:
        return "null_attn adds a learned null key/value that Llama has no slot for"
    if mcfg.learned_temp:
        return "learned_temp scales queries per head, which Llama does not"
    return None


def _name_pairs(mcfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = []
    for ours, hf in _NAMES:
        layers = range(mcfg.n_layer) if "{i}" in ours else [None]
        pairs += [(ours.format(i=i), hf.format(i=i)) for i in layers]
    return pairs


def to_llama(state: dict[str, torch.Tensor], mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> Llama tensor names, embedding rows trimmed to the vocabulary."""
    out: dict[str, torch.Tensor] = {}
    for ours, hf in _name_pairs(mcfg):
        if ours == "lm_head.weight" and mcfg.tie_embeddings:
            continue  # tie_word_embeddings: HF ties lm_head to embed_tokens itself
        if ours.endswith("k_proj.weight") and mcfg.tie_qk:
            ours = ours.replace("k_proj", "q_proj")  # k reuses q's projection: Llama gets a copy
        fused = _fused_part(ours, mcfg)
        if fused is None:
            t = state[ours]
        else:
            t = state[fused[0]].split(_fused_widths(mcfg)[fused[0].rsplit(".", 2)[-2]], dim=0)[fused[1]]
        if ours in ("wte.weight", "lm_head.weight"):
            t = t[: mcfg.vocab_size]
        out[hf] = t.detach().cpu().contiguous().clone()
    return out


def from_llama(tensors: dict[str, torch.Tensor], mcfg: ModelConfig, pad_from: dict[str, torch.Tensor],
               source: str) -> dict[str, torch.Tensor]:
    """Llama tensors -> our state dict; padded embedding rows are taken from `pad_from` (the fresh model)."""
    state: dict[str, torch.Tensor] = {}
    for ours, hf in _name_pairs(mcfg):
        if ours == "lm_head.weight" and mcfg.tie_embeddings:
            continue
        if ours.endswith("k_proj.weight") and mcfg.tie_qk:
            q = tensors[hf.replace("k_proj", "q_proj")]
            if not torch.equal(tensors[hf], q):
                raise UserError(f"--init-from {source}: k_proj differs from q_proj but this run ties them; "
                                "drop --tie-qk")
            continue
        if hf not in tensors:
            raise UserError(f"--init-from {source}: tensor {hf} is missing; is it a complete Llama checkpoint?")
        t = tensors[hf]
        if ours in ("wte.weight", "lm_head.weight") and t.shape[0] < mcfg.padded_vocab_size:
            t = torch.cat((t, pad_from[ours][t.shape[0]:].to(t.dtype)))
        state[ours] = t
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for name in [n for n in state if _fused_part(n, mcfg)]:  # [gate; up] and [q; k; v] -> one weight each
        fused, index = _fused_part(name, mcfg)
        groups.setdefault(fused, {})[index] = state.pop(name)
    for fused, parts in groups.items():
        state[fused] = torch.cat([parts[i] for i in sorted(parts)])
    if mcfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def llama_config(mcfg: ModelConfig, dtype: torch.dtype, eot_id: int | None = None) -> dict[str, Any]:
    """config.json for LlamaForCausalLM. Both the 4.x (rope_theta, torch_dtype) and 5.x
    (rope_parameters, dtype) spellings are written; each version reads its own."""
    dtype_name = str(dtype).removeprefix("torch.")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": mcfg.vocab_size, "hidden_size": mcfg.d_model, "intermediate_size": mcfg.d_ff,
        "num_hidden_layers": mcfg.n_layer, "num_attention_heads": mcfg.n_head,
        "num_key_value_heads": mcfg.n_kv_head, "head_dim": mcfg.d_model // mcfg.n_head,
        "hidden_act": "silu", "max_position_embeddings": mcfg.block_size, "rms_norm_eps": mcfg.norm_eps,
        "rope_theta": mcfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_base},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": mcfg.tie_embeddings, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    if eot_id is not None:
        cfg |= {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    return cfg


def _read_llama_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise UserError(f"--init-from {path}: no config.json there; pass a Hugging Face Llama model dir "
                        "(e.g. one written by python -m pretrain.export)")
    try:
        hf = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--init-from {path}: config.json is unreadable ({type(e).__name__}); pass a Hugging Face "
                        "Llama model dir (e.g. one written by python -m pretrain.export)") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "llama":
        hf = hf if isinstance(hf, dict) else {}
        raise UserError(f"--init-from {path}: model_type is {hf.get('model_type')!r}, not 'llama'; "
                        "only Llama-architecture checkpoints map onto this model")
    return hf


def _attn_flags(kv: int, heads: int) -> str:
    """The trainer flags of a Llama-layout variant with `kv` key/value heads for `heads` query heads."""
    llama = [v for v in ATTENTION_VARIANTS.values() if v.llama_layout]
    if kv == heads:
        return f"--attn {next(v.name for v in llama if v.default_kv_heads(heads) == heads)}"
    return f"--attn {next(v.name for v in llama if v.kv_heads_settable)} --n-kv-head {kv}"


def check_init_from(path: str | Path, mcfg: ModelConfig) -> None:
    """Refuse, in one line naming the flags to change, a Llama dir that does not fit this run's model."""
    path = Path(path)
    why = llama_incompatibility(mcfg)
    if why is not None:
        names = [v.name for v in ATTENTION_VARIANTS.values() if v.llama_layout]
        raise UserError(f"--init-from loads Llama weights, which only {'/'.join(names)} models hold ({why}); "
                        f"use --attn {' or '.join(names)}")
    hf = _read_llama_config(path)
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise UserError(f"--init-from {path}: no model.safetensors (or index) there; save the model with "
                        "save_pretrained(..., safe_serialization=True) first")
    heads = hf.get("num_attention_heads")
    kv = hf.get("num_key_value_heads") or heads
    want = [("hidden_size", mcfg.d_model, "--d-model"), ("num_hidden_layers", mcfg.n_layer, "--n-layer"),
            ("num_attention_heads", mcfg.n_head, "--n-head"), ("intermediate_size", mcfg.d_ff, "--d-ff")]
    fixes = [f"{flag} {hf.get(key)}" for key, ours, flag in want if hf.get(key) != ours]
    if kv != mcfg.n_kv_head:
        fixes.append(_attn_flags(kv, heads))
    if hf.get("vocab_size") not in (mcfg.vocab_size, mcfg.padded_vocab_size):
        fixes.append(f"data tokenized with the checkpoint's tokenizer (vocab {hf.get('vocab_size')}, "
                     f"this data has {mcfg.vocab_size})")
    if fixes:
        raise UserError(f"--init-from {path}: the checkpoint's shape differs from this run's model; "
                        f"use {', '.join(fixes)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias")), False),
        "mlp_bias": (bool(hf.get("mlp_bias")), False),
        "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "rope_theta": (theta, mcfg.rope_base),
        "rms_norm_eps": (hf.get("rms_norm_eps", 1e-6), mcfg.norm_eps),
        "tie_word_embeddings": (bool(hf.get("tie_word_embeddings", False)), mcfg.tie_embeddings),
        "head_dim": (hf.get("head_dim") or mcfg.d_model // mcfg.n_head, mcfg.d_model // mcfg.n_head),
    }
    bad = [f"{k} {theirs} (ours {ours})" for k, (theirs, ours) in unsupported.items() if theirs != ours]
    if bad:
        raise UserError(f"--init-from {path}: this trainer's model cannot reproduce {'; '.join(bad)}; "
                        "start from a checkpoint without these differences")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"--init-from {path}: no model.safetensors (or index) there; save the model with "
                        "save_pretrained(..., safe_serialization=True) first")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(path / f)))
        except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError has no importable base class
            raise UserError(f"--init-from {path}: {f} is unreadable ({type(e).__name__}); re-export or "
                            "re-download the model") from None
    return tensors


def load_init_from(model: GPT, path: str | Path) -> None:
    """Overwrite a freshly built model's weights with a Llama checkpoint's (a new run continuing it)."""
    path = Path(path)
    mcfg = model.config
    check_init_from(path, mcfg)
    fresh = model.state_dict()
    state = from_llama(_read_tensors(path), mcfg, fresh, str(path))
    for name, t in state.items():
        if t.shape != fresh[name].shape:
            raise UserError(f"--init-from {path}: {name} has shape {tuple(t.shape)}, the model needs "
                            f"{tuple(fresh[name].shape)}")
    with torch.no_grad():
        model.load_state_dict(state)  # copies into the existing parameters: their dtype and device stay
