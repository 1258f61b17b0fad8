"""Check one shard directory's video through the DALI path on a device (NVDEC, `device="mixed"`) against
the CPU path of the same shards (for H.264: ffmpeg in DALI's feed), and time it; prints one JSON object.

    .venv/bin/python bench/loader_check.py SHARDS [--device 0|cpu] [--split train]

With --device cpu (no GPU) the DALI CPU path is compared with the DALI-free loader instead, which is
what CI can run. Tolerance: mean |difference| per clip <= 2 8-bit levels (different YUV->RGB code).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import LoaderConfig, load_dataset_info, make_loader  # noqa: E402

LEVEL = 1 / (0.225 * 255)  # one 8-bit level in normalised units
MEAN_TOLERANCE_LEVELS = 2.0


def decode_all(info, split: str, backend: str, device_id: int | None) -> tuple[dict, float]:
    loader = make_loader(info, split, LoaderConfig(batch_size=8, workers=2), modalities=["rgb"], training=False,
                         device_id=device_id, backend=backend)
    started = time.perf_counter()
    clips = {k: x.float().cpu() for b in loader for k, x in zip(b.keys, b.inputs["rgb"])}
    return clips, time.perf_counter() - started


def check(shards: str, device: str, split: str = "train") -> dict:
    info = load_dataset_info(shards)
    device_id = None if device == "cpu" else int(device)
    tested, seconds = decode_all(info, split, "dali", device_id)
    reference, _ = decode_all(info, split, "dali" if device_id is not None else "wds", None)
    worst = max(float((tested[k] - reference[k]).abs().mean()) / LEVEL for k in tested)
    return {"path": "dali-mixed" if device_id is not None else "dali-cpu", "codec": info.modalities["rgb"].get("codec"),
            "clips": len(tested), "clips_per_s": round(len(tested) / seconds, 2),
            "worst_clip_mean_abs_diff_levels": round(worst, 3), "same_keys": set(tested) == set(reference),
            "ok": set(tested) == set(reference) and worst <= MEAN_TOLERANCE_LEVELS,
            "device": torch.cuda.get_device_name(device_id) if device_id is not None else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--device", default="0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    result = check(args.shards, args.device, args.split)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
