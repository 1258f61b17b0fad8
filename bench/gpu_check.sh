#!/usr/bin/env bash
# GPU check (run on a machine with an NVIDIA GPU; not part of CI, which has none):
# builds H.264 shards, decodes them with DALI's mixed (NVDEC) path, checks the batches against the
# CPU path on VP9 shards of the same corpus, and runs a short bf16 co-training. Prints JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/cotrain-gpu-check}
rm -rf "$WORK" && mkdir -p "$WORK"
"$PY" -m ops.cli shards synth --out "$WORK/corpus" --n 64
"$PY" -m ops.cli shards build "$WORK/corpus/manifest.jsonl" --out "$WORK/h264" --codec h264
"$PY" -m ops.cli shards build "$WORK/corpus/manifest.jsonl" --out "$WORK/vp9" --codec vp9
"$PY" - "$WORK" <<'PYEOF'
import json, sys, time
import torch
from pipeline.dali_loader import DaliLoader, LoaderConfig
from pipeline.dataset import load_dataset_info
work = sys.argv[1]
gpu = DaliLoader(load_dataset_info(f"{work}/h264"), "train", LoaderConfig(batch_size=8), modalities=["rgb"],
                 training=False, device_id=0)
cpu = DaliLoader(load_dataset_info(f"{work}/vp9"), "train", LoaderConfig(batch_size=8), modalities=["rgb"],
                 training=False)
start, clips = time.perf_counter(), 0
gpu_batches = {k: x for b in gpu for k, x in zip(b.keys, b.inputs["rgb"].float().cpu())}
clips = len(gpu_batches)
seconds = time.perf_counter() - start
cpu_batches = {k: x for b in cpu for k, x in zip(b.keys, b.inputs["rgb"])}
# different codecs: compare the decoded clips loosely (mean absolute difference in normalised units)
diff = max(float((gpu_batches[k] - cpu_batches[k]).abs().mean()) for k in gpu_batches)
print(json.dumps({"nvdec_clips_per_s": clips / seconds, "clips": clips, "max_mean_abs_diff_vs_cpu_vp9": diff,
                  "device": torch.cuda.get_device_name(0)}))
PYEOF
"$PY" -m ops.cli train --shards "$WORK/h264" --out "$WORK/run" --epochs 2 --batch-size 8 --zero-stage 2 --metrics-port 0
