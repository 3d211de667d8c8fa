"""--mirror cost: upload time per checkpoint against the step time, and whether steps stall while one uploads.

Trains the same run three times in-process (no mirror, a local directory, S3 on a moto server in its own process
on loopback, through s3fs) and prints, per run: checkpoint size, each upload's seconds (timed around the data
upload), the median train step (train.jsonl's step_ms) overall and for the steps right after a save (while its
upload runs), and the wall time. A step that stalled on the mirror would show in the after-save median.

    .venv/bin/python bench/mirror.py [--steps 12 --save-every 3 --d-model 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.track.runlog import read_jsonl  # noqa: E402
from pretrain.train import mirror_store  # noqa: E402
from pretrain.train.config import parse_config  # noqa: E402
from pretrain.train.loop import train  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for _ in range(100):
        try:
            fs.mkdir("bench")
            break
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    return proc


def one_run(name: str, args: list[str], work: Path, mirror: str | None, save_every: int) -> None:
    uploads: list[tuple[float, int]] = []
    original = mirror_store._upload

    def timed(fs, src, path):
        t0 = time.perf_counter()
        out = original(fs, src, path)
        if path.endswith(".pt"):
            uploads.append((time.perf_counter() - t0, out[0]))
        return out

    mirror_store._upload = timed
    out = work / name / "run"
    t0 = time.perf_counter()
    try:
        train(parse_config([*args, "--out-dir", str(out), *(["--mirror", mirror] if mirror else [])]))
    finally:
        mirror_store._upload = original
    wall = time.perf_counter() - t0
    lines = [e for e in read_jsonl(out / "train.jsonl") if e["type"] == "train" and e["step"] > 1]
    after = [e["step_ms"] for e in lines if (e["step"] - 1) % save_every == 0]
    other = [e["step_ms"] for e in lines if (e["step"] - 1) % save_every != 0]
    size = (out / "last.pt").stat().st_size
    up = ", ".join(f"{s:.2f}" for s, _ in uploads) or "-"
    print(f"{name:6s} ckpt {size / 2**20:6.1f} MiB | step ms median {statistics.median(other):7.1f} | after a save "
          f"{statistics.median(after):7.1f} (max {max(after):7.1f}) | uploads s [{up}] | wall {wall:5.1f} s",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--data", default=str(ROOT / "data" / "sample"))
    a = p.parse_args()
    args = ["--data", a.data, "--size", "tiny", "--d-model", str(a.d_model), "--batch-size", "4",
            "--train-seq-len", "128", "--steps", str(a.steps), "--save-every", str(a.save_every), "--keep-last",
            "2", "--eval-every", "0", "--log-every", "1", "--device", "cpu", "--live", "off", "--save-minutes", "0"]
    with open("/proc/cpuinfo") as f:
        isa = "avx512_bf16" if "avx512_bf16" in f.read() else "no avx512_bf16"
    print(f"host: {os.cpu_count()} cores, {isa}; load {os.getloadavg()[0]:.1f}", flush=True)
    moto = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            one_run("none", args, work, None, a.save_every)
            one_run("local", args, work, str(work / "mounted"), a.save_every)
            one_run("s3", args, work, "s3://bench/runs", a.save_every)
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
