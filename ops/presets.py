"""Named presets: partial run configs that sit under the config file and the command line.

The paper's three settings (gesture, emotion, sentiment) live with the model (model/presets.py); the
operational ones live here.
"""
from __future__ import annotations

from model.presets import LIBRARY_PRESETS
from model.presets import PRESETS as MODEL_PRESETS

__all__ = ["PRESETS", "preset_layer"]

PRESETS: dict[str, dict] = {
    **MODEL_PRESETS,
    **LIBRARY_PRESETS,
    # a first look at a new corpus: every branch trains and validates, in minutes on a laptop
    "quick": {"epochs": 2, "loader": {"batch_size": 8}},
}


def preset_layer(name: str) -> dict:
    """The config layer of a preset; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
