"""The loader's own config: batch size, audio features, order, augmentation and error policy."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoaderConfig", "AUDIO_FEATURES", "AUGMENTATIONS", "CORRUPT_POLICIES", "LOADER_BACKENDS"]

AUDIO_FEATURES = ("logmel", "mfcc", "waveform")
CORRUPT_POLICIES = ("skip", "fail")
LOADER_BACKENDS = ("auto", "dali", "wds")
AUGMENTATIONS = {"video": ("hflip",), "depth": ("hflip",)}
"""Augmentations each modality kind accepts (value: probability per sample)."""


@dataclass
class LoaderConfig:
    """How batches are made from the shards."""

    batch_size: int = 16
    """Samples per batch on each rank."""
    audio_features: str = "logmel"
    """Audio as per-sample-normalised log-mel (B, n_mels, T), MFCC (B, n_mfcc, T) or waveform (B, samples)."""
    n_mels: int = 40
    """Mel bands of the audio features."""
    n_mfcc: int = 13
    """Cepstral coefficients when audio_features is mfcc."""
    window_ms: float = 25.0
    """Audio analysis window."""
    hop_ms: float = 10.0
    """Audio hop between windows."""
    shuffle_buffer: int = 256
    """0 keeps the stored order; any other value shuffles every training epoch's order (seeded by
    run seed and epoch; the whole split, not a buffer, so the value itself no longer matters)."""
    threads: int = 2
    """DALI CPU worker threads per rank."""
    workers: int = 2
    """DataLoader worker processes of the DALI-free loader (0 = in the main process)."""
    video_frames: int = 0
    """Frames per clip given to the model (video and depth); 0 = all stored frames. Fewer than stored:
    a random window in training, the centred one in evaluation."""
    augment: dict = field(default_factory=dict)
    """Per-modality training augmentation, e.g. {"rgb": {"hflip": 0.5}}; nothing is on by default
    (a horizontal flip changes the meaning of a left/right gesture)."""
    on_corrupt: str = "fail"
    """A sample that cannot be read or decoded: fail the run, or skip it (counted, logged at a limited rate)."""
    backend: str = "auto"
    """Who decodes in training: dali, wds (the DALI-free loader: PyAV in worker processes) or auto (DALI when
    it is installed)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.audio_features not in AUDIO_FEATURES:
            raise ValueError(f"loader.audio_features must be one of {', '.join(AUDIO_FEATURES)}, "
                             f"got {self.audio_features!r}")
        if self.on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"loader.on_corrupt must be skip or fail, got {self.on_corrupt!r}")
        if self.backend not in LOADER_BACKENDS:
            raise ValueError(f"loader.backend must be one of {', '.join(LOADER_BACKENDS)}, got {self.backend!r}")
        if self.video_frames < 0:
            raise ValueError(f"loader.video_frames must be >= 0 (0 = all stored frames), got {self.video_frames}")
        if self.workers < 0:
            raise ValueError(f"loader.workers must be >= 0, got {self.workers}")
        for name, options in self.augment.items():
            for option, probability in dict(options).items():
                if not 0.0 <= float(probability) <= 1.0:
                    raise ValueError(f"loader.augment[{name!r}][{option!r}] is a probability in [0, 1], "
                                     f"got {probability}")


def check_augment(cfg: LoaderConfig, modalities: dict[str, dict]) -> None:
    """Every augmented modality exists and its kind supports the augmentation; the message lists what does."""
    for name, options in cfg.augment.items():
        if name not in modalities:
            raise ValueError(f"loader.augment names modality {name!r}, which is not loaded; "
                             f"loaded: {', '.join(modalities)}")
        valid = AUGMENTATIONS.get(modalities[name]["kind"], ())
        for option in options:
            if option not in valid:
                raise ValueError(f"loader.augment[{name!r}] has {option!r}; a {modalities[name]['kind']} modality "
                                 f"supports: {', '.join(valid) or 'none'}")
