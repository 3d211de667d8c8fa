"""Test environment: offline, caches in a temp dir, few threads (CI has 2 cores).

Test data comes from the repo alone: GPT-2 ranks ship in pretrain/data/assets, and the raw texts are the
documents of the embedded data/sample dataset decoded back to text (public domain, see its PROVENANCE.md),
so a clone with nothing beside it and no network runs every test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_RANKS = ROOT / "pretrain" / "data" / "assets" / "gpt2.tiktoken"
SAMPLE_DATASET = ROOT / "data" / "sample"

_cache = Path(tempfile.mkdtemp(prefix="pretrain-test-cache-"))
# The cache every process of one test session shares (both xdist workers and the processes they start): the plan's
# memory estimates depend only on their inputs and the code (pretrain/plan/estimate_cache.py keys them exactly), so
# the same 1b plan is not estimated cold once per worker. Made by the first process (the xdist controller, or pytest
# alone) before the workers start, passed to them by environment, removed by that process at the end
# (pytest_unconfigure). A test that needs a cold cache sets its own directory (tests/test_plan_cache.py). It starts
# with the estimates of tests/data/suite_estimates.json while they hold for this checkout (suite_estimates.py).
# inductor's cache lives there too: a cold --compile of a tiny model is ~25 CPU-s, most of it g++ building one .so per
# kernel and the precompiled header (~1 s each), and a kernel or graph already built by the other worker is then
# loaded instead. Dynamo still traces every frame and counts it (the graph counts tests assert are the same warm or
# cold); the one test that needs a compile to be slow gives its trainer an empty cache (test_stop_latency.py).
_SHARED_ENV = "PRETRAIN_TEST_SHARED_CACHE"
_shared_owner = _SHARED_ENV not in os.environ
if _shared_owner:
    os.environ[_SHARED_ENV] = tempfile.mkdtemp(prefix="pretrain-test-shared-")
_shared = Path(os.environ[_SHARED_ENV])
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
    "TORCHINDUCTOR_CACHE_DIR": str(_shared / "inductor"),
    "PRETRAIN_CACHE_DIR": str(_shared / "pretrain"),  # the plan's memory estimates: never the user's cache
    "PRETRAIN_KERNELS_DIR": str(_shared / "kernels"),  # model/cpu_kernels.py's library: built once a session
    "MPLBACKEND": "Agg",
    # One thread: OpenMP barriers spin badly when the other core is busy (subprocess runs, CI).
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ[key] = value

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pretrain.train.host_blas import configure_host_blas, with_mkl_on_amd  # noqa: E402

# Every process of the session multiplies as the trainer does (pretrain/train/host_blas.py: MKL's optimized paths on
# an AMD CPU): this one, before torch loads, and every process it starts (preloaded), so a run in a test and one in
# a child agree bit for bit.
os.environ.update(with_mkl_on_amd(os.environ))
configure_host_blas()

import suite_estimates  # noqa: E402
import zygote  # noqa: E402

# The estimates the suite's plans need, from the repo, while they hold for this checkout (suite_estimates.py).
_preloaded = suite_estimates.preload() if _shared_owner else (0, None)
zygote.install()  # python commands tests start are forked from an interpreter with torch imported (zygote.py)


import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_terminal_summary(terminalreporter) -> None:
    if not _shared_owner:
        return
    n, reason = _preloaded
    traced = suite_estimates.traced(_shared / "pretrain") - n
    line = f"plan estimates: {n} from {suite_estimates.FILE.relative_to(ROOT)}, {traced} traced"
    if reason is not None:
        line += f" (its estimates not used: {reason})"
    if reason is not None and not os.environ.get(suite_estimates.SAVE_ENV):
        line += f"; to keep them: {suite_estimates.SAVE_ENV}=1 make test"
    terminalreporter.write_line(line)


def pytest_unconfigure(config) -> None:
    if _shared_owner:
        if os.environ.get(suite_estimates.SAVE_ENV):
            n = suite_estimates.save(_shared / "pretrain")
            print(f"{suite_estimates.FILE.relative_to(ROOT)}: {n} estimates written")
        shutil.rmtree(_shared, ignore_errors=True)


# The files with the suite's longest tests, longest first (per-file sums of a whole run's --durations=0 on 2 cores:
# /work/wt/durations_start.txt, session of issue 20.9). `make test` hands whole files to the two workers in
# collection order (--dist loadfile: a file's module fixtures are built once), so these go first and the short files
# fill in the end: a long file started last would run alone while the other worker idles. A file missing here only
# runs later; nothing depends on the order (only speed: test_gpu_check.py's first compile builds the inductor kernels
# of COMPILED_SHAPE that test_probe.py's compiled step, a file later on the other worker, and the compiled run of
# test_compiled_loss.py, at the end, load from the shared cache).
RUN_FIRST = ("test_gpu_check.py", "test_plan_fit.py", "test_tier_cards.py", "test_optim8bit.py", "test_chaos.py",
             "test_probe.py", "test_memory.py", "test_plan_fast.py", "test_stop_latency.py",
             "test_demo.py", "test_launch.py", "test_launch_run.py", "test_compare_instruments.py", "test_notebook.py",
             "test_paper_comparison.py", "test_plan_cache.py", "test_selective_checkpoint.py", "test_distributed.py",
             "test_bad_input.py", "test_float8.py", "test_compare_footing.py", "test_mirror.py", "test_speed_paths.py",
             "test_console_commands.py", "test_data_damage.py", "test_launch_identity.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@functools.cache
def _sample_docs() -> tuple[str, ...]:
    """The ~2,950 documents of data/sample as text: its token stream split at EOT and decoded."""
    from pretrain.data.tokenizer import resolve_tokenizer

    enc = resolve_tokenizer("gpt2").build()
    stream = np.concatenate([np.load(SAMPLE_DATASET / f) for f in ("val_000000.npy", "train_000000.npy")])
    cuts = np.flatnonzero(stream == 50256).tolist() + [len(stream)]
    return tuple(enc.decode(stream[a + 1: b].tolist()) for a, b in zip(cuts, cuts[1:]))


def sample_texts(limit_chars: int | None = None) -> list[str]:
    """Documents of the embedded sample, in order; with limit_chars, just enough to reach it."""
    texts: list[str] = []
    total = 0
    for t in _sample_docs():
        texts.append(t)
        total += len(t)
        if limit_chars is not None and total >= limit_chars:
            break
    return texts


@functools.cache
def sample_parquet_dir() -> Path:
    """The sample's documents as two parquet files in FineWeb-Edu's layout (text, id, url; 6 row groups
    each), written once per session: what prepare tests read as a local or streamed source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _cache / "fineweb-sample" / "sample" / "10BT"
    d.mkdir(parents=True, exist_ok=True)
    docs = _sample_docs()
    half = len(docs) // 2
    for k, part in enumerate((docs[:half], docs[half:])):
        ids = [f"<urn:sample:{k}:{i}>" for i in range(len(part))]
        table = pa.table({"text": list(part), "id": ids, "url": [f"https://example.org/{i}" for i in ids]})
        pq.write_table(table, d / f"{k:03d}_00000.parquet", row_group_size=-(-len(part) // 6))
    return d


def write_legacy_dataset(path: Path, tokens: np.ndarray, vocab_size: int, eot_id: int, tokenizer: str) -> Path:
    """The older single-file layout: x.npy + x.npy.meta (validation carved with --val-frac)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tokens.astype(np.uint16 if vocab_size <= 2**16 else np.uint32))
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot_id}
    Path(str(path) + ".meta").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    """~600K byte-level tokens (vocab 256) of the sample texts: fast to train on, for loop mechanics."""
    text = "\x00".join(sample_texts(600_000))
    tokens = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
    return write_legacy_dataset(tmp_path_factory.mktemp("bytes") / "bytes.npy", tokens, 256, 0, "bytes")


@pytest.fixture(scope="session")
def gpt2_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(GPT2_RANKS))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="session")
def gpt2_data(tmp_path_factory, gpt2_encoding) -> Path:
    """~400K GPT-2 tokens of the sample texts, each document preceded by EOT."""
    docs = gpt2_encoding.encode_ordinary_batch(sample_texts(1_600_000))
    tokens = np.concatenate([np.array([50256] + d, dtype=np.uint16) for d in docs])
    return write_legacy_dataset(tmp_path_factory.mktemp("gpt2") / "gpt2.npy", tokens, 50257, 50256, "gpt2")


@pytest.fixture(scope="session")
def made_bytes(tmp_path_factory) -> Path:
    """~200K byte-level tokens of made-up sentences: needs nothing beside the repo (CI runs a bare clone)."""
    rng = np.random.default_rng(0)
    words = ("the a one old new small great king land water light day night man god people house "
             "said came went made saw gave took was is are and of to in for with from upon").split()
    lines = [" ".join(rng.choice(words, size=rng.integers(5, 14))).capitalize() + "." for _ in range(5000)]
    tokens = np.frombuffer("\n".join(lines).encode(), dtype=np.uint8)
    return write_legacy_dataset(tmp_path_factory.mktemp("made") / "bytes.npy", tokens, 256, 0, "bytes")


def cli_exit(main, argv: list[str]) -> int:
    """The exit code of a CLI's main run in this process as its script runs it (pretrain.errors.run_cli: a UserError
    is one line and 2), an argparse SystemExit taken as its code, as the interpreter takes it."""
    from pretrain.errors import run_cli

    try:
        return run_cli(main, argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replace `owner.name` by a pass-through that records each call's positional arguments; returns the record."""
    calls: list = []
    real = getattr(owner, name)

    def count(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, count)
    return calls


# The one compiled shape of the suite: the model and first phase of `make gpu-check`'s cpu tier (the tiny preset's
# decoupled variant, 8 x 128 tokens; tests/test_gpu_check.py), so the other compiled runs (test_probe.py,
# test_compiled_loss.py's, with --bf16-weight-cache) load inductor's kernels for it from the session's shared cache
# instead of building their own (~1 CPU-s of g++ per kernel, ~20 kernels a shape). RUN_FIRST starts test_gpu_check.py
# first and these files after its first compile.
COMPILED_SHAPE = ["--size", "tiny", "--attn", "decoupled", "--batch-size", "8", "--train-seq-len", "128"]
COMPILED_SHAPE_PLAN = ["--vram", "cpu", "--variant", "decoupled", "--seq-schedule", "128@0"]  # the same, planned


def trainers_in_process(monkeypatch) -> None:
    """The launcher's `--run` trains in this process instead of a child (the trainer's command without "python
    train_v29.py", through the script's exit-code wiring): for tests of what a launched run does, not of the
    process (tests/test_launch_run.py forwards SIGTERM to a real child; test_launch.py pins run_trainer's command)."""
    from pretrain.plan import launch
    from pretrain.train.loop import main

    monkeypatch.setattr(launch, "run_trainer", lambda command: cli_exit(main, command[2:]))


@pytest.fixture
def untraced_plan_memory(monkeypatch) -> None:
    """The plan's memory estimates from the model's size instead of a fake-tensor trace (0.3-4 CPU-s each, several
    per plan): for tests of what a plan decides other than memory, on models that fit their tier by far either way.
    Nothing is stored in the session's estimate cache. What the estimates are: tests/test_memory.py,
    test_plan_fit.py, test_shipped_estimates.py; a plan that does not fit: test_launch.py's verdict test."""
    from model import ModelConfig
    from pretrain.plan import memory
    from pretrain.train.config import TrainConfig

    def from_size(model_json: str, cfg_json: str, seq_len: int, work=None) -> memory.MemoryEstimate:
        mcfg, cfg = ModelConfig.from_dict(json.loads(model_json)), TrainConfig.from_dict(json.loads(cfg_json))
        n = mcfg.num_params()
        params = n * (4 if cfg.param_dtype == "fp32" else 2)
        grads = 0 if work is not None else params
        optimizer = 8 * n
        activations = 64 * cfg.batch_size * max(seq_len, 1) * mcfg.d_model * mcfg.n_layer
        parts = {"params": params, "optimizer": optimizer, "grads": grads, "activations_and_temporaries": activations}
        return memory.MemoryEstimate(sum(parts.values()), params, grads, optimizer, parts)

    monkeypatch.setattr(memory, "_cached", from_size)


# The smallest trainer flags: one layer, no eval between steps; what a test of bad input or a refused resume needs.
TINY_TRAIN = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "1", "--d-ff", "128",
              "--block-size", "64", "--batch-size", "2", "--train-seq-len", "32", "--val-frac", "0.05",
              "--eval-iters", "1", "--device", "cpu", "--live", "off", "--save-minutes", "0", "--eval-every", "0"]


@pytest.fixture(scope="session")
def world(tmp_path_factory, byte_data) -> dict[str, Path]:
    """Things a user might point a CLI at: a finished 2-step run, a non-dataset dir, broken datasets. Tests only
    read it (the bad-input table asserts that nothing in it changed)."""
    from pretrain.train.config import parse_config
    from pretrain.train.loop import train

    base = tmp_path_factory.mktemp("bad")
    run = base / "runs" / "done"
    train(parse_config(["--data", str(byte_data), "--out-dir", str(run), "--steps", "2", *TINY_TRAIN]))
    notes = base / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("user file")
    broken = base / "broken_manifest"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    mixed = base / "mixed"
    mixed.mkdir()
    np.save(mixed / "train_a.npy", np.arange(1000, dtype=np.uint16))
    np.save(mixed / "train_b.npy", np.arange(1000, dtype=np.uint32))
    for f in ("train_a.npy", "train_b.npy"):
        (mixed / (f + ".meta")).write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256, "eot_id": 0}))
    small = base / "small.npy"
    np.save(small, np.arange(40, dtype=np.uint16) % 256)
    Path(str(small) + ".meta").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256, "eot_id": 0}))
    hf_out = base / "hf_out"
    hf_out.mkdir()
    (hf_out / "config.json").write_text("{}")
    return {"base": base, "run": run, "notes": notes, "broken": broken, "mixed": mixed, "small": small,
            "data": byte_data, "hf_out": hf_out}


@pytest.fixture(scope="session")
def chaos_reference(byte_data, tmp_path_factory) -> dict:
    """One uninterrupted run of the chaos configuration (tests/chaos_run.py), shared by the chaos tests."""
    from chaos_run import reference_run

    return reference_run(byte_data, tmp_path_factory.mktemp("reference") / "run")


def _unrendered_png(fig, path) -> Path:
    """plots.save_png without the drawing: the file is written (empty), the figure is not rasterized."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def rendered_plots() -> None:
    """Ask for this in a test whose in-process trainer runs must draw real PNGs (see _trainer_plots_unrendered)."""


@pytest.fixture(autouse=True)
def _trainer_plots_unrendered(request, monkeypatch) -> None:
    """The trainer redraws its four plots at every eval and at the end: ~0.7 s of CPU each time, mostly
    matplotlib's layout and rasterizing, in every in-process trainer run of the suite. Here an in-process trainer
    still builds every figure from train.jsonl (plots.write_plots runs whole) and writes each file, but does not
    rasterize it. Real PNGs: plots.write_plots called directly (test_track.py), compare's plots, trainers run as a
    process or in a module/session fixture (set up before this fixture) unless it calls plots_unrendered, and tests
    that ask for rendered_plots."""
    if "rendered_plots" not in request.fixturenames:
        plots_unrendered(monkeypatch)


def plots_unrendered(monkeypatch) -> None:
    """In-process trainers build their plots but do not rasterize them (see _trainer_plots_unrendered); for a module
    or session fixture that trains runs whose PNGs no test looks at: `with pytest.MonkeyPatch.context() as m:
    plots_unrendered(m)`."""
    plots = sys.modules.get("pretrain.track.plots")
    if plots is None:
        return
    real_write = plots.write_plots

    def write_unrendered(run_dir):
        with monkeypatch.context() as m:
            m.setattr(plots, "save_png", _unrendered_png)
            return real_write(run_dir)

    # Wherever the trainer imported write_plots by name (pretrain/train/loop.py today).
    for name, module in list(sys.modules.items()):
        if name.startswith("pretrain.train") and getattr(module, "write_plots", None) is real_write:
            monkeypatch.setattr(module, "write_plots", write_unrendered)


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Op for op, a timeline is reproducible only without the cycle collector freeing tensors at random ops."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()
