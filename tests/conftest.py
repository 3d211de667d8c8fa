"""Test environment: offline, caches in a temp dir, few threads (CI has 2 cores)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
GPT2_RANKS = SHARED_DATA / "gpt2.tiktoken"
FINEWEB_SAMPLE = SHARED_DATA / "fineweb-sample" / "sample" / "10BT"

_cache = Path(tempfile.mkdtemp(prefix="pretrain-test-cache-"))
for key, value in {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HOME": str(_cache / "hf"),
    "TIKTOKEN_CACHE_DIR": str(_cache / "tiktoken"),
    "WANDB_DIR": str(_cache / "wandb"),
    "WANDB_CACHE_DIR": str(_cache / "wandb-cache"),
    "WANDB_CONFIG_DIR": str(_cache / "wandb-config"),
    "TORCHINDUCTOR_CACHE_DIR": str(_cache / "inductor"),
    "MPLBACKEND": "Agg",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
}.items():
    os.environ[key] = value

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
