"""`cotrain train --preset NAME --config FILE [options]`: preset < config file < options given on the command line.

Options left at their click defaults do not override the layers below them; the preset and the file are checked
for unknown fields, so a misspelt key fails instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from click.core import ParameterSource

from model.presets import merge, preset as preset_dict

from .config import RunConfig, _build

__all__ = ["layered_config"]

# command-line parameter -> RunConfig path, for the train options that have a default value
_DEFAULTED = {"shards_dir": ("shards",), "out": ("out",), "mode": ("mode",), "modalities": ("modalities",),
              "epochs": ("epochs",), "seed": ("seed",), "batch_size": ("loader", "batch_size"),
              "zero_stage": ("optim", "zero_stage"), "metrics_port": ("metrics", "port"),
              "metrics_host": ("metrics", "host")}
_ALWAYS = ("shards_dir", "out")  # required on the command line, so always the command line's


def layered_config(ctx, preset: str | None, config_file: str | None, split_names) -> RunConfig:
    """The run config from the preset, then the JSON file, then the options given explicitly in `ctx`."""
    layers = preset_dict(preset) if preset else {}
    if config_file:
        layers = merge(layers, _read(Path(config_file)))
    for name, path in _DEFAULTED.items():
        given = ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
        if given or name in _ALWAYS or _get(layers, path) is None:
            value = split_names(ctx.params[name]) if name == "modalities" else ctx.params[name]
            if value is not None:
                layers = merge(layers, _nest(path, value))
    _check_fields(RunConfig, layers, "config")
    return _build(RunConfig, layers)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path} is not valid JSON ({err}); give a JSON object of RunConfig fields") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds a {type(data).__name__}; give a JSON object of RunConfig fields")
    return data


def _check_fields(cls, data: dict, where: str) -> None:
    """Every key names a field of `cls`; nested dataclass configs are checked too (dict fields are free-form)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {where} field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    for name, value in data.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        sub = default() if default is not None else None
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            _check_fields(type(sub), value, f"{where}.{name}")


def _get(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _nest(path: tuple, value) -> dict:
    return {path[0]: value} if len(path) == 1 else {path[0]: _nest(path[1:], value)}
