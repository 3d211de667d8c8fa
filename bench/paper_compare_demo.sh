#!/usr/bin/env bash
# Regenerates the example in README's "Comparing variants" section (issue 21): baseline and decoupled, 2 seeds
# each, tiny, on CPU, on the bundled data/sample, with same-target length curves and 40 toy multiple-choice items
# scored at the end of training, then `compare --measure` with bf16, q8_0 and q4_0 KV caches.
#
#     bash bench/paper_compare_demo.sh            # in a fresh temp dir, removed at the end
#     bash bench/paper_compare_demo.sh DIR        # in DIR (kept: runs/, items.jsonl, compare*.png)
#
# Val loss, accuracy, KV bytes and the quality change are deterministic; tok/s are the host's (noise on a busy one).
# About 6 CPU-minutes on 2 cores of AMD EPYC (AVX-512-BF16): 5m28s user + 0m19s sys measured, 14 min wall at load ~10;
# the CPU seconds are printed at the end.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python}"
if [ $# -ge 1 ]; then work="$1"; mkdir -p "$work"; else work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT; fi
cd "$work"

# 40 toy HellaSwag-style items (ctx, 4 endings, label); made here so the demo needs nothing but the repo.
"$py" - <<'PY'
import json, random
rng = random.Random(0)
subj = "The king|The old man|A small child|The people|The priest|The farmer|A servant|The woman".split("|")
verb = "went into the|looked at the|walked to the|came out of the|sat down by the".split("|")
place = "house|temple|field|river|city|garden|mountain|gate".split("|")
end = ["and prayed there until the evening.", "and the water was cold and deep.", "and found the door shut.",
       "and saw a great light in the sky.", "because the hour was late.", "and spoke to those who were there."]
with open("items.jsonl", "w") as f:
    for _ in range(40):
        ctx = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(place)}"
        f.write(json.dumps({"ctx": ctx, "endings": rng.sample(end, 4), "label": rng.randrange(4)}) + "\n")
PY

for variant in baseline decoupled; do
  "$py" "$repo/run_1b_launch.py" --data "$repo/data/sample" --vram cpu --size tiny --variant "$variant" --seeds 2 \
    --steps 6 --eval-every 3 --eval-iters 4 --batch-size 4 --train-seq-len 64 --eval-seq-lens 32,64,128 \
    --analysis-every 0 --hellaswag items.jsonl --run-root runs --run > "train_$variant.log" 2>&1
done
echo "\$ python run_1b_launch.py compare runs --measure --measure-lengths 128 --decode-tokens 8 --quality-tokens 256 \\"
echo "    --kv-cache bf16,q8_0,q4_0"
"$py" "$repo/run_1b_launch.py" compare runs --measure --measure-lengths 128 --decode-tokens 8 --quality-tokens 256 \
  --kv-cache bf16,q8_0,q4_0 2> compare.err
echo; echo "CPU time (user, sys): this shell, then its children (training and compare):"; times
