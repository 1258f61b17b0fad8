#!/usr/bin/env bash
# GPU check (run on a machine with an NVIDIA GPU; not part of CI, which has none):
# builds H.264 shards, decodes them with DALI's mixed (NVDEC) path, checks the batches against the
# CPU path of the same shards, and runs a short bf16 co-training. Prints JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/cotrain-gpu-check}
rm -rf "$WORK" && mkdir -p "$WORK"
"$PY" -m ops.cli shards synth --out "$WORK/corpus" --n 64
"$PY" -m ops.cli shards build "$WORK/corpus/manifest.jsonl" --out "$WORK/h264" --codec h264
# loader: NVDEC (DALI mixed) decode of the H.264 shards against the CPU path of the same shards
# (ffmpeg inside DALI's feed); `bench/loader_check.py SHARDS --device cpu` is the CPU-only variant CI runs
"$PY" bench/loader_check.py "$WORK/h264" --device 0
# training: a short co-training in bf16 (on automatically with a GPU) under ZeRO-2, then its throughput
"$PY" -m ops.cli train --shards "$WORK/h264" --out "$WORK/run" --epochs 3 --batch-size 8 --zero-stage 2 \
  --metrics-port 0 | tee "$WORK/train.log"
"$PY" - "$WORK/train.log" <<'PYEOF'
import json, re, sys
rates = re.findall(r"epoch \d+/\d+ .* (\d+) samples/s", open(sys.argv[1]).read())
print(json.dumps({"check": "train_bf16_zero2", "samples_per_s_last_epoch": float(rates[-1]), "epochs": len(rates)}))
PYEOF
