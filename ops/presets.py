"""Named presets: partial run configs that sit under the config file and the command line."""
from __future__ import annotations

__all__ = ["PRESETS", "preset_layer"]

PRESETS: dict[str, dict] = {
    # a first look at a new corpus: every branch trains and validates, in minutes on a laptop
    "quick": {"epochs": 2, "loader": {"batch_size": 8}},
}


def preset_layer(name: str) -> dict:
    """The config layer of a preset; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
