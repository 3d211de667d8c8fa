"""float8 training of the block linears (torchao Float8Linear, as torchtitan does); the check that the card has it.

Each block linear (q/k/v/o projections, gate/up/down) becomes a torchao Float8Linear: its matmuls run in float8
with dynamic per-tensor scales (e4m3 forward, e5m2 gradients), its weight stays a plain fp32 (or bf16)
Parameter, so state_dict keys and tensors are those of nn.Linear: checkpoints, resume and the Llama export are
unchanged. The LM head is left alone (the chunked loss multiplies by its weight directly, and torchtitan keeps
the output projection in high precision too), and so is any linear whose dimensions float8 GEMMs cannot take
(not multiples of 16). On a card without float8 tensor cores the flag is refused; on CPU (tests) torchao
emulates the float8 matmuls, which shows the numerics but not the speed.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.errors import UserError
from pretrain.train import device as dev
from pretrain.train.config import TrainConfig

SKIP = ("lm_head",)


def _eligible(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] not in SKIP
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def float8_linears(model: nn.Module, emulate: bool) -> int:
    """Swap the model's block linears for torchao Float8Linear in place; returns how many were swapped."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # heavy: only when asked for

    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig(emulate=emulate), module_filter_fn=_eligible)
    return before - sum(type(m) is nn.Linear for m in model.modules())


def check_float8(cfg: TrainConfig, device: torch.device) -> None:
    """--float8 on a CUDA card without float8 tensor cores: one line naming the card and the fix."""
    if cfg.float8 and device.type == "cuda" and not dev.capability_has_float8(dev.compute_capability(device)):
        cap = ".".join(map(str, dev.compute_capability(device) or ()))
        need = ".".join(map(str, dev.FLOAT8_MIN_CAPABILITY))
        raise UserError(f"--float8 needs float8 tensor cores (compute capability {need}+: L4, L40S, RTX 4090, H100); "
                        f"this GPU is {cap}: drop --float8")
