"""cotrain: co-training unimodal branches with a multimodal Transformer teacher."""
from setuptools import setup

setup(
    name="cotrain",
    version="0.1.0",
    description="Streaming multimodal shards, DALI loading and DeepSpeed co-training of unimodal branches "
    "with a multimodal Transformer teacher (arXiv 2311.10170).",
    packages=["shards", "pipeline", "model", "ops"],
    package_data={"ops": ["configs/*.json"], "shards": ["data/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        # Standard video and per-frame image backbones with their published weights (model/backbones.py): r3d_18,
        # r2plus1d_18, mc3_18, s3d, mvit_v2_s, swin3d_t, resnet18, ... `make setup` installs the release built
        # against the chosen torch (ops/setup_torch.py); a mismatched pair fails at import.
        "torchvision>=0.16",
        "numpy",
        "webdataset>=0.2.86",
        # NVIDIA DALI is installed by `make setup` in the build the driver runs (nvidia-dali-cuda120 or
        # nvidia-dali-cuda130, ops/setup_torch.py): both provide `nvidia.dali`, so neither is pinned here.
        "ffmpeg-python>=0.2",
        "deepspeed>=0.14",
        "prometheus-client>=0.17",
        "click>=8.1",
        # Trains the corpus tokenizer at build time (issue #2/#3): a maintained, fast
        # implementation of WordLevel/BPE training beats a hand-written vocabulary.
        "tokenizers>=0.15",
        # wav2vec2, HuBERT and BERT backbones (model/backbones_audio_text.py) and their pretrained weights in
        # Hugging Face format: the reference implementations those weights were trained with, so loading them
        # needs no hand-written port of each architecture (torchaudio's wav2vec2 needs a matching torch build).
        "transformers>=5.0",
        # Progress bars on long shard builds and training.
        "tqdm",
        # In-process encoding and decode checks of shard members (issue #3): each ffmpeg CLI launch
        # costs ~40-150 ms of start-up, more than encoding a whole clip; PyAV runs the same FFmpeg
        # encoders inside the worker. The CLI (ffmpeg-python) still decodes the sources.
        "av>=12",
        # Depth frames from 8/16-bit PNG or JPEG sequences (EgoGesture, NVGesture ship them): Pillow reads
        # 16-bit PNG losslessly, which ffmpeg's image pipes do not keep as uint16.
        "pillow>=10",
        # Confusion matrices, report bars and curves: the plotting library every reader already knows.
        "matplotlib>=3.7",
        # `--config run.yaml`: YAML run configs beside JSON.
        "pyyaml>=6",
        # `s3://` shard roots: dataset.json and the DALI-free loader's shards are read with boto3, whose
        # errors say which credential or endpoint is missing (the DALI loader reads shards with DALI's S3 reader).
        "boto3>=1.28",
        # `shards manifest --format cmu-mosei` reads the CMU-MultimodalSDK's download as it ships: `.csd` files
        # are HDF5, and h5py is the reader the SDK itself uses (the SDK is not needed).
        "h5py>=3.8",
        # Finds the loopback interface's name for gloo/NCCL on single-node runs (ops/rendezvous.py), and lets
        # the tests see which addresses a training process listens on; DeepSpeed already depends on it.
        "psutil>=5.9",
    ],
    # `cotrain export --format onnx` writes ONNX with onnx and checks/runs it with onnxruntime; the other formats
    # need neither, so they stay optional.
    extras_require={"test": ["pytest>=7", "onnx>=1.15", "onnxruntime>=1.17", "moto[server]>=5"], "onnx": ["onnx>=1.15", "onnxruntime>=1.17"]},
    entry_points={"console_scripts": ["cotrain=ops.cli:main"]},
)
